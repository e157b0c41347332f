"""Maximum likelihood: Newton with line search, L-BFGS for many parameters, standard errors.

Notation: P free parameters. The objective maximises the log-likelihood minus an optional
L2 penalty (l2 / 2) * sum(theta_k^2) over the penalised parameters.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from choicecli.arrowhead import MIN_GROUPED_PARAMETERS, factor_arrowhead, split_arrowhead
from choicecli.models.protocol import Model

# Newton needs a Hessian per step. Where the model computes it by automatic differentiation
# (about P gradients, see Model.analytic_hessian_limit), Newton only while that is cheap;
# otherwise L-BFGS first, then a Newton polish
AUTOGRAD_NEWTON_PARAMETERS = 40
AUTOGRAD_NEWTON_VALUES = 5_000_000  # rows x parameters

# Newton starts from a fit on every 10th case when there are this many cases, and at least
# this many cases per parameter in that tenth
WARM_START_CASES = 100_000
WARM_START_EVERY = 10
WARM_START_CASES_PER_PARAMETER = 200
# and stops there at this Newton decrement (in the subsample's standard errors): its optimum
# lies some sqrt(10) full-data standard errors from the full one, so the last digits of it
# are not worth the steps (a quadratic step takes the full fit from either point alike)
WARM_START_TOLERANCE = 0.5

# a last Newton step shorter than this times sqrt(cases) (in standard-error units) keeps its
# Hessian: a step of d standard errors moves the Hessian, and the standard errors, by about
# d / sqrt(cases) relative, so they stay within about 1e-7 of the optimum's
STALE_HESSIAN_DECREMENT = 1e-7

# with per-user coefficients Newton factors the shared ones and one user's at a time
# (arrowhead.py), so `max_newton_parameters` bounds those; the (P, P) Hessian is still held,
# up to this many parameters (800 MB)
ARROWHEAD_NEWTON_PARAMETERS = 10_000

# A runaway (a direction of recession: the log-likelihood rises toward a finite limit as some
# parameters grow without bound, e.g. a lambda past any sensible value, or separation) shows
# as RUNAWAY_WINDOW Newton steps in a row whose log-likelihood gains shrink by at least
# RUNAWAY_GAIN_RATIO each, while the parameters that move keep one direction and their steps
# do not shrink (at an optimum Newton's steps shrink with the gains, quadratically), until
# what is left to gain, extrapolated, is below RUNAWAY_GAIN_LEFT relative to the likelihood,
# or a running parameter passes its ceiling (Objective.ceilings: a lambda past 100)
RUNAWAY_WINDOW = 4
RUNAWAY_GAIN_RATIO = 0.8
RUNAWAY_STEP_RATIO = 0.8  # a moving parameter's step at least this times its previous one
RUNAWAY_GAIN_LEFT = 1e-6
RUNAWAY_SHARE = 0.1  # named: parameters that moved at least this share of the largest move


@dataclass(frozen=True)
class EstimateOptions:
    """Optimiser settings (all documented in README: fit options)."""

    method: str = "auto"  # auto | newton | lbfgs
    max_iterations: int = 200
    tolerance: float = 1e-7  # on the Newton decrement sqrt(g' (-H)^-1 g), a scaled gradient norm
    relative_tolerance: float = 1e-15  # on the relative change of the log-likelihood
    max_newton_parameters: int = 3000
    l2_penalty: float = 0.0


@dataclass(frozen=True)
class Iteration:
    """What a progress callback hears after each iteration of the optimiser."""

    number: int  # 1, 2, ... (L-BFGS: each evaluation of the objective)
    log_likelihood: float  # after the iteration (the objective, with any L2 penalty)
    decrement: float  # Newton: the decrement at its start; L-BFGS: the largest |gradient|
    step: float  # Newton: the line search's share of the Newton step (0: none taken);
    # L-BFGS: the length of the move since the previous evaluation
    seconds: float  # since the optimiser started
    method: str  # "newton", "newton (1-in-10 subsample)" or "lbfgs"


Progress = Callable[[Iteration], None]


@dataclass
class Outcome:
    theta: torch.Tensor  # (P,)
    log_likelihood: float
    gradient_norm: float
    iterations: int
    converged: bool
    method: str
    message: str
    seconds: float
    hessian: torch.Tensor | None = None  # (P, P) of the log-likelihood at theta
    runaway: list[int] | None = None  # positions in theta of the parameters that ran away


class Objective:
    """The model's log-likelihood as a function of the free parameters."""

    def __init__(
        self,
        model: Model,
        free: torch.Tensor,  # (P,) positions of the free parameters in the model's layout
        start: torch.Tensor,  # (P_layout,) values of every parameter; fixed ones stay put
        penalised: torch.Tensor,  # (P,) bool
        l2_penalty: float,
        user_groups: torch.Tensor | None = None,  # (P_layout,) owning user, -1: none
        ceilings: torch.Tensor | None = None,  # (P,) a runaway past this magnitude stops at once
    ) -> None:
        self.model = model
        self.free = free
        self.start = start
        self.penalised = penalised.to(start.dtype)
        self.l2_penalty = l2_penalty
        self.user_groups = user_groups
        # (P,) of the free parameters: their Hessian is block-arrowhead (see arrowhead.py)
        self.groups = None if user_groups is None else user_groups[free]
        self.ceilings = ceilings

    def on(self, model: Model, share: float) -> Objective:
        """The same objective on another model holding `share` of the cases."""
        # the penalty shrinks with the likelihood, so it keeps its weight against it
        penalty = self.l2_penalty * share
        return Objective(
            model,
            self.free,
            self.start,
            self.penalised.bool(),
            penalty,
            self.user_groups,
            self.ceilings,
        )

    def expand(self, theta: torch.Tensor) -> torch.Tensor:  # (P_layout,)
        return self.start.index_put((self.free,), theta)

    def value_and_gradient(self, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, gradient = self.model.value_and_gradient(self.expand(theta))
        gradient = gradient[self.free]  # (P,)
        if self.l2_penalty:
            value = value - 0.5 * self.l2_penalty * (self.penalised * theta**2).sum()
            gradient = gradient - self.l2_penalty * self.penalised * theta
        return float(value), gradient

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:  # (P, P)
        full = self.model.hessian(self.expand(theta))
        hessian = full[self.free][:, self.free]
        if self.l2_penalty:
            hessian = hessian - torch.diag(self.l2_penalty * self.penalised)
        return hessian


def maximise(
    objective: Objective,
    theta: torch.Tensor,
    options: EstimateOptions,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    progress: Progress | None = None,
    warm_start: bool = False,
) -> Outcome:
    """Maximise the objective from theta; Newton where the parameter count allows.

    warm_start: Newton starts from a fit on every 10th case (decided by `warm_start_applies`).
    """
    method = options.method
    size = newton_size(theta.numel(), objective.groups)
    if method == "auto":
        method = "newton" if size <= newton_limit(objective.model, options) else "lbfgs"
    started = time.perf_counter()
    report = None if progress is None else _Reporter(progress, started)
    if method == "newton":
        start, first_hessian = theta, None
        if warm_start:
            start, first_hessian = _warm_start(objective, theta, options, lower, upper, report)
        objective.model.drop_subsamples()  # the rank check and warm start are done with them
        outcome = _newton(objective, start, options, lower, upper, report, first_hessian)
        if start is not theta:
            outcome.method = "newton from a 1-in-10 subsample fit"
    else:
        outcome = _lbfgs(objective, theta, options, lower, upper, report)
        if size <= options.max_newton_parameters and outcome.runaway is None:
            # polish with Newton: its Hessian is needed for standard errors anyway, and the
            # Newton decrement is a scale-free convergence test
            polished = _newton(objective, outcome.theta, options, lower, upper, report)
            polished.iterations += outcome.iterations
            polished.method = "lbfgs+newton"
            outcome = polished
    outcome.seconds = time.perf_counter() - started
    return outcome


def newton_limit(model: Model, options: EstimateOptions) -> int:
    """The most free parameters `method auto` fits by Newton on this model."""
    analytic = model.analytic_hessian_limit
    if analytic == 0:  # every Hessian by autograd: Newton only while that is cheap
        cheap = model.n_rows * model.n_parameters <= AUTOGRAD_NEWTON_VALUES
        return min(options.max_newton_parameters, AUTOGRAD_NEWTON_PARAMETERS if cheap else 0)
    if analytic is None:
        return options.max_newton_parameters
    return min(options.max_newton_parameters, analytic)


def newton_size(n_free: int, groups: torch.Tensor | None) -> int:
    """The parameters a Newton step factors densely: all n_free, or where `groups` (n_free,)
    gives per-user coefficients (arrowhead.py), the shared ones and the most of one user's."""
    if groups is None or n_free > ARROWHEAD_NEWTON_PARAMETERS:
        return n_free
    owned = groups[groups >= 0]  # (S,)
    if owned.numel() < MIN_GROUPED_PARAMETERS:
        return n_free
    return n_free - int(owned.numel()) + int(torch.bincount(owned).max())


def warm_start_applies(model: Model, n_parameters: int) -> bool:
    """Whether Newton should start from a fit on every 10th case (see _warm_start): decided
    once, before the rank check, which then knows whether Newton starts at theta = 0.

    Never with user-specific terms, by measurement (issue 14, CPU seconds of the whole fit,
    one thread, warm start forced on against off): the tutorial's conditional logit (10k
    cases, 100 users) 1.96 against 1.12 s, users_1k (100k cases, 1,000 users) 2.05 against
    1.29 s, the same optimum either way. A tenth of each user's cases pins its coefficients
    poorly, so the full fit still needs as many steps, and the subsample's are extra.
    """
    n_cases = model.n_cases
    return (
        model.can_subsample
        and not model.by_user  # measured: slower with user terms, see above
        and n_cases >= WARM_START_CASES
        and n_cases >= WARM_START_EVERY * WARM_START_CASES_PER_PARAMETER * n_parameters
    )


class _Reporter:
    """Numbers the iterations across the optimiser's stages and stamps their time."""

    def __init__(self, progress: Progress, started: float) -> None:
        self.progress = progress
        self.started = started

    def __call__(self, number, value, decrement, step, method) -> None:
        seconds = time.perf_counter() - self.started
        self.progress(Iteration(number, value, decrement, step, seconds, method))


def _warm_start(objective, theta, options, lower, upper, report=None):
    """Newton on every 10th case first, when there are many cases per parameter: returns the
    start of the full fit and a Hessian for its first step (or theta and None).

    Its optimum lies within a few standard errors of the full one, so the full fit then
    needs two or three Newton steps instead of five or six; each subsample step costs a tenth
    of a full one. The subsample's Hessian at its optimum, scaled up to all cases, serves the
    first full step (its direction, never a convergence test or standard errors). Models with
    user-specific terms are left alone: a tenth of each user's cases may not identify them.
    """
    smaller = objective.model.subsample(WARM_START_EVERY)
    if smaller is None:
        return theta, None
    share = float(smaller.case_weights.sum() / objective.model.case_weights.sum())
    loose = replace(options, tolerance=max(options.tolerance, WARM_START_TOLERANCE))
    label = "newton (1-in-10 subsample)"
    outcome = _newton(objective.on(smaller, share), theta, loose, lower, upper, report, None, label)
    if not (outcome.converged and torch.isfinite(outcome.theta).all()):
        return theta, None
    scaled = None if outcome.hessian is None else outcome.hessian / share
    return outcome.theta, scaled


def _clip(theta: torch.Tensor, lower: torch.Tensor | None, upper: torch.Tensor | None):
    if lower is not None:
        theta = torch.maximum(theta, lower)
    if upper is not None:
        theta = torch.minimum(theta, upper)
    return theta


def _held_at_bound(theta, gradient, lower, upper) -> torch.Tensor:
    """Parameters at a bound whose gradient points out of the feasible set. (P,) bool"""
    held = torch.zeros_like(theta, dtype=torch.bool)
    if lower is not None:
        held |= (theta <= lower) & (gradient < 0)
    if upper is not None:
        held |= (theta >= upper) & (gradient > 0)
    return held


def _newton_direction(
    gradient: torch.Tensor, hessian: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Solve (-H) d = g; by blocks where `groups` gives per-user coefficients, else densely,
    adding a growing ridge where -H is not positive definite."""
    information = -hessian
    scale = float(information.diagonal().abs().max().clamp_min(1e-12))
    parts = None if groups is None else split_arrowhead(information, groups)
    ridge = 0.0
    for _ in range(30):
        if parts is not None:  # by blocks, the ridge on every block's diagonal
            factor = parts.factor(ridge) or (parts.factor(absolute=True) if not ridge else None)
            if factor is not None:
                return factor.solve(gradient)
            ridge = scale * 1e-10 if ridge == 0.0 else ridge * 10.0
            continue
        ridged = information
        if ridge:
            ridged = information.clone()
            ridged.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(ridged)
        if int(info) == 0:
            return torch.cholesky_solve(gradient[:, None], factor)[:, 0]
        ridge = scale * 1e-10 if ridge == 0.0 else ridge * 10.0
    return gradient / scale


def _step(theta, gradient, hessian, lower, upper, groups=None) -> tuple[torch.Tensor, float]:
    """Newton direction (P,) and decrement; a parameter held at a bound by its gradient stays
    there, Newton moves the others."""
    moving = ~_held_at_bound(theta, gradient, lower, upper)  # (P,)
    if bool(moving.all()):  # no parameter at a bound: no copies of the Hessian
        direction = _newton_direction(gradient, hessian, groups)
        return direction, math.sqrt(max(float(gradient @ direction), 0.0))
    direction = torch.zeros_like(theta)
    direction[moving] = _newton_direction(
        gradient[moving], hessian[moving][:, moving], None if groups is None else groups[moving]
    )
    return direction, math.sqrt(max(float(gradient @ direction), 0.0))


def _newton(
    objective, theta, options, lower, upper, report, first_hessian=None, label="newton"
) -> Outcome:
    """Newton with a backtracking line search; `first_hessian` (an approximation) may serve
    the first step's direction, never a convergence test or the returned Hessian. Stops at a
    runaway (see RUNAWAY_WINDOW), naming the parameters that run away."""
    value, gradient = objective.value_and_gradient(theta)
    message = f"reached the iteration cap ({options.max_iterations}); raise --max-iter"
    converged = False
    hessian = None
    decrement = math.inf
    iteration = 0
    gains: list[float] = []  # of the accepted steps, for the runaway test
    moves: list[torch.Tensor] = []  # (P,) each
    runaway = None
    for iteration in range(1, options.max_iterations + 1):
        borrowed = first_hessian is not None
        hessian = first_hessian if borrowed else objective.hessian(theta)
        first_hessian = None
        direction, decrement = _step(theta, gradient, hessian, lower, upper, objective.groups)
        if borrowed and decrement <= math.sqrt(options.tolerance):  # tests need the real one
            borrowed, hessian = False, objective.hessian(theta)
            direction, decrement = _step(theta, gradient, hessian, lower, upper, objective.groups)
        if decrement <= options.tolerance:
            converged, message = True, "gradient norm below tolerance"
            if report:
                report(iteration, value, decrement, 0.0, label)
            break
        step, accepted = 1.0, False
        for _ in range(60):
            candidate = _clip(theta + step * direction, lower, upper)
            new_value, new_gradient = objective.value_and_gradient(candidate)
            if math.isfinite(new_value) and new_value >= value + 1e-4 * float(
                gradient @ (candidate - theta)
            ):
                accepted = True
                break
            step *= 0.5
        if report:
            report(iteration, new_value if accepted else value, decrement,
                   step if accepted else 0.0, label)  # fmt: skip
        if not accepted and borrowed:
            continue  # the approximation led nowhere: the next iteration takes the real one
        if not accepted:
            converged = decrement < 1e-4 * max(1.0, math.sqrt(abs(value)))
            message = (
                "no further improvement possible (rounding); gradient norm small"
                if converged
                else "line search failed; the model may be unidentified or ill-conditioned"
            )
            break
        change = abs(new_value - value) / max(abs(value), 1.0)
        gains.append(new_value - value)
        moves.append(candidate - theta)
        theta, value, gradient = candidate, new_value, new_gradient
        if change <= options.relative_tolerance and decrement <= math.sqrt(options.tolerance):
            converged, message = True, "relative change of the log-likelihood below tolerance"
            # a tiny last step leaves the Hessian as it was to far below any reported digit:
            # keep it for the standard errors rather than recompute it
            n_cases = objective.model.n_cases
            if decrement > STALE_HESSIAN_DECREMENT * math.sqrt(n_cases):
                hessian = objective.hessian(theta)
            break
        runaway = _runaway(gains, moves, value, theta, objective.ceilings)
        if runaway is not None:
            message = (
                "runaway: the log-likelihood approaches a limit while some parameters grow "
                "without bound (no finite optimum)"
            )
            break
    return Outcome(theta, value, decrement, iteration, converged, "newton", message, 0.0, hessian,
                   runaway)  # fmt: skip


def _runaway(
    gains: list[float],
    moves: list[torch.Tensor],  # (P,) each
    value: float,
    theta: torch.Tensor,  # (P,)
    ceilings: torch.Tensor | None,  # (P,)
) -> list[int] | None:
    """Positions of the parameters running away along a direction of recession, or None.

    The last RUNAWAY_WINDOW steps each gained at most RUNAWAY_GAIN_RATIO of the one before,
    while the parameters that moved most kept their direction and did not slow down; and
    either the gains, summed on, leave less than RUNAWAY_GAIN_LEFT relative to gain, or one
    of those parameters is past its ceiling.
    """
    if len(gains) < RUNAWAY_WINDOW:
        return None
    recent = torch.tensor(gains[-RUNAWAY_WINDOW:], dtype=torch.float64)  # (W,)
    if not bool((recent > 0).all()):
        return None
    ratios = recent[1:] / recent[:-1]  # (W - 1,)
    ratio = float(ratios.max())
    if ratio > RUNAWAY_GAIN_RATIO:
        return None
    left = float(recent[-1]) * ratio / (1.0 - ratio)  # what the gains, summed on, still add
    settled = left <= RUNAWAY_GAIN_LEFT * max(1.0, abs(value))
    steps = torch.stack(moves[-RUNAWAY_WINDOW:]).cpu()  # (W, P)
    moved = steps.abs().sum(dim=0)  # (P,)
    largest = moved.max()
    if not float(largest) > 0:
        return None
    keeps_direction = (torch.sign(steps) == torch.sign(steps[-1])).all(dim=0) & (steps[-1] != 0)
    keeps_pace = (steps[1:].abs() >= RUNAWAY_STEP_RATIO * steps[:-1].abs()).all(dim=0)
    running = (moved >= RUNAWAY_SHARE * largest) & keeps_direction & keeps_pace  # (P,)
    if not bool(running[moved.argmax()]):  # the largest move slows down: converging
        return None
    past = False
    if ceilings is not None:
        past = bool((running & (theta.cpu().abs() >= ceilings.cpu())).any())
    return running.nonzero().flatten().tolist() if settled or past else None


def _lbfgs(objective, theta, options, lower, upper, report) -> Outcome:
    """L-BFGS with strong-Wolfe line search on the negative log-likelihood."""
    point = theta.clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [point],
        lr=1.0,
        max_iter=options.max_iterations * 10,
        history_size=30,
        tolerance_grad=options.tolerance * 1e-3,
        tolerance_change=options.relative_tolerance,
        line_search_fn="strong_wolfe",
    )
    evaluations = 0
    previous = None  # (P,) the point of the previous evaluation

    def closure() -> torch.Tensor:
        nonlocal evaluations, previous
        evaluations += 1
        optimiser.zero_grad()
        with torch.no_grad():
            value, gradient = objective.value_and_gradient(_clip(point.detach(), lower, upper))
        point.grad = -gradient
        if report:
            moved = 0.0 if previous is None else float((point.detach() - previous).norm())
            report(evaluations, value, float(gradient.abs().max()), moved, "lbfgs")
        previous = point.detach().clone()
        return torch.tensor(-value, dtype=point.dtype)

    optimiser.step(closure)
    theta = _clip(point.detach(), lower, upper)
    value, gradient = objective.value_and_gradient(theta)
    gradient_norm = float(gradient.abs().max())
    iterations = int(optimiser.state[point].get("n_iter", evaluations))
    converged = gradient_norm <= max(options.tolerance, 1e-6)
    message = (
        "gradient norm below tolerance"
        if converged
        else f"L-BFGS stopped with gradient norm {gradient_norm:.3g}; raise --max-iter"
    )
    return Outcome(theta, value, gradient_norm, iterations, converged, "lbfgs", message, 0.0)


def covariance(
    hessian: torch.Tensor, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, bool]:
    """Inverse of the observed information -H; (covariance, whether -H was positive definite).
    By blocks where `groups` (P,) gives per-user coefficients (see arrowhead.py)."""
    information = -hessian
    if groups is not None and (factor := factor_arrowhead(information, groups)) is not None:
        return factor.inverse(), True
    factor, info = torch.linalg.cholesky_ex(information)
    if int(info) == 0:
        return torch.cholesky_inverse(factor), True
    return torch.linalg.pinv(information, hermitian=True), False
