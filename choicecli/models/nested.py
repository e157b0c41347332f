"""Two-level nested logit (Train ch. 4): what both strategies share, and the factory that
picks one by the choice sets.

P(i) = P(i | k) P(k), P(i | k) = exp(Y_i / l_k) / sum_{j in k} exp(Y_j / l_k),
I_k = log sum_{j in k} exp(Y_j / l_k), P(k) = exp(W_k + l_k I_k) / sum_m exp(W_m + l_m I_m).

Notation: R rows, N cases, J alternatives, M nests, P parameters of the full layout.
Nearly full choice sets: `DenseNestedLogit` (nested_dense.py: (N, J) grids, analytic
gradient and Hessian at any parameter count; with per-user terms or many parameters the
Hessian is summed case by case in compact columns, nested_hessian.py, block-arrowhead by
user). Sparse ones: `RaggedNestedLogit` (nested_ragged.py: segment sums over rows, gradient
by autograd, the Hessian the dense strategy's on a grid made for it while that fits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from choicecli.design import Block
from choicecli.models.slots import ones_unless_given


@dataclass
class NestedRows:
    """What a nested logit is built from: both levels' blocks, the nests and the rows."""

    item_blocks: list[Block]
    nest_blocks: list[Block]
    lambda_index: torch.Tensor  # (M,) parameter number of each nest's lambda
    nest_of_item: torch.Tensor  # (J,)
    n_parameters: int
    case_index: torch.Tensor  # (R,)
    item_index: torch.Tensor  # (R,)
    n_cases: int
    chosen: torch.Tensor | None = None  # (R,)
    case_weights: torch.Tensor | None = None  # (N,)
    user_of_case: torch.Tensor | None = None  # (N,) where some terms are per user


class NestedLogit:
    """What both strategies hold: sizes, nests, lambdas, case weights (see protocol.py)."""

    def __init__(self, rows: NestedRows) -> None:
        self.lambda_index = rows.lambda_index
        self.nest_of_item = rows.nest_of_item
        self.n_parameters = rows.n_parameters
        self.n_cases = rows.n_cases
        self.n_rows = int(rows.case_index.shape[0])
        self.n_items = int(rows.nest_of_item.shape[0])
        self.n_nests = int(rows.lambda_index.shape[0])
        self.weighted = rows.case_weights is not None
        self.case_weights = ones_unless_given(
            rows.case_weights, rows.n_cases, rows.case_index.device
        )
        blocks = rows.item_blocks + rows.nest_blocks
        self.by_user = any(block.term.variation.by_user for block in blocks)
        self.user_of_case = rows.user_of_case if self.by_user else None
        if self.by_user and self.user_of_case is None:
            self.user_of_case = _user_of_case(blocks, rows.case_index, rows.n_cases)

    def row_log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,)
        return self.log_probabilities(theta)

    def log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,)
        raise NotImplementedError

    def set_case_weights(self, case_weights: torch.Tensor | None) -> None:
        """Weight the cases anew (a bootstrap resample's counts; None: every case 1)."""
        self.weighted = case_weights is not None
        device = self.lambda_index.device
        self.case_weights = ones_unless_given(case_weights, self.n_cases, device)
        self.forget()

    def forget(self) -> None:
        """Drop what was cached for the old case weights (none here)."""


def _user_of_case(blocks: list[Block], case_index: torch.Tensor, n_cases: int) -> torch.Tensor:
    """Each case's user, read from a per-user block's row codes. (N,)"""
    block = next(b for b in blocks if b.term.variation.by_user)
    by_item = block.term.variation.by_item
    users = block.code // len(block.level.labels) if by_item else block.code  # (R,)
    return torch.zeros(n_cases, dtype=torch.long, device=case_index.device).index_copy_(
        0, case_index, users
    )


def nested_logit(rows: NestedRows, dense_threshold: float = 0.5) -> NestedLogit:
    """The nested logit of these rows: on (N, J) grids when at least `dense_threshold` of
    the N x J slots are offered, else over the rows."""
    from choicecli.models.nested_dense import DenseNestedLogit
    from choicecli.models.nested_ragged import RaggedNestedLogit

    n_items = int(rows.nest_of_item.shape[0])
    dense = int(rows.case_index.shape[0]) >= dense_threshold * rows.n_cases * n_items
    return DenseNestedLogit(rows) if dense else RaggedNestedLogit(rows)
