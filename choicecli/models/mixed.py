"""Mixed logit: simulated log-likelihood, analytic gradient, Hessian, and a small fitter. No I/O.

Notation: S rows (case x offered alternative), N cases, U units that get their own draws (users
for a panel; the cases themselves without users), T cases per unit at most, J alternatives per
case at most, R draws per unit, B draws in a batch, Kf fixed and Kr random coefficients,
K = Kf + Kr, P parameters.

Rows are laid out in a padded grid of U x T x J slots (a unit's cases, each case's alternatives);
a missing alternative is a slot with utility -inf, a missing case (a unit with fewer than T cases)
is one slot that is always chosen with probability 1 and no data, so it adds nothing.

Parameters, in this order (the layout `theta` (P,)):
  fixed coefficients (Kf), means of the random ones (Kr), spreads of the random ones (Kr),
  then with correlated=True the below-diagonal entries of the Cholesky factor L among the normal
  ones, row by row ((1,0), (2,0), (2,1), ...); the diagonal of L is their spreads.
A random coefficient is beta(mean, spread, t) with t its standard draw (see choicecli.draws):
normal mean + sd z; lognormal exp(mean + sd z); uniform and triangular mean + spread t;
truncated normal below at 0. Correlated normals: beta_N = mean_N + L z_N.

The simulated likelihood of unit u is L_u = (1/R) sum_r prod_{cases n of u} P_n(beta_ur); its log
is computed as logsumexp_r(sum_n log P_n(beta_ur)) - log R, draws taken in batches of B and
combined with a running logsumexp, so memory grows with U x T x J x B. The score of unit u is
sum_r w_ur d log P_u(beta_ur) / d theta with w_ur = P_u(beta_ur) / sum_r' P_u(beta_ur'), the
softmax over draws; the batches are combined as the logsumexp is (online softmax).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from choicecli import draws as draws_module
from choicecli.errors import DataError, ModelError

DEFAULT_MEMORY_BUDGET = 512 * 2**20  # bytes the slots x draws tensors of one batch may take
BYTES_PER_SLOT_DRAW = 8 * 3  # float64 utilities (then exponentials, probabilities), and spare
DEFAULT_DRAW_BATCH = 50  # draws per batch unless memory asks for fewer: faster than more (cache)
# the fast path caps utility differences to the chosen alternative here: exp(500) cannot
# overflow a sum of fewer than 1e90 alternatives; P < exp(-500) reads as exp(-500)
UTILITY_GAP_LIMIT = 500.0
NONLINEAR = ("lognormal", "truncated_normal")  # d beta / d mean is not 1


@dataclass(frozen=True)
class MixedSpec:
    """Which coefficients are random, how, and the parameter layout that follows."""

    n_fixed: int
    distributions: tuple[str, ...]  # one per random column
    correlated: bool = False  # a full Cholesky factor among the normal ones

    def __post_init__(self) -> None:
        for distribution in self.distributions:
            if distribution not in draws_module.DISTRIBUTIONS:
                raise ModelError(
                    f"unknown distribution '{distribution}'; use one of "
                    f"{', '.join(draws_module.DISTRIBUTIONS)}"
                )

    @property
    def n_random(self) -> int:
        return len(self.distributions)

    @property
    def normal_columns(self) -> tuple[int, ...]:
        """The random columns in the Cholesky block (normal ones, when correlated)."""
        if not self.correlated:
            return ()
        return tuple(k for k, name in enumerate(self.distributions) if name == "normal")

    @property
    def cholesky_pairs(self) -> tuple[tuple[int, int], ...]:
        """(row, column) of each below-diagonal Cholesky entry, as random column indices."""
        normal = self.normal_columns
        return tuple((normal[i], normal[j]) for i in range(len(normal)) for j in range(i))

    @property
    def n_parameters(self) -> int:
        return self.n_fixed + 2 * self.n_random + len(self.cholesky_pairs)

    def labels(self, fixed_names: list[str], random_names: list[str]) -> list[tuple[str, str]]:
        """(coefficient, role) per parameter; role is fixed, mean, sd (spread) or cholesky
        (an entry 'row,column' of L, named by the row's coefficient and the column's)."""
        labels = [(name, "fixed") for name in fixed_names]
        labels += [(name, "mean") for name in random_names]
        labels += [(name, "sd") for name in random_names]
        labels += [(f"{random_names[row]},{random_names[col]}", "cholesky")
                   for row, col in self.cholesky_pairs]  # fmt: skip
        return labels

    def initial(self, dtype=torch.float64, device=None, value: float = 0.1) -> torch.Tensor:
        """Start values: every parameter `value` (xlogit starts at 0.1). (P,)"""
        return torch.full((self.n_parameters,), value, dtype=dtype, device=device)

    def covariance(self, theta: torch.Tensor) -> torch.Tensor:
        """L L^T among the Cholesky block's coefficients (normal ones when correlated, in
        column order), or diag(sd^2) of all random ones otherwise. (Kn, Kn)"""
        factor = self.cholesky_factor(theta)
        return factor @ factor.T

    def cholesky_factor(self, theta: torch.Tensor) -> torch.Tensor:
        """L: lower-triangular, the spreads on its diagonal. (Kn, Kn)"""
        spreads = theta[self.n_fixed + self.n_random : self.n_fixed + 2 * self.n_random]
        if not self.correlated:
            return torch.diag(spreads)
        normal = list(self.normal_columns)
        factor = torch.diag(spreads[normal])
        if not self.cholesky_pairs:
            return factor
        position = {column: i for i, column in enumerate(normal)}
        rows = [position[row] for row, _ in self.cholesky_pairs]
        cols = [position[col] for _, col in self.cholesky_pairs]
        factor[rows, cols] = theta[self.n_fixed + 2 * self.n_random :]
        return factor


@dataclass
class MixedData:
    """A long table laid out in U x T x J slots, with K = Kf + Kr design columns per slot."""

    design: torch.Tensor  # (U, T*J, K) float64, zero in empty slots
    random_design_t: torch.Tensor  # (U, Kr, T*J) the random columns, transposed for bmm
    # x minus the x of the case's chosen row (0 in empty slots): utilities relative to the
    # chosen alternative's come from one product, and sum_j p_j x_j - x_chosen is sum_j p_j d_j
    difference_random: torch.Tensor  # (U, T*J, Kr)
    difference_fixed: torch.Tensor  # (U, T*J, Kf)
    difference_t: torch.Tensor  # (U, K, T*J)
    blocked: torch.Tensor  # (U, T*J) 0 where offered, -inf where not
    chosen_slot: torch.Tensor  # (U, T, 1) long: the chosen alternative's place in each case
    chosen_indicator: torch.Tensor  # (U, T*J) float64 1 at chosen slots (padded cases too)
    chosen_design: torch.Tensor  # (U, K) sum of the chosen rows' x per unit
    any_blocked: bool  # some slot is not offered
    slot_of_row: torch.Tensor  # (S,) long: each row's slot, u * T * J + t * J + j
    unit_of_case: torch.Tensor  # (N,) long
    n_cases_per_unit: int  # T
    n_alternatives: int  # J
    n_fixed: int
    n_random: int
    n_rows: int
    n_cases: int
    extra: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return self.design.shape[0]

    @property
    def device(self) -> torch.device:
        return self.design.device


def mixed_data(
    fixed_design: torch.Tensor,  # (S, Kf)
    random_design: torch.Tensor,  # (S, Kr)
    case: torch.Tensor,  # (S,) long codes 0 .. N-1
    chosen: torch.Tensor,  # (S,) 0/1
    user_of_case: torch.Tensor | None = None,  # (N,) long codes 0 .. U-1; None: draws per case
) -> MixedData:
    """Lay a long table out in slots. Rows may come in any order; the device is the inputs'."""
    device = random_design.device
    dtype = torch.float64
    n_rows = case.shape[0]
    case = case.to(device=device, dtype=torch.int64)
    n_cases = int(case.max().item()) + 1 if n_rows else 0
    rows_per_case = torch.bincount(case, minlength=n_cases)  # (N,)
    if n_rows == 0 or bool((rows_per_case == 0).any()):
        missing = int(torch.nonzero(rows_per_case == 0)[0].item()) if n_rows else 0
        raise DataError(f"case code {missing} has no rows; case codes must be 0 .. N-1")
    chosen_per_case = torch.bincount(case, weights=chosen.to(device, dtype), minlength=n_cases)
    bad = torch.nonzero(chosen_per_case != 1)
    if bad.numel():
        first = int(bad[0].item())
        raise DataError(
            f"case code {first} has {chosen_per_case[first].item():g} chosen rows; "
            "each case needs exactly one"
        )
    if user_of_case is None:
        unit_of_case = torch.arange(n_cases, device=device)
    else:
        unit_of_case = user_of_case.to(device=device, dtype=torch.int64)
        if unit_of_case.shape[0] != n_cases:
            raise DataError(f"user_of_case has {unit_of_case.shape[0]} entries for {n_cases} cases")
    n_units = int(unit_of_case.max().item()) + 1
    cases_per_unit = torch.bincount(unit_of_case, minlength=n_units)  # (U,)
    if bool((cases_per_unit == 0).any()):
        missing = int(torch.nonzero(cases_per_unit == 0)[0].item())
        raise DataError(f"user code {missing} has no cases; user codes must be 0 .. U-1")

    n_alternatives = int(rows_per_case.max().item())  # J
    n_per_unit = int(cases_per_unit.max().item())  # T
    # place of each row within its case, and of each case within its unit (stable sorts)
    row_order = torch.argsort(case, stable=True)  # (S,)
    case_start = torch.cumsum(rows_per_case, 0) - rows_per_case  # (N,)
    row_place = torch.empty(n_rows, dtype=torch.int64, device=device)
    row_place[row_order] = torch.arange(n_rows, device=device) - case_start[case[row_order]]
    case_order = torch.argsort(unit_of_case, stable=True)  # (N,)
    unit_start = torch.cumsum(cases_per_unit, 0) - cases_per_unit  # (U,)
    case_place = torch.empty(n_cases, dtype=torch.int64, device=device)
    case_place[case_order] = (
        torch.arange(n_cases, device=device) - unit_start[unit_of_case[case_order]]
    )

    n_slots = n_units * n_per_unit * n_alternatives
    case_slot = (unit_of_case * n_per_unit + case_place) * n_alternatives  # (N,) first slot
    slot_of_row = case_slot[case] + row_place  # (S,)
    n_fixed, n_random = fixed_design.shape[1], random_design.shape[1]
    design = torch.zeros((n_slots, n_fixed + n_random), dtype=dtype, device=device)
    design[slot_of_row, :n_fixed] = fixed_design.to(device, dtype)
    design[slot_of_row, n_fixed:] = random_design.to(device, dtype)
    offered = torch.zeros(n_slots, dtype=torch.bool, device=device)
    offered[slot_of_row] = True
    chosen_indicator = torch.zeros(n_slots, dtype=dtype, device=device)
    chosen_indicator[slot_of_row] = chosen.to(device, dtype)
    # padded cases: slot 0 offered and chosen, no data: probability 1, no contribution
    grid = (n_units, n_per_unit, n_alternatives)
    present = torch.zeros((n_units, n_per_unit), dtype=torch.bool, device=device)
    present[unit_of_case, case_place] = True
    offered.view(grid)[..., 0] |= ~present
    chosen_indicator.view(grid)[..., 0] += (~present).to(dtype)
    chosen_slot = chosen_indicator.view(grid).argmax(dim=2, keepdim=True)  # (U, T, 1)
    blocked = torch.zeros(n_slots, dtype=dtype, device=device)
    blocked[~offered] = -torch.inf
    design = design.view(n_units, n_per_unit * n_alternatives, n_fixed + n_random)
    chosen_case_design = torch.bmm(
        chosen_indicator.view(n_units * n_per_unit, 1, n_alternatives),
        design.view(n_units * n_per_unit, n_alternatives, -1),
    )  # (U*T, 1, K)
    difference = design.view(n_units * n_per_unit, n_alternatives, -1) - chosen_case_design
    difference = difference.view(design.shape) * offered.view(n_units, -1, 1)  # (U, T*J, K)
    return MixedData(
        design=design,
        random_design_t=design[:, :, n_fixed:].transpose(1, 2).contiguous(),
        difference_random=difference[:, :, n_fixed:].contiguous(),
        difference_fixed=difference[:, :, :n_fixed].contiguous(),
        difference_t=difference.transpose(1, 2).contiguous(),
        blocked=blocked.view(n_units, -1),
        chosen_slot=chosen_slot,
        chosen_indicator=chosen_indicator.view(n_units, -1),
        chosen_design=torch.bmm(chosen_indicator.view(n_units, 1, -1), design).squeeze(1),
        any_blocked=bool((~offered).any()),
        slot_of_row=slot_of_row,
        unit_of_case=unit_of_case,
        n_cases_per_unit=n_per_unit,
        n_alternatives=n_alternatives,
        n_fixed=n_fixed,
        n_random=n_random,
        n_rows=n_rows,
        n_cases=n_cases,
    )


