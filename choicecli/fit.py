"""Fit a model: build the problem, check identification, maximise, derive the result."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import polars as pl
import torch

from choicecli.data import ChoiceData
from choicecli.design import Block
from choicecli.errors import ModelError, UsageError
from choicecli.estimate import (
    EstimateOptions,
    Objective,
    covariance,
    maximise,
    warm_start_applies,
)
from choicecli.identify import dependent_parameters
from choicecli.models import ConditionalLogit
from choicecli.problem import ModelSpec, Problem, build_problem
from choicecli.results import FitResult

MAX_RANK_CHECK_PARAMETERS = 6000
RANK_CHECK_SUBSAMPLE_CASES = 100_000  # from here the rank check looks at every 10th case first


@dataclass(frozen=True)
class FitOptions:
    """How to fit: optimiser, device, strictness."""

    estimate: EstimateOptions = EstimateOptions()
    device: str = "auto"
    strict: bool = False
    standard_errors: bool = True


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
    progress: Callable[[int, float, float], None] | None = None,
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
    reasons = _data_reasons(problem)  # read from the rows before a model may take them over
    # the rank check runs on the CPU; the conditional logit there is the fit's own model
    reusable = not problem.nested and device.type == "cpu"
    # handed over, the values move into the model column by column: held once throughout
    model = problem.model(device, release=consume and reusable)
    warnings = list(problem.warnings)
    unidentified = _unidentified(problem, warnings, reasons, model if reusable else None)
    if consume:
        problem.release_values()  # a GPU or nested fit's rank check read the problem's copy
    if warnings and options.strict:
        raise ModelError(f"--strict: {warnings[0]}")
    warnings = list(problem.notes) + warnings
    free_mask = ~problem.fixed
    free_mask[unidentified] = False
    free = free_mask.nonzero().flatten()
    penalised = torch.ones(free.numel(), dtype=torch.bool)
    if problem.lambda_index is not None:
        penalised = ~torch.isin(free, problem.lambda_index)
    objective = Objective(
        model,
        free.to(device),
        problem.start.to(device),
        penalised.to(device),
        options.estimate.l2_penalty,
        _user_groups(problem, device),
    )
    outcome = maximise(
        objective,
        problem.start[free].to(device),
        options.estimate,
        problem.lower[free].to(device),
        problem.upper[free].to(device),
        progress,
    )
    estimate = problem.start.clone()
    estimate[free] = outcome.theta.cpu()
    estimate[unidentified] = math.nan
    std_error = torch.full_like(estimate, math.nan)
    cov = torch.zeros(0, 0, dtype=torch.float64)
    if options.standard_errors and free.numel() <= options.estimate.max_newton_parameters:
        hessian = (
            outcome.hessian if outcome.hessian is not None else objective.hessian(outcome.theta)
        )
        groups = None if objective.groups is None else objective.groups.cpu()
        cov, definite = covariance(hessian.cpu(), groups)
        if not definite:
            warnings.append(
                "the Hessian at the optimum is not negative definite: some coefficients are "
                "weakly identified; their standard errors are unreliable"
            )
        std_error[free] = cov.diagonal().clamp_min(0).sqrt()
    elif options.standard_errors:
        warnings.append(
            f"standard errors skipped: {free.numel()} parameters are too many for a dense "
            f"Hessian (limit {options.estimate.max_newton_parameters})"
        )
    identified = torch.ones(len(problem.parameters), dtype=torch.bool)
    identified[unidentified] = False
    statistics = _statistics(problem, outcome, free.numel())
    statistics["seconds"] = round(time.perf_counter() - started, 4)
    statistics["device"] = str(device)
    if outcome.log_likelihood > -1e-6 * problem.data.n_cases:
        terms = _separating_terms(problem, free, outcome.hessian)
        message = (
            "perfect prediction: the model predicts every choice with certainty, so the "
            f"estimates of {terms} run off to infinity; drop or merge the separating terms"
        )
        if options.strict:
            raise ModelError(f"--strict: {message}")
        warnings.append(message)
    if not outcome.converged:
        warnings.append(f"the fit did not converge: {outcome.message}")
    warnings.extend(_lambda_warnings(problem, estimate))
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
    )
    return result, problem


def _separating_terms(problem: Problem, free: torch.Tensor, hessian: torch.Tensor | None) -> str:
    """The terms along the flattest direction of the likelihood: where estimates run away."""
    if hessian is None or hessian.shape[0] > 2000:
        return "some coefficients"
    information = -hessian.cpu()
    scale = information.diagonal().abs().clamp_min(1e-300).sqrt()
    _, vectors = torch.linalg.eigh(information / scale[:, None] / scale[None, :])
    weakest = vectors[:, 0].abs()  # (P,) eigenvector of the smallest eigenvalue
    chosen = free[(weakest > 0.3 * weakest.max()).cpu()].tolist()
    names = list(dict.fromkeys(problem.parameters[i].term for i in chosen))
    return ", ".join(names) or "some coefficients"


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
    spec: ModelSpec = problem.spec
    return {
        "formula": spec.formula,
        "nest_formula": spec.nest_formula if problem.nested else None,
        "nests": problem.nests,
        "shared_lambda": spec.shared_lambda,
        "lambda_init": spec.lambda_init,
        "lambda_fixed": spec.lambda_fixed,
        "lambda_bounds": list(spec.lambda_bounds) if spec.lambda_bounds else None,
        "roles": asdict(spec.roles),
        "base": str(problem.data.item_labels[problem.item_blocks[0].level.base])
        if problem.item_blocks
        else spec.base,
        "missing": spec.missing,
        "terms": [
            {"level": level, "term": term.name, "features": names}
            for level, terms, features in (
                ("item", problem.terms, problem.features),
                ("nest", problem.nest_terms, problem.nest_features),
            )
            for term, names in zip(terms, features, strict=True)
        ],
        "options": {**asdict(options.estimate), "device": options.device, "strict": options.strict},
    }


def _user_groups(problem: Problem, device: torch.device) -> torch.Tensor | None:
    """Each parameter's user (a number), -1 for those no user owns; None without user terms.
    A case has one user, so two users' coefficients never meet in the Hessian."""
    users: dict[str, int] = {}
    groups = [
        -1 if p.user is None else users.setdefault(p.user, len(users)) for p in problem.parameters
    ]
    return torch.tensor(groups, device=device) if users else None


