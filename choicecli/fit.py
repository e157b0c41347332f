"""Fit a model: build the problem, check identification, maximise, derive the result."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import polars as pl
import torch

from choicecli.data import ChoiceData
from choicecli.errors import ModelError, UsageError
from choicecli.estimate import (
    EstimateOptions,
    Objective,
    Outcome,
    Progress,
    covariance,
    maximise,
    newton_size,
    warm_start_applies,
)
from choicecli.identify import data_reasons, separating_terms, unidentified_parameters
from choicecli.inference import (
    ErrorsChoice,
    bootstrap_covariance,
    sandwich,
    score_meat,
)
from choicecli.models import Model
from choicecli.problem import ModelSpec, Problem, build_problem, dense_design
from choicecli.results import FitResult
from choicecli.spec import spec_document

LAMBDA_CEILING = 100.0  # a lambda running away (see estimate._runaway) stops the fit past this


@dataclass(frozen=True)
class FitOptions:
    """How to fit: optimiser, device, strictness."""

    estimate: EstimateOptions = EstimateOptions()
    device: str = "auto"
    strict: bool = False
    standard_errors: bool = True
    errors: ErrorsChoice = ErrorsChoice()  # --se; sampling weights turn classic into robust
    seed: int = 0  # of the bootstrap draws
    weights_kind: str = "frequency"  # or sampling: rescaled to sum to N, robust errors
    draw_batch: int | None = None  # mixed logit: draws per batch (None: from a memory budget)


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else CPU; cuda[:N] must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available; use --device cpu")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices")
        return device
    raise UsageError(f"--device must be auto, cpu or cuda[:N], not {name!r}")


def fit_model(
    frame: pl.DataFrame,
    spec: ModelSpec,
    options: FitOptions,
    *,
    where: str,
    progress: Progress | None = None,
    consume: bool = False,
) -> tuple[FitResult, Problem]:
    """Everything between a read table and a FitResult.

    consume: the caller hands the frame over (it is left empty) and the problem drops its
    values once the model holds a copy, so the data is held once; the returned problem can
    then build no further model.
    """
    started = time.perf_counter()
    device = resolve_device(options.device)
    problem = build_problem(frame, spec, where, consume=consume)
    if problem.mixed is not None:
        return _fit_mixed(problem, options, device, started), problem
    options = _weights_kind(problem, options)
    if options.errors.clustered:  # a bad cluster column fails before the fit, not after
        _clusters(problem, options.errors, torch.device("cpu"))
    reasons = data_reasons(problem)  # read from the rows before a model may take them over
    # the rank check runs on the CPU; the conditional logit there is the fit's own model
    reusable = not problem.nested and device.type == "cpu"
    # handed over, the values move into the model column by column: held once throughout
    model = problem.model(device, release=consume and reusable)
    # decided once: whether Newton starts from a subsample fit, or at theta = 0, where the
    # rank check's Hessian then serves its first step
    warm_start = warm_start_applies(model, int((~problem.fixed).sum()) - len(reasons))
    warnings = list(problem.warnings)
    unidentified = unidentified_parameters(
        problem, warnings, reasons, model if reusable else None, not warm_start
    )
    if consume:
        problem.release_values()  # a GPU or nested fit's rank check read the problem's copy
    if warnings and options.strict:
        raise ModelError(f"--strict: {warnings[0]}")
    warnings = list(problem.notes) + warnings
    objective, free = _objective(problem, model, unidentified, options.estimate.l2_penalty, device)
    outcome = maximise(
        objective,
        problem.start[free].to(device),
        options.estimate,
        problem.lower[free].to(device),
        problem.upper[free].to(device),
        progress,
        warm_start=warm_start,
    )
    estimate = problem.start.clone()
    estimate[free] = outcome.theta.cpu()
    estimate[unidentified] = math.nan
    std_error, cov = _standard_errors(objective, outcome, free, options, warnings)
    errors = _other_errors(problem, objective, outcome, free, options, cov, warnings)
    if options.errors.kind not in ("classic", "none") and cov.numel():
        cov = errors.pop("covariance")
        std_error = errors[options.errors.kind].clone()  # saved apart from its copy
    errors.pop("covariance", None)
    warnings.extend(_outcome_warnings(problem, outcome, free, estimate, options.strict))
    identified = torch.ones(len(problem.parameters), dtype=torch.bool)
    identified[unidentified] = False
    statistics = _statistics(problem, outcome, free.numel())
    statistics.update(_null_tests(statistics, problem.data.n_items))
    statistics["hessian_condition_number"] = _condition_number(objective, outcome, options)
    statistics["standard_errors"] = options.errors.kind if cov.numel() else "none"
    statistics["weights_kind"] = options.weights_kind if problem.spec.roles.weights else None
    if outcome.runaway is not None:
        statistics["stopped"] = "runaway"
        statistics["runaway"] = [_name(problem, int(free[i])) for i in outcome.runaway]
    statistics["seconds"] = round(time.perf_counter() - started, 4)
    statistics["device"] = str(device)
    result = FitResult(
        spec=_spec_document(problem, options),
        labels={
            "items": problem.data.item_labels,
            "users": problem.data.user_labels,
            "nests": list(problem.nests) if problem.nests else None,
        },
        parameters=problem.parameters,
        estimate=estimate,
        std_error=std_error,
        identified=identified,
        covariance=cov,
        estimated_index=free,
        fit=statistics,
        warnings=warnings,
        std_errors=errors,
    )
    return result, problem


def _objective(
    problem: Problem,
    model: Model,
    unidentified: list[int],
    l2_penalty: float,
    device: torch.device,
) -> tuple[Objective, torch.Tensor]:
    """The objective over the free parameters (neither fixed nor unidentified), and their
    positions in the layout. (P,)"""
    free_mask = ~problem.fixed
    free_mask[unidentified] = False
    free = free_mask.nonzero().flatten()
    penalised = torch.ones(free.numel(), dtype=torch.bool)
    ceilings = None  # a lambda running away past 100 stops the fit at once
    if problem.lambda_index is not None:
        penalised = ~torch.isin(free, problem.lambda_index)
        ceilings = torch.where(penalised, math.inf, LAMBDA_CEILING).double().to(device)
    objective = Objective(
        model,
        free.to(device),
        problem.start.to(device),
        penalised.to(device),
        l2_penalty,
        _user_groups(problem, device),
        ceilings,
    )
    return objective, free


def _standard_errors(
    objective: Objective,
    outcome: Outcome,
    free: torch.Tensor,
    options: FitOptions,
    warnings: list[str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard errors of the layout (NaN where not estimated) and the free parameters'
    covariance, from the Hessian at the optimum. ((P_layout,), (P, P))"""
    n_layout = objective.start.shape[0]
    std_error = torch.full((n_layout,), math.nan, dtype=torch.float64)
    cov = torch.zeros(0, 0, dtype=torch.float64)
    limit = options.estimate.max_newton_parameters
    if not options.standard_errors or options.errors.kind == "none":
        return std_error, cov
    if newton_size(free.numel(), objective.groups) > limit:
        warnings.append(
            f"standard errors skipped: {free.numel()} parameters are too many for a dense "
            f"Hessian (limit {limit})"
        )
        return std_error, cov
    hessian = outcome.hessian if outcome.hessian is not None else objective.hessian(outcome.theta)
    groups = None if objective.groups is None else objective.groups.cpu()
    cov, definite = covariance(hessian.cpu(), groups)
    if not definite:
        warnings.append(
            "the Hessian at the optimum is not negative definite: some coefficients are "
            "weakly identified; their standard errors are unreliable"
        )
    std_error[free] = cov.diagonal().clamp_min(0).sqrt()
    return std_error, cov


