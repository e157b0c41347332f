"""Which coefficients the data can estimate, and why not: data reasons and a rank check.

Data reasons, read from the rows: a user with a single case (their coefficients would run off
to infinity), an alternative nobody chose (its intercept would run off to -infinity).

The rank check: at theta = 0 the information matrix -H is sum_n Z_n' (I/J_n - 11'/J_n^2) Z_n,
whose null space is every direction that leaves all within-case utility differences unchanged.
A greedy Cholesky in layout order keeps a parameter only when it adds a direction the earlier
ones do not span: one factorisation that skips the columns it does not keep.

Notation: P parameters of the layout, C candidates of the rank check, k of them kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from choicecli.design import Block, Parameter
from choicecli.errors import ModelError
from choicecli.models import ConditionalLogit
from choicecli.problem import Problem

ZERO_TOLERANCE = 1e-11
DEPENDENCE_TOLERANCE = 1e-9
MAX_RANK_CHECK_PARAMETERS = 6000
RANK_CHECK_SUBSAMPLE_CASES = 100_000  # from here the rank check looks at every 10th case first
FACTOR_BLOCK = 64  # columns per panel of the greedy factorisation


@dataclass(frozen=True)
class Dependence:
    """A parameter the data cannot estimate, with the reason and what it depends on."""

    index: int  # position in the layout
    cancels: bool  # its column never varies within a case
    partners: tuple[int, ...]  # earlier kept parameters it is a combination of


def dependent_parameters(
    information: torch.Tensor, candidates: torch.Tensor, second_moments: torch.Tensor
) -> list[Dependence]:
    """Greedy order-preserving rank check of information[candidates][:, candidates].

    A parameter cancels when its within-case variation is negligible against its own
    magnitude (`second_moments`: the sum of its squared design values), whatever its scale.
    """
    block = information[candidates][:, candidates]
    magnitude = second_moments[candidates].clamp_min(0).sqrt()  # (C,)
    magnitude = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    relative = block.diagonal().clamp_min(0) / magnitude**2  # within-case share of variation
    cancels = relative <= ZERO_TOLERANCE
    diagonal = block.diagonal().clamp_min(0)
    scale = torch.where(cancels, torch.ones_like(diagonal), diagonal.sqrt())
    scaled = block / scale[:, None] / scale[None, :]  # unit diagonal where it varies
    varying = (~cancels).nonzero().flatten()
    found = [Dependence(int(candidates[i]), True, ()) for i in cancels.nonzero().flatten()]
    factor, kept = greedy_factor(scaled[varying][:, varying], DEPENDENCE_TOLERANCE)
    if bool(kept.all()):
        return found
    kept_positions = kept.nonzero().flatten()  # (k,)
    dependent_positions = (~kept).nonzero().flatten()  # (d,)
    # each dependent column's regression on the kept ones before it: L_kept' w = its row of L
    # (zero past its own position, so one solve serves every dependent column)
    kept_factor = factor[kept_positions][:, kept_positions]  # (k, k) lower triangular
    rows = factor[dependent_positions][:, kept_positions]  # (d, k)
    weights = torch.linalg.solve_triangular(kept_factor.T, rows.T, upper=True)  # (k, d)
    strongest = weights.abs()
    linked = strongest > 1e-6 * strongest.amax(dim=0, keepdim=True)  # (k, d)
    for column, position in enumerate(dependent_positions.tolist()):
        partners = kept_positions[linked[:, column]].tolist()
        found.append(
            Dependence(
                int(candidates[varying[position]]),
                False,
                tuple(int(candidates[varying[p]]) for p in partners),
            )
        )
    return sorted(found, key=lambda item: item.index)


def greedy_factor(matrix: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of a symmetric (C, C) matrix that skips every column whose pivot (its
    variance left after the kept columns before it) is at most `tolerance`.

    Left-looking by panels of FACTOR_BLOCK columns: each panel takes the finished columns'
    share in one product, then a panel whose pivots all pass is factored by LAPACK at once,
    else column by column (a matrix-vector product each): as much work as one Cholesky
    factorisation. A matrix whose pivots all pass is LAPACK's factor at once. Returns the
    lower-triangular factor, zero in skipped columns, and which columns were kept.
    ((C, C), (C,) bool)
    """
    size = matrix.shape[0]
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0 and bool((factor.diagonal() ** 2 > tolerance).all()):
        return factor, torch.ones(size, dtype=torch.bool, device=matrix.device)
    work = matrix.clone()
    kept = torch.zeros(size, dtype=torch.bool, device=matrix.device)
    for start in range(0, size, FACTOR_BLOCK):
        stop = min(start + FACTOR_BLOCK, size)
        panel = work[start:, start:stop]  # (C - start, b) view
        if start:  # left-looking: the finished columns' share, rows start.. only
            panel.addmm_(work[start:, :start], work[start:stop, :start].T, alpha=-1.0)
        if not _factor_whole_panel(panel, tolerance):
            _factor_panel_by_columns(panel, tolerance)
        kept[start:stop] = panel.diagonal() != 0
    return work.tril(), kept