def _data_reasons(problem: Problem) -> dict[int, str]:
    """Parameters the rows show to be inestimable (read before a model takes them over)."""
    reasons: dict[int, str] = {}
    _single_case_users(problem, reasons)
    _never_chosen(problem, reasons)
    return reasons


def _unidentified(
    problem: Problem,
    warnings: list[str],
    reasons: dict[int, str],
    model: ConditionalLogit | None = None,
) -> list[int]:
    """Positions of parameters the data cannot estimate (`reasons` and the rank check's), with
    one warning per term."""
    reasons = dict(reasons)
    candidates = (~problem.fixed).nonzero().flatten()
    candidates = candidates[~torch.isin(candidates, torch.tensor(sorted(reasons) or [-1]))]
    if problem.lambda_index is not None:
        candidates = candidates[~torch.isin(candidates, problem.lambda_index)]
    if candidates.numel() > MAX_RANK_CHECK_PARAMETERS:
        warnings.append(
            f"rank check skipped: {candidates.numel()} parameters exceed "
            f"{MAX_RANK_CHECK_PARAMETERS}; unidentified terms may not converge"
        )
    elif candidates.numel():
        # Intercepts first (as R's lm puts the intercept first), then formula order: a column
        # constant within alternative beside (1|item) is the one left out.
        is_intercept = torch.tensor(
            [problem.parameters[i].feature == "intercept" for i in candidates.tolist()]
        )
        candidates = torch.cat([candidates[is_intercept], candidates[~is_intercept]])
        # the fit's own model at theta = 0 gives Newton's first Hessian too, unless Newton
        # starts elsewhere (a warm start) or the check needs a model of its own
        reused = model is not None and not warm_start_applies(model, candidates.numel())
        model = model or problem.identification_model()
        for found in _rank_check(model, candidates, len(problem.parameters), not reused):
            reasons[found.index] = _dependence_reason(problem, found)
    by_term: dict[str, list[str]] = {}
    for index, reason in sorted(reasons.items()):
        parameter = problem.parameters[index]
        by_term.setdefault(f"{parameter.term} ({parameter.level} level)", []).append(reason)
    for term, term_reasons in by_term.items():
        distinct = list(dict.fromkeys(term_reasons))
        count = len(term_reasons)
        shown = "; ".join(distinct[:2]) + (" ..." if len(distinct) > 2 else "")
        counted = f"{count:,} coefficients" if count > 1 else "1 coefficient"
        warnings.append(f"{term}: {counted} not estimated: {shown}")
    return sorted(reasons)