def _weights_kind(problem: Problem, options: FitOptions) -> FitOptions:
    """Sampling weights: rescaled to sum to the number of cases, and errors robust where
    classic ones were asked (as Stata's pweights)."""
    if options.weights_kind not in ("frequency", "sampling"):
        raise UsageError(
            f"--weights-kind must be frequency or sampling, not {options.weights_kind!r}"
        )
    if options.weights_kind == "frequency":
        return options
    data = problem.data
    if data.case_weights is None:
        raise UsageError("--weights-kind sampling needs --weights COL")
    data.case_weights = data.case_weights * (data.n_cases / data.case_weights.sum())  # (N,)
    if options.errors.kind == "classic":
        return replace(options, errors=ErrorsChoice("robust"))
    return options


def _other_errors(
    problem: Problem,
    objective: Objective,
    outcome: Outcome,
    free: torch.Tensor,
    options: FitOptions,
    cov: torch.Tensor,
    warnings: list[str],
) -> dict[str, torch.Tensor]:
    """Beside another kind than classic: the classic standard errors and that kind's, each
    over the layout (NaN where not estimated), and under 'covariance' the chosen kind's
    covariance. {kind: (P_layout,)}"""
    kind = options.errors.kind
    if kind == "none" or not cov.numel():
        return {}
    n_layout = objective.start.shape[0]

    def spread(covariance: torch.Tensor) -> torch.Tensor:  # (P_layout,)
        values = torch.full((n_layout,), math.nan, dtype=torch.float64)
        values[free] = covariance.diagonal().clamp_min(0).sqrt().cpu()
        return values

    if kind == "classic":  # std_error is all there is: no columns beside it
        return {}
    found = {"classic": spread(cov)}
    device = outcome.theta.device
    clusters, n_clusters = None, 0
    if options.errors.clustered:
        clusters, n_clusters = _clusters(problem, options.errors, device)
        by_user_clusters = (options.errors.cluster or problem.data.roles.user) == (
            problem.data.roles.user
        )
        if kind == "cluster" and by_user_clusters and objective.model.by_user:
            warnings.append(
                "--se cluster by the user column with user-specific coefficients: each "
                "user's scores for them sum to 0 at the optimum, so their clustered errors "
                "understate the uncertainty; only the shared coefficients' errors are meaningful"
            )
    if kind == "bootstrap":
        lower, upper = problem.lower[free].to(device), problem.upper[free].to(device)

        # a draw's estimate to 1e-4 of its standard errors: far below the draws' spread
        loose = replace(options.estimate, tolerance=max(options.estimate.tolerance, 1e-4))

        def refit(target: Objective, start: torch.Tensor) -> Outcome:
            return maximise(target, start, loose, lower, upper)

        draws = options.errors.draws
        chosen, failed = bootstrap_covariance(
            objective, outcome.theta, refit, draws, options.seed, clusters, n_clusters
        )
        if failed:
            warnings.append(
                f"bootstrap: {failed} of {draws} draws did not converge and are left out"
            )
    else:
        theta = objective.expand(outcome.theta)  # (P_layout,)
        sampling = options.weights_kind == "sampling"
        meat = score_meat(objective.model, theta, objective.free, sampling, clusters, n_clusters)
        chosen = sandwich(cov.double(), meat.cpu())
    found[kind] = spread(chosen)
    found["covariance"] = chosen.cpu()
    return found


