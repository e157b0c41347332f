"""Two-level nested logit (Train ch. 4): one class per strategy, chosen by the choice sets.

P(i) = P(i | k) P(k), P(i | k) = exp(Y_i / l_k) / sum_{j in k} exp(Y_j / l_k),
I_k = log sum_{j in k} exp(Y_j / l_k), P(k) = exp(W_k + l_k I_k) / sum_m exp(W_m + l_m I_m).

Notation: R rows, N cases, J alternatives, M nests, P parameters of the full layout.
Nearly full choice sets: `DenseNestedLogit` ((N, J) grids, analytic gradient and Hessian up
to ANALYTIC_NESTED_LIMIT parameters). Sparse ones: `RaggedNestedLogit` (segment sums over
rows, derivatives by automatic differentiation).
"""

from __future__ import annotations

import torch

from choicecli.design import Block
from choicecli.models.nested_dense import DenseNestedLogit
from choicecli.models.nested_ragged import RaggedNestedLogit

NestedLogit = DenseNestedLogit | RaggedNestedLogit


def nested_logit(
    item_blocks: list[Block],
    nest_blocks: list[Block],
    lambda_index: torch.Tensor,  # (M,) parameter number of each nest's lambda
    nest_of_item: torch.Tensor,  # (J,)
    n_parameters: int,
    case_index: torch.Tensor,  # (R,)
    item_index: torch.Tensor,  # (R,)
    n_cases: int,
    chosen: torch.Tensor | None = None,  # (R,)
    case_weights: torch.Tensor | None = None,  # (N,)
    dense_threshold: float = 0.5,
) -> NestedLogit:
    """The nested logit of these rows: on (N, J) grids when at least `dense_threshold` of
    the N x J slots are offered, else over the rows."""
    n_items = int(nest_of_item.shape[0])
    dense = int(case_index.shape[0]) >= dense_threshold * n_cases * n_items
    strategy = DenseNestedLogit if dense else RaggedNestedLogit
    return strategy(
        item_blocks, nest_blocks, lambda_index, nest_of_item, n_parameters, case_index,
        item_index, n_cases, chosen, case_weights,
    )  # fmt: skip
