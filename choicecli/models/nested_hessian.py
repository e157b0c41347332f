"""The nested logit's Hessian case by case in compact columns: any terms, any parameter count,
block-arrowhead by user.

Each case's derivative vectors (nested_dense.py's Z_j, Zbar_m, G_m, Gbar, a and the chosen
nest's lambda) touch only Q compact columns: one per constant or per-user value column, one
per (value column, alternative or nest) for alternative- or nest-level ones, one per nest's
lambda. A compact column means the same parameter in every case of one user, and the same
in every case at all where it is not per-user (shared). Per case the Hessian is
sum_r L_r R_r' over r = J + 2M + 3 pairs of compact vectors, so:
- the shared x shared part is one product over every case's rows, (Qs, Qs);
- each user's own columns against all are summed per user, (U', Qu, Q);
both then scattered into the layout. Cost about cases x r x Q^2, never cases x P^2; two
users' coefficients never meet, which `arrowhead.py` relies on.

Notation: C cases of a block, J alternatives, M nests, F (Fn) value columns of the
alternative-level (nest-level) store, U' users (1 without per-user terms), Q compact columns,
Qs shared and Qu per-user ones, P parameters of the full layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from choicecli.models.slots import ColumnStore

if TYPE_CHECKING:
    from choicecli.models.nested_dense import _HessianBlock


@dataclass
class CompactColumns:
    """Where each value lands among a case's compact columns, and what each column means."""

    item_column: torch.Tensor  # (J, F) compact column of each alternative's item-store value
    nest_column: torch.Tensor  # (J, Fn) the same for the nest store
    lambda_column: torch.Tensor  # (M,) compact column of each nest's lambda
    parameter: torch.Tensor  # (U', Q) parameter of each compact column under each user
    shared: torch.Tensor  # (Qs,) columns meaning the same parameter for every user
    own: torch.Tensor  # (Qu,) per-user columns

    @property
    def n_columns(self) -> int:
        return int(self.parameter.shape[1])


def compact_columns(
    item_store: ColumnStore, nest_store: ColumnStore, lambda_index: torch.Tensor
) -> CompactColumns:
    """The compact columns of a nested model's two stores (dense layouts) and its lambdas."""
    device = lambda_index.device
    n_users = _n_users(item_store.blocks + nest_store.blocks)
    parameters: list[torch.Tensor] = []  # (U', n) per value column
    by_user: list[bool] = []  # one flag per compact column
    count = 0

    def lay_out(store: ColumnStore) -> torch.Tensor:  # (J, F)
        nonlocal count
        n_items = store.n_items
        column = torch.zeros(n_items, store.n_features, dtype=torch.long, device=device)
        for block, (start, _) in zip(store.blocks, store.block_columns, strict=True):
            variation = block.term.variation
            n_levels = len(block.level.labels) if variation.by_item else 1
            level = torch.zeros(n_items, dtype=torch.long, device=device)  # (J,)
            if variation.by_item:
                code_of_item = block.level.code_of_item
                level = (
                    torch.arange(n_items, device=device) if code_of_item is None else code_of_item
                )
            users = torch.arange(n_users if variation.by_user else 1, device=device)[:, None]
            codes = users * n_levels + torch.arange(n_levels, device=device)  # (U' or 1, L)
            codes = codes.expand(n_users, n_levels)
            for k in range(block.n_features):
                column[:, start + k] = count + level
                parameters.append(block.layout_index[codes, k])  # (U', L)
                by_user.extend([variation.by_user] * n_levels)
                count += n_levels
        return column

    item_column = lay_out(item_store)
    nest_column = lay_out(nest_store)
    n_nests = int(lambda_index.shape[0])
    lambda_column = count + torch.arange(n_nests, device=device)  # (M,)
    parameters.append(lambda_index[None, :].expand(n_users, n_nests))
    by_user.extend([False] * n_nests)
    flags = torch.tensor(by_user, dtype=torch.bool, device=device)  # (Q,)
    return CompactColumns(
        item_column,
        nest_column,
        lambda_column,
        torch.cat(parameters, dim=1),
        (~flags).nonzero().flatten(),
        flags.nonzero().flatten(),
    )