def _factor_whole_panel(panel: torch.Tensor, tolerance: float) -> bool:
    """Factor a panel (rows j.., its b columns) in place when every pivot is above the
    tolerance: LAPACK's Cholesky of its top block, then a triangular solve below it."""
    width = panel.shape[1]
    factor, info = torch.linalg.cholesky_ex(panel[:width])
    if int(info) != 0 or not bool((factor.diagonal() ** 2 > tolerance).all()):
        return False
    below = panel[width:]  # (rest, b)
    below.copy_(torch.linalg.solve_triangular(factor, below.T, upper=False).T)
    panel[:width] = factor
    return True


def _factor_panel_by_columns(panel: torch.Tensor, tolerance: float) -> None:
    """Factor a panel in place column by column, zeroing each column whose pivot is at most
    the tolerance (the earlier panels' share is already taken off)."""
    for local in range(panel.shape[1]):
        column = panel[local:, local]  # rows j.. of column j, a view
        if local:
            column -= panel[local:, :local] @ panel[local, :local]
        pivot = float(column[0])
        if pivot > tolerance:
            column /= math.sqrt(pivot)
        else:
            column.zero_()


def data_reasons(problem: Problem) -> dict[int, str]:
    """Parameters the rows show to be inestimable (read before a model takes them over)."""
    reasons: dict[int, str] = {}
    _single_case_users(problem, reasons)
    _never_chosen(problem, reasons)
    return reasons


def unidentified_parameters(
    problem: Problem,
    warnings: list[str],
    reasons: dict[int, str],
    model: ConditionalLogit | None = None,
    newton_starts_at_zero: bool = False,
) -> list[int]:
    """Positions of parameters the data cannot estimate (`reasons` and the rank check's), with
    one warning per term; a ModelError when nothing is left to estimate.

    model: the fit's own conditional logit, or None for the problem's identification model.
    newton_starts_at_zero: the fit's Newton takes its first step at theta = 0 on `model`, so
    the Hessian there is computed on all cases anyway (and kept for that step).
    """
    _check_some_case_counts(problem)
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
        reused = model is not None and newton_starts_at_zero
        model = model or problem.identification_model()
        for found in _rank_check(model, candidates, len(problem.parameters), not reused):
            reasons[found.index] = _dependence_reason(problem, found)
    by_term = _reasons_by_term(problem, reasons)
    _check_something_is_estimable(problem, reasons, by_term)
    for term, term_reasons in by_term.items():
        distinct = list(dict.fromkeys(term_reasons))
        count = len(term_reasons)
        shown = "; ".join(distinct[:2]) + (" ..." if len(distinct) > 2 else "")
        counted = f"{count:,} coefficients" if count > 1 else "1 coefficient"
        warnings.append(f"{term}: {counted} not estimated: {shown}")
    return sorted(reasons)