def make_draws(
    spec: MixedSpec,
    n_units: int,
    n_draws: int,
    kind: str = "halton",
    seed: int = 0,
    scramble: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard draws t of each random coefficient (choicecli.draws), float64. (U, R, Kr)"""
    uniform = draws_module.uniform_draws(
        n_units, n_draws, spec.n_random, kind=kind, seed=seed, scramble=scramble, device=device
    )  # (U, R, Kr)
    columns = [
        draws_module.standard_draws(uniform[:, :, k], distribution)
        for k, distribution in enumerate(spec.distributions)
    ]
    if not columns:
        return uniform
    return torch.stack(columns, dim=2)  # (U, R, Kr)


def default_draw_batch(
    data: MixedData, n_draws: int, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> int:
    """DEFAULT_DRAW_BATCH draws, or fewer where their slot x draw tensors would take more than
    memory_budget bytes."""
    slots = data.design.shape[0] * data.design.shape[1]
    fitting = memory_budget // max(1, slots * BYTES_PER_SLOT_DRAW)
    return max(1, min(n_draws, DEFAULT_DRAW_BATCH, fitting))


def random_coefficients(
    spec: MixedSpec, theta: torch.Tensor, draws: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """beta (U, B, Kr) and d beta / d mean, d beta / d spread (U, B, Kr), elementwise.

    For correlated normals d beta_k / d spread_k is z_k (the diagonal of L) and
    d beta_k / d L_kl = z_l, which the caller forms from the draws.
    """
    n_fixed, n_random = spec.n_fixed, spec.n_random
    means = theta[n_fixed : n_fixed + n_random]
    spreads = theta[n_fixed + n_random : n_fixed + 2 * n_random]
    coefficient, d_mean, d_spread = [], [], []
    for k, distribution in enumerate(spec.distributions):
        value, mean_derivative, spread_derivative = draws_module.coefficients_and_derivatives(
            distribution, means[k], spreads[k], draws[:, :, k]
        )  # (U, B) each
        coefficient.append(value)
        d_mean.append(mean_derivative)
        d_spread.append(spread_derivative)
    beta = torch.stack(coefficient, dim=2)  # (U, B, Kr)
    if spec.cholesky_pairs:
        offset = n_fixed + 2 * n_random
        rows = [row for row, _ in spec.cholesky_pairs]
        cols = [col for _, col in spec.cholesky_pairs]
        lower = theta[offset:]  # (Q,)
        contribution = draws[:, :, cols] * lower  # (U, B, Q)
        extra = torch.zeros_like(beta).index_add(2, torch.tensor(rows, device=beta.device),
                                                 contribution)  # fmt: skip
        beta = beta + extra
    return beta, torch.stack(d_mean, dim=2), torch.stack(d_spread, dim=2)


def _batch(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,  # (U, B, Kr)
    fixed_utility: torch.Tensor,  # (U, 1, T*J)
    with_scores: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per unit and draw: log P_u(beta_ur) (U, B), and the draw-weighted scores within the
    batch (U, P), or None. Plain tensor algebra, differentiable by autograd and forward-mode AD
    (the Hessian); _fast_batch computes the same in place."""
    n_units, n_batch = draws.shape[0], draws.shape[1]
    n_per_unit, n_alternatives = data.n_cases_per_unit, data.n_alternatives
    beta, d_mean, d_spread = random_coefficients(spec, theta, draws)  # (U, B, Kr)
    utility = torch.bmm(beta, data.random_design_t) + fixed_utility  # (U, B, T*J)
    utility = utility.view(n_units, n_batch, n_per_unit, n_alternatives)
    top = utility.amax(dim=3, keepdim=True).detach()  # (U, B, T, 1) any constant would do
    shifted = utility - top  # (U, B, T, J)
    exponential = torch.exp(shifted)
    total = exponential.sum(dim=3, keepdim=True)  # (U, B, T, 1)
    chosen_slot = data.chosen_slot.unsqueeze(1).expand(n_units, n_batch, n_per_unit, 1)
    chosen_shifted = torch.gather(shifted, 3, chosen_slot)  # (U, B, T, 1)
    log_probability = (chosen_shifted - torch.log(total)).sum(dim=(2, 3))  # (U, B)
    if not with_scores:
        return log_probability, None
    probability = (exponential / total).view(n_units, n_batch, -1)  # (U, B, T*J)
    gradient_x = data.chosen_design.unsqueeze(1) - torch.bmm(probability, data.design)
    return log_probability, _weighted_scores(spec, log_probability, gradient_x, draws,
                                             d_mean, d_spread)  # fmt: skip


def _per_draw_scores(
    spec: MixedSpec,
    gradient_x: torch.Tensor,  # (U, B, K): sum over a unit's slots of (y - p) x
    draws: torch.Tensor,  # (U, B, Kr)
    d_mean: torch.Tensor,  # (U, B, Kr)
    d_spread: torch.Tensor,  # (U, B, Kr)
) -> torch.Tensor:
    """d log P_u(beta_ub) / d theta for each draw. (U, B, P)"""
    random_part = gradient_x[:, :, spec.n_fixed :]  # (U, B, Kr)
    parts = [gradient_x[:, :, : spec.n_fixed], random_part * d_mean, random_part * d_spread]
    if spec.cholesky_pairs:
        rows = [row for row, _ in spec.cholesky_pairs]
        cols = [col for _, col in spec.cholesky_pairs]
        parts.append(random_part[:, :, rows] * draws[:, :, cols])  # (U, B, Q)
    return torch.cat(parts, dim=2)  # (U, B, P)


def _weighted_scores(
    spec: MixedSpec,
    log_probability: torch.Tensor,  # (U, B)
    gradient_x: torch.Tensor,  # (U, B, K)
    draws: torch.Tensor,  # (U, B, Kr)
    d_mean: torch.Tensor,  # (U, B, Kr)
    d_spread: torch.Tensor,  # (U, B, Kr)
) -> torch.Tensor:
    """sum_b w_ub d log P_u(beta_ub) / d theta, w the softmax over the batch's draws. (U, P)"""
    weights = torch.softmax(log_probability, dim=1).unsqueeze(1)  # (U, 1, B)
    random_part = gradient_x[:, :, spec.n_fixed :]  # (U, B, Kr)
    parts = [torch.bmm(weights, gradient_x)]  # (U, 1, K) fixed, and means when linear
    if any(name in NONLINEAR for name in spec.distributions):
        parts[0] = parts[0][:, :, : spec.n_fixed]
        parts.append(torch.bmm(weights, random_part * d_mean))
    parts.append(torch.bmm(weights, random_part * d_spread))
    if spec.cholesky_pairs:
        rows = [row for row, _ in spec.cholesky_pairs]
        cols = [col for _, col in spec.cholesky_pairs]
        parts.append(torch.bmm(weights, random_part[:, :, rows] * draws[:, :, cols]))
    return torch.cat(parts, dim=2).squeeze(1)  # (U, P)


def _fast_probabilities(
    data: MixedData,
    beta: torch.Tensor,  # (U, B, Kr)
    fixed_column: torch.Tensor | None,  # (U, T*J, 1) fixed utility differences, -inf if blocked
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place, without autograd, draws last (slots x draws, so the sums over alternatives run
    along contiguous draws): log P_u(beta_ub) (U, B), the probabilities (U, T*J, B) and sum over
    a unit's slots of (y - p) x (U, B, K). Utilities are taken relative to the chosen
    alternative's (one product with the differences of x; the sum of exponentials is then at
    least 1 and log P = -log of it), capped at UTILITY_GAP_LIMIT against overflow; sum (y - p) x
    is -sum p (x - x_chosen)."""
    n_units, n_batch = beta.shape[0], beta.shape[1]
    n_per_unit, n_alternatives = data.n_cases_per_unit, data.n_alternatives
    beta_t = beta.transpose(1, 2).contiguous()  # (U, Kr, B)
    if fixed_column is None:
        utility = torch.bmm(data.difference_random, beta_t)  # (U, T*J, B)
    else:
        utility = torch.baddbmm(fixed_column, data.difference_random, beta_t)  # (U, T*J, B)
    grid = utility.view(n_units, n_per_unit, n_alternatives, n_batch)  # chosen: 0
    exponential = grid.clamp_(max=UTILITY_GAP_LIMIT).exp_()  # chosen: 1
    total = exponential.sum(dim=2, keepdim=True)  # (U, T, 1, B) at least 1
    log_probability = -torch.log(total).sum(dim=1).view(n_units, n_batch)  # (U, B)
    probability = exponential.div_(total).view(n_units, -1, n_batch)  # (U, T*J, B)
    gradient_x = torch.bmm(data.difference_t, probability).neg_()  # (U, K, B)
    return log_probability, probability, gradient_x.transpose(1, 2)


def _fast_utilities(spec: MixedSpec, data: MixedData, theta: torch.Tensor) -> torch.Tensor | None:
    """The fixed part of the utility differences for _fast_probabilities, -inf where not
    offered (U, T*J, 1); None where there is nothing to add."""
    if spec.n_fixed == 0 and not data.any_blocked:
        return None
    return (data.difference_fixed @ theta[: spec.n_fixed] + data.blocked).unsqueeze(2)


def _fast_batch(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,  # (U, B, Kr)
    fixed_column: torch.Tensor | None,  # (U, T*J, 1)
) -> tuple[torch.Tensor, torch.Tensor]:
    """_batch with scores, in place and without autograd. (U, B), (U, P)"""
    beta, d_mean, d_spread = random_coefficients(spec, theta, draws)  # (U, B, Kr)
    log_probability, _, gradient_x = _fast_probabilities(data, beta, fixed_column)
    scores = _weighted_scores(spec, log_probability, gradient_x, draws, d_mean, d_spread)
    return log_probability, scores


def _simulate(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,  # (U, R, Kr)
    draw_batch: int | None,
    with_scores: bool,
    fast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log L_u (U,) and the per-unit scores (U, P) or None. Differentiable by autograd and by
    forward-mode AD (torch.func) in theta unless fast (scores in place, no autograd)."""
    n_units, n_draws = draws.shape[0], draws.shape[1]
    if n_units != data.n_units:
        raise ModelError(f"draws are for {n_units} units; the data has {data.n_units}")
    batch = draw_batch or default_draw_batch(data, n_draws)
    fixed = theta[: spec.n_fixed]
    fixed_utility = (data.design[:, :, : spec.n_fixed] @ fixed + data.blocked).unsqueeze(1)
    fixed_column = _fast_utilities(spec, data, theta) if fast else None
    running = torch.full((n_units,), -torch.inf, dtype=theta.dtype, device=theta.device)
    scores = None
    for start in range(0, n_draws, batch):
        part = draws[:, start : start + batch]  # (U, B, Kr)
        if fast:
            log_probability, batch_scores = _fast_batch(spec, data, theta, part, fixed_column)
        else:
            log_probability, batch_scores = _batch(spec, data, theta, part, fixed_utility,
                                                   with_scores)  # fmt: skip
        batch_total = torch.logsumexp(log_probability, dim=1)  # (U,)
        combined = torch.logaddexp(running, batch_total)  # (U,)
        if batch_scores is not None:
            new_share = torch.exp(batch_total - combined).unsqueeze(1)  # (U, 1)
            scores = (
                batch_scores
                if scores is None
                else scores * (1.0 - new_share) + (batch_scores * new_share)
            )
        running = combined
    return running - math.log(n_draws), scores


def unit_log_likelihood(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
) -> torch.Tensor:
    """log of each unit's simulated likelihood; differentiable in theta by autograd. (U,)"""
    return _simulate(spec, data, theta, draws, draw_batch, with_scores=False)[0]


def log_likelihood(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
) -> torch.Tensor:
    """The simulated log-likelihood, sum over units; differentiable by autograd. ()"""
    return unit_log_likelihood(spec, data, theta, draws, draw_batch).sum()


def log_likelihood_and_scores(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The simulated log-likelihood () and each unit's analytic score (U, P); the gradient is
    their sum over units. No autograd graph is built."""
    with torch.no_grad():
        unit_values, scores = _simulate(spec, data, theta, draws, draw_batch, True, fast=True)
    return unit_values.sum(), scores


def log_likelihood_and_gradient(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The simulated log-likelihood () and its analytic gradient (P,)."""
    value, scores = log_likelihood_and_scores(spec, data, theta, draws, draw_batch)
    return value, scores.sum(dim=0)


def hessian(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """The exact Hessian of the simulated log-likelihood: forward-mode AD (torch.func.jvp) of
    the analytic gradient, `chunk` directions at a time (all P by default), so memory stays that
    of a gradient's batch times the chunk. (P, P)"""
    n_parameters = theta.shape[0]
    batch = draw_batch or default_draw_batch(data, draws.shape[1])
    directions = chunk or n_parameters
    batch = max(1, batch // directions)

    def gradient(point: torch.Tensor) -> torch.Tensor:
        return _simulate(spec, data, point, draws, batch, with_scores=True)[1].sum(dim=0)

    def directional(direction: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(gradient, (theta,), (direction,))[1]

    identity = torch.eye(n_parameters, dtype=theta.dtype, device=theta.device)
    with torch.no_grad():
        columns = torch.func.vmap(directional, chunk_size=directions)(identity)  # (P, P)
    return 0.5 * (columns + columns.T)


def _second_derivatives(
    distribution: str, mean: torch.Tensor, spread: torch.Tensor, draw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """d2 beta / d m2, d m d s, d s2 elementwise (forward-mode AD of the first derivatives), or
    None where beta is linear in (m, s). (U, B) each"""
    if distribution in ("normal", "uniform", "triangular"):
        return None

    def first(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return draws_module.coefficients_and_derivatives(distribution, m, s, draw)[1:]

    one, zero = torch.ones_like(mean), torch.zeros_like(mean)
    _, (mean_mean, spread_mean) = torch.func.jvp(first, (mean, spread), (one, zero))
    _, (_, spread_spread) = torch.func.jvp(first, (mean, spread), (zero, one))
    return mean_mean, spread_mean, spread_spread


def analytic_hessian(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact Hessian of the simulated log-likelihood in closed form, two passes over the
    draws (the first for each unit's likelihood, which fixes the draw weights w_ur):
    sum_u [sum_r w_ur (H_ur + g_ur g_ur^T) - s_u s_u^T], with g_ur the draw's score and
    H_ur = -J^T M J + sum_k (dl/dbeta_k) d2 beta_k, M = sum over the unit's cases of
    sum_j p x x^T - (sum_j p x)(sum_j p x)^T. Also returns the log-likelihood () and the
    units' scores (U, P). Memory: the data's x x^T per slot (U, T*J, K*K), and per batch
    (U, B, P, P) and (U, B, T, K)."""
    n_units, n_draws = draws.shape[0], draws.shape[1]
    n_fixed, n_random = spec.n_fixed, spec.n_random
    n_coefficients = n_fixed + n_random
    n_per_unit, n_alternatives = data.n_cases_per_unit, data.n_alternatives
    batch = draw_batch or default_draw_batch(data, n_draws)
    with torch.no_grad():
        unit_values, scores = _simulate(spec, data, theta, draws, batch, True, fast=True)
        normaliser = unit_values + math.log(n_draws)  # (U,) log sum_r P_ur
        coefficient_of = list(range(n_fixed)) + [n_fixed + k for k in range(n_random)] * 2
        coefficient_of += [n_fixed + row for row, _ in spec.cholesky_pairs]
        coefficient_index = torch.tensor(coefficient_of, device=theta.device)  # (P,)
        # entry (p, q) of the P x P matrix reads M[c(p), c(q)], flattened
        pair_index = (coefficient_index.unsqueeze(1) * n_coefficients + coefficient_index).view(-1)
        design = data.difference_t.transpose(1, 2)  # (U, T*J, K)
        outer_t = (
            (design.unsqueeze(3) * design.unsqueeze(2))
            .view(n_units, -1, n_coefficients**2)
            .transpose(1, 2)
            .contiguous()
        )  # (U, K*K, T*J)
        # M is a covariance within each case: the differences of x give the same
        grid_t = data.difference_t.view(n_units, n_coefficients, n_per_unit, n_alternatives)
        grid_t = grid_t.permute(0, 2, 1, 3).reshape(-1, n_coefficients, n_alternatives)
        fixed_column = _fast_utilities(spec, data, theta)
        means = theta[n_fixed : n_fixed + n_random]
        spreads = theta[n_fixed + n_random : n_fixed + 2 * n_random]
        result = -(scores.T @ scores)  # (P, P)
        for start in range(0, n_draws, batch):
            part = draws[:, start : start + batch]  # (U, B, Kr)
            n_batch = part.shape[1]
            beta, d_mean, d_spread = random_coefficients(spec, theta, part)
            log_probability, probability, gradient_x = _fast_probabilities(
                data, beta, fixed_column
            )  # (U, B), (U, T*J, B), (U, B, K)
            weights = torch.exp(log_probability - normaliser.unsqueeze(1))  # (U, B)
            per_draw = _per_draw_scores(spec, gradient_x, part, d_mean, d_spread)  # (U, B, P)
            weighted = per_draw * weights.unsqueeze(2)  # (U, B, P)
            result += weighted.reshape(-1, weighted.shape[2]).T @ per_draw.reshape(
                -1, per_draw.shape[2]
            )
            # M = sum p x x^T - sum over cases of (sum_j p x)(sum_j p x)^T  (U*B, K*K)
            second = torch.bmm(outer_t, probability).transpose(1, 2).reshape(-1, n_coefficients**2)
            case_probability = probability.view(-1, n_alternatives, n_batch)  # (U*T, J, B)
            average_x = torch.bmm(grid_t, case_probability)  # (U*T, K, B): sum_j p x per case
            average_x = (
                average_x.view(n_units, n_per_unit, n_coefficients, n_batch)
                .permute(0, 3, 1, 2)
                .reshape(-1, n_per_unit, n_coefficients)
            )  # (U*B, T, K)
            second -= torch.bmm(average_x.transpose(1, 2), average_x).view(second.shape)
            chain = torch.cat(
                [part.new_ones((n_units, n_batch, n_fixed)),
                 d_mean, d_spread, part[:, :, [col for _, col in spec.cholesky_pairs]]],
                dim=2,
            )  # fmt: skip
            expanded = second[:, pair_index]  # (U*B, P*P)
            products = (chain * weights.unsqueeze(2)).unsqueeze(3) * chain.unsqueeze(2)
            result -= (products.view(expanded.shape) * expanded).sum(dim=0).view(result.shape)
            for k, distribution in enumerate(spec.distributions):
                curvature = _second_derivatives(distribution, means[k], spreads[k], part[:, :, k])
                if curvature is None:
                    continue
                slope = gradient_x[:, :, n_fixed + k] * weights  # (U, B)
                mean_at, spread_at = n_fixed + k, n_fixed + n_random + k
                mean_mean, spread_mean, spread_spread = (
                    (slope * value).sum() for value in curvature
                )
                result[mean_at, mean_at] += mean_mean
                result[mean_at, spread_at] += spread_mean
                result[spread_at, mean_at] += spread_mean
                result[spread_at, spread_at] += spread_spread
    return 0.5 * (result + result.T), unit_values.sum(), scores


def bhhh(scores: torch.Tensor) -> torch.Tensor:
    """The outer product of the units' scores, sum_u s_u s_u^T (the BHHH information). (P, P)"""
    return scores.T @ scores


def standard_errors(information: torch.Tensor) -> torch.Tensor:
    """sqrt(diag(information^-1)) for an information matrix (-Hessian, or BHHH). (P,)"""
    return torch.sqrt(torch.diag(torch.linalg.inv(information)))


def _draw_batches(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,  # (U, R, Kr)
    draw_batch: int | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each batch of draws (U, B, Kr) with the log-probability of every unit's choices under
    each of them (U, B); no derivatives."""
    batch = draw_batch or default_draw_batch(data, draws.shape[1])
    fixed_utility = (
        data.design[:, :, : spec.n_fixed] @ theta[: spec.n_fixed] + data.blocked
    ).unsqueeze(1)
    for start in range(0, draws.shape[1], batch):
        part = draws[:, start : start + batch]  # (U, B, Kr)
        log_probability, _ = _batch(spec, data, theta, part, fixed_utility, False)
        yield part, log_probability


def conditional_means(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
) -> torch.Tensor:
    """Each unit's conditional mean of its random coefficients given its choices (Train,
    ch. 11): sum_r w_ur beta_ur with w the softmax over draws of log P_u(beta_ur). (U, Kr)"""
    n_units = draws.shape[0]
    with torch.no_grad():
        running = torch.full((n_units,), -torch.inf, dtype=theta.dtype, device=theta.device)
        means = torch.zeros((n_units, spec.n_random), dtype=theta.dtype, device=theta.device)
        for part, log_probability in _draw_batches(spec, data, theta, draws, draw_batch):
            beta = random_coefficients(spec, theta, part)[0]  # (U, B, Kr)
            weights = torch.softmax(log_probability, dim=1)  # (U, B)
            batch_means = torch.bmm(weights.unsqueeze(1), beta).squeeze(1)  # (U, Kr)
            batch_total = torch.logsumexp(log_probability, dim=1)  # (U,)
            combined = torch.logaddexp(running, batch_total)
            new_share = torch.exp(batch_total - combined).unsqueeze(1)  # (U, 1)
            means = means * (1.0 - new_share) + batch_means * new_share
            running = combined
    return means


def simulation_standard_error(
    spec: MixedSpec,
    data: MixedData,
    theta: torch.Tensor,
    draws: torch.Tensor,
    draw_batch: int | None = None,
) -> float:
    """The simulation's standard error of the log-likelihood, as for independent draws:
    sqrt(sum_u var_r(P_ur) / (R L_u^2)) (the delta method on each unit's average; quasi-random
    draws usually do better than this says)."""
    n_units, n_draws = draws.shape[0], draws.shape[1]
    with torch.no_grad():
        first = torch.full((n_units,), -torch.inf, dtype=theta.dtype, device=theta.device)
        second = first.clone()
        for _, log_probability in _draw_batches(spec, data, theta, draws, draw_batch):
            first = torch.logaddexp(first, torch.logsumexp(log_probability, dim=1))
            second = torch.logaddexp(second, torch.logsumexp(2.0 * log_probability, dim=1))
        # var / L^2 = mean(P^2) / mean(P)^2 - 1, in logs
        relative = torch.expm1(second + math.log(n_draws) - 2.0 * first).clamp(min=0.0)  # (U,)
    return float(torch.sqrt(relative.sum() / n_draws))


@dataclass
class MixedFit:
    """What fit_mixed found: the estimates and what standard errors need."""

    theta: torch.Tensor  # (P,)
    log_likelihood: float
    gradient: torch.Tensor  # (P,)
    hessian: torch.Tensor  # (P, P)
    scores: torch.Tensor  # (U, P)
    iterations: int
    evaluations: int
    newton_steps: int
    converged: bool

    @property
    def standard_errors(self) -> torch.Tensor:
        """From the exact Hessian. (P,)"""
        return standard_errors(-self.hessian)

    @property
    def bhhh_standard_errors(self) -> torch.Tensor:
        """From the outer product of the units' scores. (P,)"""
        return standard_errors(bhhh(self.scores))

    @property
    def robust_standard_errors(self) -> torch.Tensor:
        """Sandwich: H^-1 (sum s s^T) H^-1. (P,)"""
        inverse = torch.linalg.inv(-self.hessian)
        return torch.sqrt(torch.diag(inverse @ bhhh(self.scores) @ inverse))


def _lbfgs(
    spec: MixedSpec,
    data: MixedData,
    draws: torch.Tensor,
    theta: torch.Tensor,
    draw_batch: int | None,
    max_iterations: int,
    tolerance: float,
) -> tuple[torch.Tensor, int, int]:
    """L-BFGS with a strong Wolfe line search on minus the mean log-likelihood per unit, until
    its largest gradient entry times U is below tolerance. theta, iterations, evaluations."""
    scale = 1.0 / data.n_units
    parameter = theta.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [parameter],
        lr=1.0,
        max_iter=max_iterations,
        max_eval=max_iterations * 5,
        tolerance_grad=tolerance * scale,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        value, gradient = log_likelihood_and_gradient(
            spec, data, parameter.detach(), draws, draw_batch
        )
        parameter.grad = -gradient * scale
        return -value * scale

    optimizer.step(closure)
    state = optimizer.state[parameter]
    iterations, evaluations = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    return parameter.detach().clone(), iterations, evaluations


def fit_mixed(
    spec: MixedSpec,
    data: MixedData,
    draws: torch.Tensor,
    initial: torch.Tensor | None = None,
    draw_batch: int | None = None,
    max_iterations: int = 500,
    gradient_tolerance: float = 1e-6,
    switch_tolerance: float = 1e-2,
    newton_steps: int = 5,
) -> MixedFit:
    """Maximise the simulated log-likelihood from `initial` (default spec.initial(): every
    parameter 0.1, xlogit's start): L-BFGS (strong Wolfe line search, analytic gradient) until
    the largest gradient entry of the log-likelihood is below switch_tolerance, then Newton
    steps with the exact analytic Hessian (each must not lower the log-likelihood; at most
    newton_steps) until it is below gradient_tolerance; L-BFGS takes over again if a Newton
    step fails. Float64 on the data's device."""
    if initial is not None:
        theta = initial.detach().to(dtype=torch.float64, device=data.device).clone()
    else:
        theta = spec.initial(device=data.device)
    theta, iterations, evaluations = _lbfgs(
        spec, data, draws, theta, draw_batch, max_iterations, switch_tolerance
    )
    second, value, scores = analytic_hessian(spec, data, theta, draws, draw_batch)
    gradient = scores.sum(dim=0)
    steps = 0
    while gradient.abs().max() > gradient_tolerance and steps < newton_steps:
        candidate = theta - torch.linalg.solve(second, gradient)
        new_second, new_value, new_scores = analytic_hessian(spec, data, candidate, draws,
                                                             draw_batch)  # fmt: skip
        evaluations += 1
        steps += 1
        if torch.isfinite(new_value) and new_value >= value - 1e-12 * abs(float(value)):
            theta, value, scores, second = candidate, new_value, new_scores, new_second
        else:  # not concave enough here: back to L-BFGS all the way
            theta, more_iterations, more_evaluations = _lbfgs(
                spec, data, draws, theta, draw_batch, max_iterations, gradient_tolerance
            )
            iterations, evaluations = iterations + more_iterations, evaluations + more_evaluations
            second, value, scores = analytic_hessian(spec, data, theta, draws, draw_batch)
        gradient = scores.sum(dim=0)
    return MixedFit(
        theta=theta,
        log_likelihood=float(value),
        gradient=gradient,
        hessian=second,
        scores=scores,
        iterations=iterations,
        evaluations=evaluations,
        newton_steps=steps,
        converged=bool(gradient.abs().max() <= gradient_tolerance),
    )