def _clusters(problem: Problem, errors: ErrorsChoice, device: torch.device):
    """Each case's cluster (N,) and the number of clusters: the user column by default, or
    the case column (one case per cluster)."""
    roles = problem.data.roles
    column = errors.cluster or roles.user
    if column is None:
        raise UsageError("--se cluster clusters by the user column: give --user, or cluster:COL")
    if column not in (roles.user, roles.case):
        raise UsageError(
            f"--se cluster:{column}: clusters are the user column ({roles.user}) or the case "
            f"column ({roles.case})"
        )
    data = problem.data
    if column == roles.case:
        return torch.arange(data.n_cases, device=device), data.n_cases
    if data.n_users < 2:
        raise ModelError(
            f"--se cluster: the user column {column!r} holds {data.n_users} user; clustered "
            "errors need at least 2 clusters"
        )
    return data.user_of_case.to(device), data.n_users


def _null_tests(statistics: dict, n_items: int) -> dict:
    """Likelihood-ratio tests against equal shares (df: the parameters) and against market
    shares (df: the parameters less J - 1 intercepts), with chi-squared p-values."""
    value, n_parameters = statistics["log_likelihood"], statistics["n_parameters"]
    found = {}
    for name, null, df in (
        ("equal_shares", statistics["null_log_likelihood"], n_parameters),
        ("market_shares", statistics["shares_log_likelihood"], n_parameters - (n_items - 1)),
    ):
        if null is None or df < 1:
            found[f"lr_{name}"] = None
            continue
        chi_squared = 2.0 * (value - null)
        half = torch.tensor([df / 2.0, max(chi_squared, 0.0) / 2.0], dtype=torch.float64)
        p_value = float(torch.special.gammaincc(half[0], half[1]))  # upper tail of chi2(df)
        found[f"lr_{name}"] = {"chi_squared": chi_squared, "df": df, "p_value": p_value}
    return found


def _condition_number(objective: Objective, outcome: Outcome, options: FitOptions) -> float | None:
    """The ratio of the largest to the smallest eigenvalue of -H at the optimum (None when
    the Hessian was not formed)."""
    if outcome.hessian is None or outcome.theta.numel() > options.estimate.max_newton_parameters:
        return None
    eigenvalues = torch.linalg.eigvalsh(-outcome.hessian.double().cpu())  # (P,) ascending
    if not bool(eigenvalues[0] > 0):
        return None  # not negative definite: see the warning
    return float(eigenvalues[-1] / eigenvalues[0])