def _rank_check(model, candidates: torch.Tensor, n_parameters: int, subsample: bool) -> list:
    """Dependent parameters at theta = 0, on every 10th case first when there are many.

    The information of a tenth of the cases is a sum of positive semi-definite terms over
    fewer cases, so it is at most the full information: when every parameter passes there,
    all pass on the full data and its Hessian is not needed.
    """
    zero = torch.zeros(n_parameters, dtype=torch.float64)
    if subsample and model.n_cases >= RANK_CHECK_SUBSAMPLE_CASES:
        smaller = model.subsample(10)
        if smaller is not None and not dependent_parameters(
            -smaller.hessian(zero), candidates, smaller.second_moments()
        ):
            return []
    return dependent_parameters(-model.hessian(zero), candidates, model.second_moments())


def _dependence_reason(problem: Problem, found) -> str:
    parameter = problem.parameters[found.index]
    if found.cancels:
        name = "the intercept" if parameter.feature == "intercept" else f"{parameter.feature!r}"
        return f"{name} does not vary across the alternatives of any case, so it cancels out"
    partners = list(dict.fromkeys(problem.parameters[p].term for p in found.partners))
    hint = ""
    if parameter.feature != "intercept" and _constant_within_item(problem, parameter.feature):
        hint = (
            f"{parameter.feature!r} is constant within each alternative "
            f"({problem.spec.roles.item!r}), so it is "
        )
    return f"{hint}collinear with {', '.join(partners[:3]) or 'earlier terms'}"


def _constant_within_item(problem: Problem, feature: str | None) -> bool:
    return feature is not None and problem.data.constant_within_item(feature)


def _user_blocks(problem: Problem) -> list[Block]:
    return [b for b in problem.item_blocks + problem.nest_blocks if b.term.variation.by_user]


def _single_case_users(problem: Problem, reasons: dict[int, str]) -> None:
    """User-specific coefficients of users with one case would run off to infinity."""
    data = problem.data
    if data.user_of_case is None:
        return
    cases_per_user = torch.bincount(data.user_of_case, minlength=data.n_users)  # (U,)
    single = (cases_per_user <= 1).nonzero().flatten()
    if single.numel() == 0:
        return
    for block in _user_blocks(problem):
        groups_per_user = block.layout_index.shape[0] // data.n_users
        rows = block.layout_index.view(data.n_users, groups_per_user, -1)[single]  # (S, g, K)
        for index in rows.flatten().tolist():
            if not problem.parameters[index].fixed:
                reasons[index] = "its user has a single case (the estimate would be infinite)"


def _never_chosen(problem: Problem, reasons: dict[int, str]) -> None:
    """An alternative intercept for an alternative nobody chose would run off to -infinity."""
    data = problem.data
    if data.chosen is None:
        return
    for block in problem.item_blocks:
        if not (block.term.is_intercept and block.term.variation.by_item):
            continue
        groups = block.layout_index.shape[0]
        chosen = torch.zeros(groups, dtype=torch.float64).index_add_(0, block.code, data.chosen)
        offered = torch.bincount(block.code, minlength=groups)
        for group in ((chosen == 0) & (offered > 0)).nonzero().flatten().tolist():
            index = int(block.layout_index[group, 0])
            if not problem.parameters[index].fixed:
                label = problem.parameters[index].item
                reasons[index] = f"alternative {label!r} is never chosen (estimate would be -inf)"


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
