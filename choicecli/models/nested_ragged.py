"""Nested logit on sparse choice sets: segment sums over rows, gradient by autograd.

Notation and formulas: see nested.py. Q (case, nest) pairs present in the data, F value
columns of both levels.
The Hessian is the dense strategy's analytic one (nested_hessian.py) on an N x J grid made
when first asked, while that grid holds at most GRID_HESSIAN_VALUES values (N x J x F); past
it, automatic differentiation's (about P gradients: `estimate` knows it from
`analytic_hessian_limit = 0` and takes Newton steps only while that is cheap).
"""

from __future__ import annotations

import torch

from choicecli.models.nested import NestedLogit, NestedRows
from choicecli.models.segments import block_utility, segment_logsumexp

# vmap over P directions wins for few parameters, P backward passes for many
VECTORIZED_HESSIAN_PARAMETERS = 64
VECTORIZED_HESSIAN_VALUES = 20_000_000  # rows x parameters
# the analytic Hessian lays the rows out on an N x J grid up to this many values (8 bytes each)
GRID_HESSIAN_VALUES = 50_000_000


def vectorized_hessian(n_rows: int, n_parameters: int) -> bool:
    """Whether autograd's Hessian should vmap over the P directions (else P backward passes)."""
    return (
        n_parameters <= VECTORIZED_HESSIAN_PARAMETERS
        and n_rows * n_parameters <= VECTORIZED_HESSIAN_VALUES
    )


class RaggedNestedLogit(NestedLogit):
    """Two-level nested logit over the rows of sparse choice sets."""

    can_subsample = False

    def __init__(self, rows: NestedRows) -> None:
        super().__init__(rows)
        blocks = rows.item_blocks + rows.nest_blocks
        grid_values = self.n_cases * self.n_items * max(1, sum(b.n_features for b in blocks))
        self._rows = rows if grid_values <= GRID_HESSIAN_VALUES else None
        self._grid: NestedLogit | None = None  # the dense strategy's model, made when asked
        # analytic on the grid at any P; else autograd's
        self.analytic_hessian_limit = None if self._rows is not None else 0
        self.item_blocks = rows.item_blocks
        self.nest_blocks = rows.nest_blocks
        self.case_index = case_index = rows.case_index
        self.chosen = rows.chosen
        n_nests = self.n_nests
        self.nest_of_row = self.nest_of_item[rows.item_index]  # (R,)
        pair_key = case_index * n_nests + self.nest_of_row  # (R,) one per (case, nest) pair
        unique_keys, self.pair_of_row = torch.unique(pair_key, return_inverse=True)  # (Q,), (R,)
        self.n_pairs = int(unique_keys.shape[0])
        self.case_of_pair = unique_keys // n_nests  # (Q,)
        self.nest_of_pair = unique_keys % n_nests  # (Q,)
        first_row = torch.full((self.n_pairs,), self.n_rows, dtype=torch.long,
                               device=case_index.device)  # fmt: skip
        numbers = torch.arange(self.n_rows, device=case_index.device)
        self.first_row_of_pair = first_row.scatter_reduce(0, self.pair_of_row, numbers, "amin")
        # the last per-case scores (unweighted: case weights leave them as they are)
        self._scores: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def subsample(self, every: int) -> None:
        """Not available on sparse choice sets (`can_subsample` is False)."""
        return None

    def drop_subsamples(self) -> None:
        """Nothing to drop: no subsamples are made."""

    def log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,)
        lambdas = theta[self.lambda_index]  # (M,)
        scaled = block_utility(self.item_blocks, theta, self.n_rows) / lambdas[self.nest_of_row]
        inclusive = segment_logsumexp(scaled, self.pair_of_row, self.n_pairs)  # (Q,)
        nest_utility = block_utility(self.nest_blocks, theta, self.n_rows)  # (R,)
        upper = nest_utility[self.first_row_of_pair] + lambdas[self.nest_of_pair] * inclusive
        normaliser = segment_logsumexp(upper, self.case_of_pair, self.n_cases)  # (N,)
        pair = self.pair_of_row
        return scaled - inclusive[pair] + upper[pair] - normaliser[self.case_index]

    def log_likelihood(self, theta: torch.Tensor) -> torch.Tensor:
        row_weight = self.case_weights[self.case_index]  # (R,)
        return (row_weight * self.chosen * self.log_probabilities(theta)).sum()

    def value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            point = theta.detach().requires_grad_(True)
            value = self.log_likelihood(point)
            (gradient,) = torch.autograd.grad(value, point)
        return value.detach(), gradient

    def forget(self) -> None:
        """New case weights: the dense model made for the Hessian follows them."""
        if self._grid is not None:
            self._grid.set_case_weights(self.case_weights if self.weighted else None)

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:  # (P, P)
        if self._rows is not None:
            if self._grid is None:
                from choicecli.models.nested_dense import DenseNestedLogit

                self._grid = DenseNestedLogit(self._rows)
                self._grid.set_case_weights(self.case_weights if self.weighted else None)
            return self._grid.hessian(theta)
        vectorize = vectorized_hessian(self.n_rows, self.n_parameters)
        with torch.enable_grad():
            return torch.autograd.functional.hessian(
                self.log_likelihood, theta.detach(), vectorize=vectorize
            )

    def case_scores(self, theta: torch.Tensor, cases: slice | None = None) -> torch.Tensor:
        """Gradient of each case's log-probability of its choice, unweighted, by forward-mode
        automatic differentiation over blocks of parameter directions, for every case at
        once (kept for the next block of cases at the same theta). (C, P)"""
        kept_theta, kept = self._scores
        if kept_theta is not None and torch.equal(kept_theta, theta):
            return kept if cases is None else kept[cases]
        chosen = self.chosen

        def per_case(point: torch.Tensor) -> torch.Tensor:  # (N,)
            chosen_log_p = chosen * self.log_probabilities(point)  # (R,)
            return point.new_zeros(self.n_cases).index_add(0, self.case_index, chosen_log_p)

        def directional(direction: torch.Tensor) -> torch.Tensor:  # (N,)
            return torch.func.jvp(per_case, (theta,), (direction,))[1]

        n_parameters = theta.shape[0]
        step = max(1, min(n_parameters, (1 << 22) // max(1, self.n_rows)))
        basis = torch.eye(n_parameters, dtype=theta.dtype, device=theta.device)  # (P, P)
        columns = [
            torch.func.vmap(directional)(basis[first : first + step])  # (p, N)
            for first in range(0, n_parameters, step)
        ]
        scores = torch.cat(columns).T  # (N, P)
        self._scores = (theta.clone(), scores)
        return scores if cases is None else scores[cases]