def _outcome_warnings(
    problem: Problem, outcome: Outcome, free: torch.Tensor, estimate: torch.Tensor, strict: bool
) -> list[str]:
    """Perfect prediction (an error under --strict), no convergence, lambdas out of range."""
    found = []
    if outcome.log_likelihood > -1e-6 * problem.data.n_cases:
        terms = separating_terms(problem, free, outcome.hessian)
        message = (
            "perfect prediction: the model predicts every choice with certainty, so the "
            f"estimates of {terms} run off to infinity; drop or merge the separating terms"
        )
        if strict:
            raise ModelError(f"--strict: {message}")
        found.append(message)
    if outcome.runaway is not None:
        found.append(_runaway_warning(problem, [int(free[i]) for i in outcome.runaway]))
    elif not outcome.converged:
        found.append(f"the fit did not converge: {outcome.message}")
    return found + _lambda_warnings(problem, estimate)


def _name(problem: Problem, index: int) -> str:
    """A parameter as the coefficient table shows it: its term, then its alternative or nest
    and its user, e.g. lambda:a or cost[user]:u7."""
    parameter = problem.parameters[index]
    owners = [owner for owner in (parameter.item, parameter.user) if owner is not None]
    return ":".join([parameter.term, *owners])


def _runaway_warning(problem: Problem, running: list[int]) -> str:
    """Which parameters run away, and what to do: bound lambda, or drop a term."""
    names = [_name(problem, i) for i in running]
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    verb = "grows" if len(names) == 1 else "grow"
    lambdas = set() if problem.lambda_index is None else set(problem.lambda_index.tolist())
    if any(i in lambdas for i in running):
        advice = "bound the lambdas, e.g. --lambda-bounds 0.01,1"
    else:
        terms = sorted({problem.parameters[i].term for i in running})
        advice = f"drop or merge the term{'s' if len(terms) > 1 else ''} {', '.join(terms)}"
    return (
        f"the fit did not converge: {shown} {verb} without bound while the log-likelihood "
        f"approaches a limit (no finite optimum); {advice}"
    )


def _statistics(problem: Problem, outcome, n_estimated: int) -> dict:
    """Fit statistics; the data's counts outlive its released rows."""
    data = problem.data
    weights = data.case_weights if data.case_weights is not None else torch.ones(data.n_cases)
    null = float(-(weights * torch.log(data.alternatives_per_case().double())).sum())
    value = outcome.log_likelihood
    n_cases = data.n_cases
    shares = _market_shares_log_likelihood(data)
    return {
        "log_likelihood": value,
        "null_log_likelihood": null,
        "rho_squared": 1.0 - value / null if null else None,
        "shares_log_likelihood": shares,
        "rho_squared_shares": 1.0 - value / shares if shares else None,
        "adjusted_rho_squared": 1.0 - (value - n_estimated) / null if null else None,
        "aic": -2.0 * value + 2.0 * n_estimated,
        "bic": -2.0 * value + n_estimated * math.log(n_cases),
        "n_rows": data.n_rows,
        "n_cases": n_cases,
        "n_alternatives": data.n_items,
        "n_users": data.n_users,
        "n_parameters": n_estimated,
        "iterations": outcome.iterations,
        "converged": outcome.converged,
        "method": outcome.method,
        "message": outcome.message,
        "gradient_norm": outcome.gradient_norm,
        "optimiser_seconds": round(outcome.seconds, 4),
        "observed_shares": _shares(data),
    }


def _market_shares_log_likelihood(data: ChoiceData) -> float | None:
    """Log-likelihood of the alternative-intercepts-only model (mlogit's McFadden R^2 base).

    Closed form sum_j c_j log(c_j / N) when every case offers every alternative; None with
    varying choice sets, where it would need a fit of its own.
    """
    counts = data.choices_per_alternative(weighted=True)  # (J,)
    if counts is None or data.n_rows != data.n_cases * data.n_items:
        return None
    total = counts.sum()
    chosen = counts[counts > 0]
    return float((chosen * torch.log(chosen / total)).sum())


def _shares(data: ChoiceData) -> dict[str, float]:
    counts = data.choices_per_alternative()  # (J,)
    if counts is None:
        return {}
    return {
        str(label): float(c) / data.n_cases
        for label, c in zip(data.item_labels, counts, strict=True)
    }