def _reasons_by_term(problem: Problem, reasons: dict[int, str]) -> dict[str, list[str]]:
    by_term: dict[str, list[str]] = {}
    for index, reason in sorted(reasons.items()):
        parameter = problem.parameters[index]
        by_term.setdefault(f"{parameter.term} ({parameter.level} level)", []).append(reason)
    return by_term


def _check_something_is_estimable(
    problem: Problem, reasons: dict[int, str], by_term: dict[str, list[str]]
) -> None:
    """Every coefficient (lambdas aside) unidentified: nothing to fit, and the fit says why."""
    lambdas = set() if problem.lambda_index is None else set(problem.lambda_index.tolist())
    free = [i for i, fixed in enumerate(problem.fixed.tolist()) if not fixed and i not in lambdas]
    if not free or any(i not in reasons for i in free):
        return
    why = "; ".join(f"{term}: {list(dict.fromkeys(found))[0]}" for term, found in by_term.items())
    raise ModelError(f"nothing is estimable: every coefficient is unidentified ({why})")


def _check_some_case_counts(problem: Problem) -> None:
    """Case weights that are all zero leave no likelihood to maximise at all."""
    weights = problem.data.case_weights
    if weights is not None and weights.numel() and not bool((weights > 0).any()):
        name = problem.spec.roles.weights
        raise ModelError(
            f"nothing is estimable: every case has weight zero (--weights {name!r}); "
            "give the cases to fit a positive weight"
        )


def _rank_check(model, candidates: torch.Tensor, n_parameters: int, subsample: bool) -> list:
    """Dependent parameters at theta = 0, on every 10th case first when there are many.

    The information of a tenth of the cases is a sum of positive semi-definite terms over
    fewer cases, so it is at most the full information: when every parameter passes there,
    all pass on the full data and its Hessian is not needed.
    """
    zero = torch.zeros(n_parameters, dtype=torch.float64)
    if subsample and model.n_cases >= RANK_CHECK_SUBSAMPLE_CASES:
        smaller = model.subsample(10)
        if not dependent_parameters(-smaller.hessian(zero), candidates, smaller.second_moments()):
            return []
    return dependent_parameters(-model.hessian(zero), candidates, model.second_moments())


def _dependence_reason(problem: Problem, found: Dependence) -> str:
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


SEPARATING_SHOWN = 4  # coefficients named in the perfect-prediction warning


def separating_terms(problem: Problem, free: torch.Tensor, hessian: torch.Tensor | None) -> str:
    """The coefficients along the flattest direction of the likelihood, where estimates run
    away under perfect prediction, each with its column (and alternative, user)."""
    if hessian is None or hessian.shape[0] > 2000:
        return "some coefficients"
    information = -hessian.cpu()
    scale = information.diagonal().abs().clamp_min(1e-300).sqrt()
    _, vectors = torch.linalg.eigh(information / scale[:, None] / scale[None, :])
    weakest = vectors[:, 0].abs()  # (P,) eigenvector of the smallest eigenvalue
    chosen = free[(weakest > 0.3 * weakest.max()).cpu()].tolist()
    names = list(dict.fromkeys(_coefficient_name(problem.parameters[i]) for i in chosen))
    shown = ", ".join(names[:SEPARATING_SHOWN])
    if len(names) > SEPARATING_SHOWN:
        shown += f" and {len(names) - SEPARATING_SHOWN} more"
    return shown or "some coefficients"


def _coefficient_name(parameter: Parameter) -> str:
    """A coefficient's term with the column it multiplies, e.g. "price[constant] (column
    'price')" or "intercept[item] (alternative 'bus')"."""
    where = []
    if parameter.feature not in (None, "intercept"):
        where.append(f"column {parameter.feature!r}")
    if parameter.item is not None:
        kind = "nest" if parameter.level == "nest" else "alternative"
        where.append(f"{kind} {parameter.item!r}")
    if parameter.user is not None:
        where.append(f"user {parameter.user!r}")
    return parameter.term + (f" ({', '.join(where)})" if where else "")
