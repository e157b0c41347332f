"""The conditional logit's Hessian: -sum_n w_n Z_n' (diag p_n - p_n p_n') Z_n. (P, P)

Computed in two parts, each grouped by what the coefficients vary with, so the cost is
rows x F^2 plus cases x Q^2, never rows x P^2:
H1 = sum_r w p_r z_r z_r' grouped by (user, alternative) (the row part) and
H2 = sum_n w_n m_n m_n' with m_n = sum_r p_r z_r held compactly per case (the case part).
Both are accumulated over blocks of cases, so temporaries stay small.

Notation as in slots.py; U' users keyed (1 without user terms), Q compact per-case columns
(case-level value columns, then alternative-level ones x J), Qu of them per user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from choicecli.design import Block

if TYPE_CHECKING:
    from choicecli.models.conditional import ConditionalLogit


def conditional_hessian(model: ConditionalLogit, probability: torch.Tensor) -> torch.Tensor:
    """The Hessian of the log-likelihood at the point of these slot probabilities (S,)."""
    store = model.store
    options = {"dtype": probability.dtype, "device": probability.device}
    n_key_users = _key_users(model)
    n_features = store.n_features
    row_sums = torch.zeros(n_key_users * store.n_items, n_features, n_features, **options)
    case_slots = _case_slots(model, n_key_users)  # (U', Q)
    n_compact = case_slots.shape[1]
    case_sums = torch.zeros(n_key_users, n_compact, n_compact, **options)
    for slots, cases in store.chunks():
        _add_row_part(model, row_sums, slots, cases, probability[slots])
        _add_case_part(model, case_sums, slots, cases, probability[slots])
    hessian = torch.zeros(model.n_parameters, model.n_parameters, **options)
    row_slots = _row_slots(model, n_key_users)  # (U'J, F)
    hessian.index_put_((row_slots[:, :, None], row_slots[:, None, :]), row_sums,
                       accumulate=True)  # fmt: skip
    hessian.index_put_((case_slots[:, :, None], case_slots[:, None, :]), -case_sums,
                       accumulate=True)  # fmt: skip
    return -hessian


def _key_users(model: ConditionalLogit) -> int:
    if not model.by_user:
        return 1
    return int(model.user_of_case.max()) + 1 if model.user_of_case is not None else 1


def _code_table(model: ConditionalLogit, block: Block, n_key_users: int) -> torch.Tensor:
    """The block's code for every (user, alternative) key. (U', J)"""
    device = model.store.columns.device
    n_items = model.n_items
    users = torch.arange(n_key_users, device=device)[:, None]  # (U', 1)
    items = torch.arange(n_items, device=device)[None, :]  # (1, J)
    variation = block.term.variation
    level_items = items if block.level.code_of_item is None else block.level.code_of_item[items]
    code = torch.zeros(n_key_users, n_items, dtype=torch.long, device=device)
    if variation.by_user:
        code = code + users * (len(block.level.labels) if variation.by_item else 1)
    if variation.by_item:
        code = code + level_items
    return code


def _row_slots(model: ConditionalLogit, n_key_users: int) -> torch.Tensor:
    """Parameter number of each value column under each (user, alternative) key. (U'J, F)"""
    return torch.cat(
        [
            b.layout_index[_code_table(model, b, n_key_users).reshape(-1)]
            for b in model.store.blocks
        ],
        dim=1,
    )


def _case_slots(model: ConditionalLogit, n_key_users: int) -> torch.Tensor:
    """Parameter number of each compact per-case column, per user. (U', Fa + Fb*J)"""
    blocks = model.store.blocks
    case_level = [b for b in blocks if not b.term.variation.by_item]
    item_level = [b for b in blocks if b.term.variation.by_item]
    slots = []
    if case_level:
        tables = [b.layout_index[_code_table(model, b, n_key_users)[:, 0]] for b in case_level]
        slots.append(torch.cat(tables, dim=1))  # (U', Fa)
    if item_level:  # column-major: all alternatives of a value column, then the next
        tables = [
            b.layout_index[_code_table(model, b, n_key_users)].transpose(1, 2)  # (U', K, J)
            for b in item_level
        ]
        slots.append(torch.cat(tables, dim=1).reshape(n_key_users, -1))  # (U', Fb*J)
    return torch.cat(slots, dim=1)


def _add_row_part(model: ConditionalLogit, sums, slots: slice, cases: slice, probability) -> None:
    """sums[key] += sum over the block's slots of w p z z' (in value-column space)."""
    store = model.store
    n_cases, n_features = cases.stop - cases.start, store.n_features
    weight = probability  # (s,)
    if model.weighted:
        weight = model.case_weights[store.slot_cases(slots)] * probability
    values = store.columns[:, slots]  # (F, s)
    weighted = values * weight  # (F, s)
    first_item = store.n_constant  # dense, no user terms: constant columns, then by item
    if store.dense and not model.by_user and len(store.item_columns) == n_features - first_item:
        # constant columns map to the same parameters under every alternative: one
        # product over all slots, kept under alternative 0
        if first_item:
            sums[0, :first_item, :first_item] += weighted[:first_item] @ values[:first_item].T
        grid = values.view(n_features, n_cases, store.n_items)  # (F, C, J)
        weighted_grid = weighted.view(n_features, n_cases, store.n_items)  # (F, C, J)
        for k in store.item_columns:  # each pair once: column k against columns 0..k
            products = (weighted_grid[k] * grid[: k + 1]).sum(dim=1).T  # (J, k+1)
            sums[:, k, : k + 1] += products
            sums[:, :k, k] += products[:, :k]
        return
    # any layout: each pair of columns once, summed by what its two parameters vary with
    # (one bincount per pair: torch's index_add_ of (s, F^2) rows is far slower)
    keys: dict[tuple[bool, bool], torch.Tensor] = {}  # (by user, by alternative) -> (s,)
    keys[False, True] = store.slot_items(slots)
    if model.by_user:
        keys[True, False] = model.user_of_case[store.slot_cases(slots)] * store.n_items
        keys[True, True] = keys[True, False] + keys[False, True]
    for f, (f_user, f_item) in enumerate(store.column_variation):
        for g, (g_user, g_item) in enumerate(store.column_variation[: f + 1]):
            product = weighted[f] * values[g]  # (s,)
            varies = (f_user or g_user, f_item or g_item)
            if varies == (False, False):  # both constant: the same parameters everywhere
                sums[0, f, g] += product.sum()
            else:
                sums[:, f, g] += torch.bincount(
                    keys[varies], weights=product, minlength=sums.shape[0]
                )
            if g != f:
                sums[:, g, f] = sums[:, f, g]


def _add_case_part(model: ConditionalLogit, sums, slots: slice, cases: slice, probability) -> None:
    """sums[user] += sum over the block's cases of w m m' (compact per-case columns)."""
    store = model.store
    n_cases, n_items = cases.stop - cases.start, store.n_items
    n_case_level = sum(b.n_features for b in store.blocks if not b.term.variation.by_item)
    values = store.columns[:, slots] * probability  # (F, s)
    local_case = None if store.dense else store.slot_cases(slots) - cases.start  # (s,)
    parts = []
    if n_case_level and store.dense:
        grid = values[:n_case_level].view(n_case_level, n_cases, n_items)  # (Fa, C, J)
        parts.append(grid.sum(dim=2).T)  # (C, Fa)
    elif n_case_level:
        summed = values.new_zeros(n_cases, n_case_level)
        parts.append(summed.index_add_(0, local_case, values[:n_case_level].T))
    if store.n_features > n_case_level:
        item_values = values[n_case_level:]  # (Fb, s)
        if store.dense:
            spread = item_values  # already (Fb, C*J) in slot order
        else:
            spread = values.new_zeros(item_values.shape[0], n_cases * n_items)
            spread[:, local_case * n_items + store.slot_items(slots)] = item_values
        spread = spread.view(-1, n_cases, n_items).transpose(0, 1)  # (C, Fb, J)
        parts.append(spread.reshape(n_cases, -1))  # (C, Fb*J)
    compact = torch.cat(parts, dim=1)  # (C, Q)
    weighted = compact * model.case_weights[cases, None] if model.weighted else compact
    if sums.shape[0] == 1:
        sums[0] += weighted.T @ compact
        return
    # shared columns map to the same parameters for every user: one product over all
    # cases, kept under user 0; only the rows of user-specific columns go per user
    shared, own = _compact_by_user(model, n_case_level)
    sums[0, shared[:, None], shared[None, :]] += weighted[:, shared].T @ compact[:, shared]
    outer = weighted[:, own].T[:, None, :] * compact.T[None, :, :]  # (Qu, Q, C)
    users = model.user_of_case[cases]  # (C,)
    per_user = torch.stack(  # one bincount per column: faster than index_add_ of rows
        [
            torch.bincount(users, weights=column, minlength=sums.shape[0])
            for column in outer.reshape(-1, n_cases)
        ],
        dim=1,
    ).view(sums.shape[0], own.numel(), compact.shape[1])  # (U', Qu, Q)
    sums[:, own, :] += per_user
    sums[:, shared[:, None], own[None, :]] += per_user[:, :, shared].transpose(1, 2)


def _compact_by_user(model: ConditionalLogit, n_case_level: int):
    """Compact per-case columns (case-level ones, then item-level ones x J): positions of
    those shared by all users and of the user-specific ones. ((Qs,), (Qu,))"""
    blocks = model.store.blocks
    by_user = [  # one flag per value column, in value-column order
        block.term.variation.by_user for block in blocks for _ in range(block.n_features)
    ]
    item_level = [flag for flag in by_user[n_case_level:] for _ in range(model.n_items)]
    flags = torch.tensor(by_user[:n_case_level] + item_level, dtype=torch.bool,
                         device=model.store.columns.device)  # fmt: skip
    return (~flags).nonzero().flatten(), flags.nonzero().flatten()