def _spec_document(problem: Problem, options: FitOptions) -> dict:
    base = (
        str(problem.data.item_labels[problem.item_blocks[0].level.base])
        if problem.item_blocks
        else problem.spec.base
    )
    terms = [
        {"level": level, "term": term.name, "features": names}
        for level, terms, features in (
            ("item", problem.terms, problem.features),
            ("nest", problem.nest_terms, problem.nest_features),
        )
        for term, names in zip(terms, features, strict=True)
    ]
    return spec_document(
        replace(problem.spec, nests=problem.nests, base=base),
        terms=terms,
        options={
            **asdict(options.estimate),
            "device": options.device,
            "strict": options.strict,
            "standard_errors": asdict(options.errors),
            "seed": options.seed,
            "weights_kind": options.weights_kind,
        },
    )


def _user_groups(problem: Problem, device: torch.device) -> torch.Tensor | None:
    """Each parameter's user (a number), -1 for those no user owns; None without user terms.
    A case has one user, so two users' coefficients never meet in the Hessian."""
    users: dict[str, int] = {}
    groups = [
        -1 if p.user is None else users.setdefault(p.user, len(users)) for p in problem.parameters
    ]
    return torch.tensor(groups, device=device) if users else None


def _lambda_warnings(problem: Problem, estimate: torch.Tensor) -> list[str]:
    if problem.lambda_index is None:
        return []
    found = []
    for index in problem.lambda_index.unique().tolist():
        value = float(estimate[index])
        parameter = problem.parameters[index]
        if parameter.fixed and parameter.item is not None and not problem.spec.lambda_fixed:
            found.append(f"lambda of nest {parameter.item!r} fixed at 1: a single alternative")
        elif not 0.0 < value <= 1.0:
            nest = f" of nest {parameter.item!r}" if parameter.item else ""
            found.append(
                f"lambda{nest} = {value:.4g} lies outside (0, 1]: not consistent with random "
                "utility maximisation for all values of the data; to keep it in (0, 1], refit "
                "with --lambda-bounds 0.01,1"
            )
    return found


# -- mixed logit ------------------------------------------------------------------------------

# fewer draws per unit than this times the random coefficients: a warning with advice
MIN_DRAWS_PER_RANDOM = 25