def _n_users(blocks) -> int:
    """Users of the layout: a per-user block has one row of coefficients per user (and level)."""
    for block in blocks:
        variation = block.term.variation
        if variation.by_user:
            n_levels = len(block.level.labels) if variation.by_item else 1
            return int(block.layout_index.shape[0]) // n_levels
    return 1


class CompactHessian:
    """Accumulates the Hessian block of cases by block of cases (see the module docstring)."""

    def __init__(self, columns: CompactColumns, nest_of_item: torch.Tensor, like: torch.Tensor):
        self.columns = columns
        n_shared, n_own = int(columns.shared.shape[0]), int(columns.own.shape[0])
        n_users = int(columns.parameter.shape[0])
        options = {"dtype": like.dtype, "device": like.device}
        self.shared_sum = torch.zeros(n_shared, n_shared, **options)  # (Qs, Qs)
        self.own_sums = torch.zeros(n_users if n_own else 0, n_own, columns.n_columns, **options)
        # the rows' part: each alternative's values and -s (its nest's lambda), per user
        self.row_parameter = columns.parameter[
            :, torch.cat([columns.item_column, columns.lambda_column[nest_of_item][:, None]], 1)
        ]  # (U', J, F+1)
        n_items, width = self.row_parameter.shape[1:]
        self.row_sums = torch.zeros(n_users, n_items, width, width, **options)  # (U', J, F+1, F+1)

    def add_rows(self, lower: torch.Tensor, rho: torch.Tensor, users: torch.Tensor | None):
        """Add sum over cases of rho_j Z_j Z_j' in value-column space. (C, J, F+1), (C, J)"""
        if users is None:
            self.row_sums[0] += torch.einsum("cjf,cjg->jfg", lower * rho[:, :, None], lower)
            return
        products = (lower * rho[:, :, None])[:, :, :, None] * lower[
            :, :, None, :
        ]  # (C, J, F+1, F+1)
        self.row_sums.index_add_(0, users, products)

    def add(self, left: torch.Tensor, right: torch.Tensor, users: torch.Tensor | None) -> None:
        """Add sum over cases and pairs of left right'. (C, r, Q) x 2, users (C,)"""
        shared, own = self.columns.shared, self.columns.own
        n_shared = shared.shape[0]
        shared_left = left[:, :, shared].reshape(-1, n_shared)  # (C r, Qs)
        self.shared_sum += shared_left.T @ right[:, :, shared].reshape(-1, n_shared)
        if own.numel():
            per_case = torch.bmm(left[:, :, own].transpose(1, 2), right)  # (C, Qu, Q)
            self.own_sums.index_add_(0, users, per_case)

    def hessian(self, n_parameters: int) -> torch.Tensor:  # (P, P)
        """The sums scattered into the layout."""
        columns = self.columns
        shared = columns.parameter[0, columns.shared]  # (Qs,)
        hessian = self.shared_sum.new_zeros(n_parameters, n_parameters)
        hessian.index_put_((shared[:, None], shared[None, :]), self.shared_sum, accumulate=True)
        rows = self.row_parameter  # (U', J, F+1)
        hessian.index_put_((rows[..., :, None], rows[..., None, :]), self.row_sums,
                           accumulate=True)  # fmt: skip
        if columns.own.numel():
            own = columns.parameter[:, columns.own]  # (U', Qu)
            every = columns.parameter  # (U', Q)
            hessian.index_put_((own[:, :, None], every[:, None, :]), self.own_sums,
                               accumulate=True)  # fmt: skip
            shared_per_user = every[:, columns.shared]  # (U', Qs)
            hessian.index_put_(
                (shared_per_user[:, :, None], own[:, None, :]),
                self.own_sums[:, :, columns.shared].transpose(1, 2),
                accumulate=True,
            )
        return hessian