def _fit_mixed(
    problem: Problem, options: FitOptions, device: torch.device, started: float
) -> FitResult:
    """A mixed logit: the formula's identification as for the conditional logit (the means),
    then simulated maximum likelihood by the core's fit_mixed (L-BFGS, then Newton steps with
    the exact Hessian), standard errors from that Hessian. With users, each user's
    conditional mean of each random coefficient (given the user's choices) follows as a
    user-level row (parameter `conditional_mean`, no standard error)."""
    from choicecli.models import mixed

    layout, spec, data = problem.mixed, problem.spec, problem.data
    if data.case_weights is not None:
        raise UsageError("--weights is not supported by the mixed logit yet; drop --weights")
    warnings = list(problem.warnings)
    reasons = data_reasons(problem)
    model = problem.model(torch.device("cpu"))  # the conditional logit of the means
    unidentified = unidentified_parameters(problem, warnings, reasons, model, False)
    _check_random_identified(problem, unidentified, reasons, warnings)
    n_random = len(layout.means)
    if spec.draws < MIN_DRAWS_PER_RANDOM * n_random:
        warnings.append(
            f"--draws {spec.draws} is few for {n_random} random coefficients: the estimates "
            "carry simulation noise (see the simulation's standard error in the summary); use "
            f"--draws {MIN_DRAWS_PER_RANDOM * n_random} or more"
        )
    if warnings and options.strict:
        raise ModelError(f"--strict: {warnings[0]}")
    warnings = list(problem.notes) + warnings
    skipped = set(unidentified) | set(layout.means)
    fixed_positions = [
        p for p in range(len(problem.parameters)) if not problem.fixed[p] and p not in skipped
    ]
    n_fixed = len(fixed_positions)
    mixed_spec = mixed.MixedSpec(n_fixed, layout.distributions, layout.correlated)
    design = dense_design(problem, fixed_positions + layout.means).to(device)  # (R, K)
    units = None
    if data.user_of_case is not None:  # panel: draws per user (codes 0 .. U-1 of those here)
        units = torch.unique(data.user_of_case, return_inverse=True)[1].to(device)  # (N,)
    table = mixed.mixed_data(
        design[:, :n_fixed], design[:, n_fixed:], data.case_index.to(device),
        data.chosen.to(device), units,
    )  # fmt: skip
    del design
    user_codes = None if units is None else torch.unique(data.user_of_case)  # (U,)
    problem.release_values()
    draws = mixed.make_draws(
        mixed_spec, table.n_units, spec.draws, spec.draw_kind, spec.seed, device=device
    )  # (U, R, Kr)
    fitted = mixed.fit_mixed(
        mixed_spec, table, draws, draw_batch=options.draw_batch,
        max_iterations=options.estimate.max_iterations,
    )  # fmt: skip
    n_layout = len(problem.parameters)
    order = torch.tensor(
        fixed_positions + layout.means + list(range(n_layout, n_layout + len(layout.extra)))
    )  # (P_mixed,) layout position of each of the core's parameters
    estimate = torch.cat([problem.start, torch.zeros(len(layout.extra), dtype=torch.float64)])
    estimate[order] = fitted.theta.cpu()
    estimate[unidentified] = math.nan
    std_error = torch.full_like(estimate, math.nan)
    cov = torch.zeros(0, 0, dtype=torch.float64)
    if options.standard_errors:
        cov, definite = covariance(fitted.hessian.cpu(), None)
        if not definite:
            warnings.append(
                "the Hessian at the optimum is not negative definite: some coefficients are "
                "weakly identified; their standard errors are unreliable"
            )
        std_error[order] = cov.diagonal().clamp_min(0).sqrt()
    if not fitted.converged:
        warnings.append(
            "the fit did not converge: the largest gradient entry is "
            f"{float(fitted.gradient.abs().max()):.3g}; raise --max-iter or --draws"
        )
    identified = torch.ones(estimate.numel(), dtype=torch.bool)
    identified[unidentified] = False
    parameters = problem.parameters + layout.extra
    if user_codes is not None:  # per-user conditional means (Train, ch. 11): user-level rows
        values = mixed.conditional_means(
            mixed_spec, table, fitted.theta, draws, options.draw_batch
        ).cpu()  # (U, Kr)
        labels = [str(data.user_labels[code]) for code in user_codes.tolist()]
        parameters += [
            replace(problem.parameters[position], parameter="conditional_mean", user=label)
            for position in layout.means
            for label in labels
        ]
        estimate = torch.cat([estimate, values.T.reshape(-1)])  # coefficient by coefficient
        std_error = torch.cat([std_error, torch.full((values.numel(),), math.nan)])
        identified = torch.cat([identified, torch.ones(values.numel(), dtype=torch.bool)])
    outcome = Outcome(
        theta=fitted.theta,
        log_likelihood=fitted.log_likelihood,
        gradient_norm=float(fitted.gradient.norm()),
        iterations=fitted.iterations + fitted.newton_steps,
        converged=fitted.converged,
        method="L-BFGS, then Newton with the exact Hessian",
        message="largest gradient entry "
        f"{float(fitted.gradient.abs().max()):.3g} (tolerance 1e-06)",
        seconds=time.perf_counter() - started,
        hessian=fitted.hessian,
    )
    statistics = _statistics(problem, outcome, order.numel())
    statistics |= {
        "draws": spec.draws,
        "draw_kind": spec.draw_kind,
        "seed": spec.seed,
        "draws_per": "user" if units is not None else "case",
        "n_draw_units": table.n_units,
        "simulation_standard_error": mixed.simulation_standard_error(
            mixed_spec, table, fitted.theta, draws, options.draw_batch
        ),
        "seconds": round(time.perf_counter() - started, 4),
        "device": str(device),
    }
    return FitResult(
        spec=_spec_document(problem, options),
        labels={"items": data.item_labels, "users": data.user_labels, "nests": None},
        parameters=parameters,
        estimate=estimate,
        std_error=std_error,
        identified=identified,
        covariance=cov,
        estimated_index=order,
        fit=statistics,
        warnings=warnings,
    )


def _check_random_identified(
    problem: Problem, unidentified: list[int], reasons: dict[int, str], warnings: list[str]
) -> None:
    """A random coefficient the data cannot estimate (its mean) is an error naming it."""
    for position in problem.mixed.means:
        if position in unidentified:
            parameter = problem.parameters[position]
            reason = reasons.get(position) or (warnings[-1] if warnings else "")
            raise ModelError(
                f"--random {parameter.term}={parameter.distribution}: the term cannot be "
                f"estimated from this data, so it cannot be random ({reason}); drop it from "
                "--random"
            )