def case_pairs(
    block: _HessianBlock,
    columns: CompactColumns,
    nest_of_item: torch.Tensor,  # (J,)
    nest_values: torch.Tensor | None,  # (C, J, Fn) the nest store's values; None: no columns
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block of cases' Z_j = (values, -s_j) in value-column space (C, J, F+1) for the rows'
    part sum_j rho_j Z_j Z_j', and pairs (L_r, R_r) whose sum of L_r R_r' is the rest:
    pi_m Zbar_m Zbar_m', -w P_m G_m G_m', w Gbar Gbar' and the chosen nest's lambda terms
    -(a e' + e a') w / l^2 + 2 w (s_i - A_k) / l^2 e e' (see nested_dense.py).
    ((C, J, F+1), (C, r, Q), (C, r, Q)) with r = 2M + 3."""
    scaled, within, share = block.scaled, block.within, block.share
    n_cases, n_items = scaled.shape
    n_nests, n_columns = share.shape[1], columns.n_columns
    rows = block.rows
    values = block.values  # (C, J, F)
    item_column = columns.item_column  # (J, F)
    # sum_{j in m} q_j dV_j in compact columns: column (m, item_column[j, f]) of an (M, Q) grid
    nest_offset = (nest_of_item * n_columns)[:, None]  # (J, 1)
    spread = (nest_offset + item_column).reshape(1, -1).expand(n_cases, -1)  # (C, J F)
    weighted = (within[:, :, None] * values).reshape(n_cases, -1)  # (C, J F)
    expected = values.new_zeros(n_cases, n_nests * n_columns).scatter_add_(1, spread, weighted)
    expected = expected.view(n_cases, n_nests, n_columns)  # (C, M, Q)
    chosen_nest = block.chosen_nest
    chosen_part = -expected[rows, chosen_nest]  # (C, Q) a = dV_i - sum_{j in k} q_j dV_j
    chosen_part.scatter_add_(1, item_column[block.item], values[rows, block.item])
    lower = torch.cat([values, -scaled[:, :, None]], dim=2)  # (C, J, F+1) Z_j
    lambda_column = columns.lambda_column
    nests = torch.arange(n_nests, device=scaled.device)
    expected[:, nests, lambda_column] -= block.mean_scaled  # Zbar_m
    upper = expected.clone()  # G_m = dW_m + Zbar_m + I_m dlambda_m
    upper[:, nests, lambda_column] += block.inclusive
    if nest_values is not None:  # W_m: constant in a nest, so its q-weighted mean there
        nest_spread = (nest_offset + columns.nest_column).reshape(1, -1).expand(n_cases, -1)
        nest_weighted = (within[:, :, None] * nest_values).reshape(n_cases, -1)  # (C, J Fn)
        upper.view(n_cases, -1).scatter_add_(1, nest_spread, nest_weighted)
    mean_upper = torch.bmm(share[:, None, :], upper)  # (C, 1, Q) Gbar
    own_lambda = torch.zeros_like(chosen_part)  # (C, Q) e: the chosen nest's lambda
    own_lambda[rows, lambda_column[chosen_nest]] = 1.0
    own = block.weights * (scaled[rows, block.item] - block.mean_scaled[rows, chosen_nest])
    own = own / block.chosen_lambda**2  # (C,) half of e e''s coefficient
    cross = block.chosen_scale[:, None] * chosen_part + own[:, None] * own_lambda  # (C, Q)
    weight = block.weight  # (C, 1)
    left = torch.cat([expected, upper, mean_upper, own_lambda[:, None], cross[:, None]], dim=1)
    right = torch.cat(
        [
            block.pi[:, :, None] * expected,
            -(weight * share)[:, :, None] * upper,
            weight[:, :, None] * mean_upper,
            cross[:, None],
            own_lambda[:, None],
        ],
        dim=1,
    )  # (C, r, Q)
    return lower, left, right
