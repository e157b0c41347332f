"""The conditional logit's Hessian: -sum_n w_n Z_n' (diag p_n - p_n p_n') Z_n. (P, P)

Computed in two parts, each grouped by what the coefficients vary with, so the cost is
rows x F^2 plus cases x Q^2, never rows x P^2:
H1 = sum_r w p_r z_r z_r' per (user, alternative) key (the row part) and
H2 = sum_n w_n m_n m_n' with m_n = sum_r p_r z_r held compactly per case (the case part).
Both are batched matrix products over every pair of columns at once: the rows (or cases) of
each key gathered into padded tables (`padded_groups`), a block of them at a time, so
temporaries stay small and no Python loop runs over pairs of columns, keys or rows.

Notation as in slots.py; U' users keyed (1 without user terms), Q compact per-case columns
(case-level value columns, then alternative-level ones x J), Qu of them per user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from choicecli.design import Block

if TYPE_CHECKING:
    from choicecli.models.conditional import ConditionalLogit


# dense layouts without user terms: up to this many alternative-level columns, each is
# multiplied into the columns before it in place (cl_100k's 2: 0.043 s a Hessian against
# 0.059 s by one batched product, which copies the (F, C, J) grid per alternative); beyond
# it one batched product is faster (17 columns: 5.6 ms a block of cases against 9.5 ms)
FEW_ALTERNATIVE_COLUMNS = 4


@dataclass(frozen=True)
class Group:
    """Keys with about the same number of members, their members padded to one length."""

    keys: torch.Tensor  # (Kb,)
    members: torch.Tensor  # (Kb, L) positions; padding repeats a real one
    real: torch.Tensor  # (Kb, L) bool, False on padding


def conditional_hessian(model: ConditionalLogit, probability: torch.Tensor) -> torch.Tensor:
    """The Hessian of the log-likelihood at the point of these slot probabilities (S,)."""
    store = model.store
    n_key_users = _key_users(model)
    weight = probability  # (S,) w p of each slot, 0 where nothing is offered
    if model.weighted:
        weight = model.case_weights[store.case_index] * probability
    row_sums = _row_part(model, weight, n_key_users)  # (U'J, F, F)
    n_case_level = sum(b.n_features for b in store.blocks if not b.term.variation.by_item)
    shared, own = _compact_by_user(model, n_case_level)  # (Qs,), (Qu,)
    # compact columns shared by every user first, then the user-specific ones
    order = torch.cat([shared, own]) if own.numel() else None  # (Q,)
    case_slots = _case_slots(model, n_key_users)  # (U', Q)
    case_slots = case_slots if order is None else case_slots[:, order]
    n_shared = shared.numel()
    shared_sums, own_sums = _case_part(model, probability, order, n_shared, n_key_users)
    n_parameters = model.n_parameters
    hessian = probability.new_zeros(n_parameters * n_parameters)  # (P*P,) flat
    row_slots = _row_slots(model, n_key_users)  # (U'J, F)
    _add_block(hessian, row_slots[:, :, None], row_slots[:, None, :], row_sums)
    # the case part enters with a minus sign: shared columns map to the same parameters for
    # every user; a user's own columns against every column, and the transpose of its part
    # against the shared columns
    shared_slots = case_slots[0, :n_shared]  # (Qs,)
    _add_block(hessian, shared_slots[:, None], shared_slots[None, :], -shared_sums)
    if order is not None:
        own_slots = case_slots[:, n_shared:]  # (U', Qu)
        _add_block(hessian, own_slots[:, :, None], case_slots[:, None, :], -own_sums)
        _add_block(hessian, case_slots[:, :n_shared, None], own_slots[:, None, :],
                   -own_sums[:, :, :n_shared].transpose(1, 2))  # fmt: skip
    return -hessian.view(n_parameters, n_parameters)


def _add_block(hessian: torch.Tensor, rows, columns, values: torch.Tensor) -> None:
    """hessian[rows, columns] += values, repeated positions summed (broadcast indices)."""
    n_parameters = math.isqrt(hessian.numel())
    flat = (rows * n_parameters + columns).expand(values.shape)
    hessian.index_add_(0, flat.reshape(-1), values.reshape(-1))


def padded_groups(key: torch.Tensor, n_keys: int) -> list[Group]:
    """Positions of `key` (M,) grouped by their key, as padded tables: one per size class
    (keys of 2^b to 2^(b+1) - 1 members), so padding at most doubles the work. Keys past
    n_keys are left out."""
    order = torch.argsort(key, stable=True)  # (M,) members of each key together, in order
    counts = torch.bincount(key, minlength=n_keys)[:n_keys]  # (K,)
    starts = torch.cumsum(counts, 0) - counts  # (K,)
    present = counts.nonzero().flatten()  # (K',)
    size_class = torch.frexp(counts[present].double()).exponent  # (K',) bit length
    groups = []
    for bits in size_class.unique().tolist():  # at most about log2(M) classes
        keys = present[size_class == bits]  # (Kb,)
        sizes = counts[keys]  # (Kb,)
        position = torch.arange(int(sizes.max()), device=key.device)  # (L,)
        real = position[None, :] < sizes[:, None]  # (Kb, L)
        index = torch.where(real, starts[keys, None] + position[None, :], 0)  # (Kb, L)
        groups.append(Group(keys, order[index], real))
    return groups


def _row_part(model: ConditionalLogit, weight: torch.Tensor, n_key_users: int) -> torch.Tensor:
    """sum over slots of w p z z' per (user, alternative) key, in value-column space. (U'J, F, F)

    Dense layouts without user terms: one batched product per block of cases over the (J, F, C)
    view. Otherwise the slots grouped by key (once per model) in padded tables, one batched
    product per table.
    """
    store = model.store
    n_items, n_features = store.n_items, store.n_features
    sums = weight.new_zeros(n_key_users * n_items, n_features, n_features)
    if store.dense and n_key_users == 1:  # constant columns first, then alternative-level ones
        n_constant = store.n_constant
        for slots, cases in store.chunks():
            n_cases = cases.stop - cases.start
            values = store.columns[:, slots]  # (F, s)
            weighted = values * weight[slots]  # (F, s)
            # constant columns: the same parameters under every alternative, one product over
            # all slots, kept under alternative 0
            constant = weighted[:n_constant] @ values[:n_constant].T  # (Fc, Fc)
            sums[0, :n_constant, :n_constant] += constant
            if n_features == n_constant:
                continue
            # alternative-level columns against every column, per alternative
            grid = values.view(n_features, n_cases, n_items)  # (F, C, J)
            weighted_grid = weighted.view(n_features, n_cases, n_items)  # (F, C, J)
            if n_features - n_constant > FEW_ALTERNATIVE_COLUMNS:
                items = weighted_grid[n_constant:]  # (Fi, C, J)
                block = torch.einsum("kcj,fcj->jkf", items, grid)  # (J, Fi, F)
                sums[:, n_constant:, :] += block
                sums[:, :n_constant, n_constant:] += block[:, :, :n_constant].transpose(1, 2)
                continue
            for k in range(n_constant, n_features):  # each column against columns 0..k at once
                products = (weighted_grid[k] * grid[: k + 1]).sum(dim=1).T  # (J, k+1)
                sums[:, k, : k + 1] += products
                sums[:, :k, k] += products[:, :k]
        return sums
    if model.row_groups is None:  # the grouping depends on the data only
        model.row_groups = (
            _dense_row_groups(model, n_key_users)
            if store.dense
            else padded_groups(*_row_keys(model, n_key_users))
        )
    for group in model.row_groups:
        length = group.members.shape[1]
        step = max(1, (1 << 19) // (n_features * length))  # about 512k values at a time
        for first in range(0, group.keys.shape[0], step):
            members = group.members[first : first + step].reshape(-1)  # (k*L,) slots
            values = store.columns.index_select(1, members).view(n_features, -1, length)
            member_weight = weight[members].view(-1, length) * group.real[first : first + step]
            weighted = values * member_weight  # (F, k, L)
            products = torch.bmm(weighted.permute(1, 0, 2), values.permute(1, 2, 0))
            sums[group.keys[first : first + step]] = products  # (k, F, F) each key once
    return sums


def _dense_row_groups(model: ConditionalLogit, n_key_users: int) -> list[Group]:
    """Dense layouts: the slots of each (user, alternative) key are its user's cases at that
    alternative, so the cases are grouped by user (N values sorted, not S) and each group
    spread over the alternatives (slots offering nothing weigh 0). Keys u * J + j."""
    n_items = model.n_items
    items = torch.arange(n_items, device=model.store.columns.device)  # (J,)
    groups = []
    for group in padded_groups(model.user_of_case, n_key_users):
        n_users, length = group.members.shape
        keys = (group.keys[:, None] * n_items + items).reshape(-1)  # (Ku*J,)
        slots = group.members[:, None, :] * n_items + items[None, :, None]  # (Ku, J, L)
        real = group.real[:, None, :].expand(n_users, n_items, length)  # (Ku, J, L)
        groups.append(Group(keys, slots.reshape(-1, length), real.reshape(-1, length)))
    return groups


def _row_keys(model: ConditionalLogit, n_key_users: int) -> tuple[torch.Tensor, int]:
    """The (user, alternative) key of every slot, and the number of keys; slots offering
    nothing (padded layout) get a key past them. ((S,), K)"""
    store = model.store
    n_items = store.n_items
    key = store.item_index  # (S,)
    if n_key_users > 1:
        key = model.user_of_case[store.case_index] * n_items + key
    if store.mask is not None:  # padded layout: only offered slots
        key = torch.where(store.mask, key, n_key_users * n_items)  # a key past the end
    return key, n_key_users * n_items


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


def _case_part(
    model: ConditionalLogit,
    probability: torch.Tensor,  # (S,)
    order: torch.Tensor | None,  # (Q,) compact columns, shared ones first; None: all shared
    n_shared: int,  # Qs
    n_key_users: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over cases of w m m': over all cases for the shared columns (Qs, Qs), and per user
    for its own columns against every column (U', Qu, Q), columns in `order`."""
    store = model.store
    n_compact = n_shared if order is None else order.numel()
    shared_sums = probability.new_zeros(n_shared, n_shared)
    own_sums = probability.new_zeros(n_key_users, n_compact - n_shared, n_compact)
    if order is not None and model.case_groups is None:  # the grouping depends on the data
        model.case_groups = [
            padded_groups(model.user_of_case[cases], n_key_users) for _, cases in store.chunks()
        ]
    for number, (slots, cases) in enumerate(store.chunks()):
        compact = _compact(model, slots, cases, probability[slots])  # (C, Q)
        if order is not None:
            compact = compact[:, order]  # shared columns first: views below, no copies
        weighted = compact * model.case_weights[cases, None] if model.weighted else compact
        shared_sums += weighted[:, :n_shared].T @ compact[:, :n_shared]
        if order is None:
            continue
        weighted_own = weighted[:, n_shared:]  # (C, Qu)
        for group in model.case_groups[number]:  # the block's cases grouped by user
            left = weighted_own[group.members] * group.real[:, :, None]  # (k, L, Qu)
            products = torch.bmm(left.transpose(1, 2), compact[group.members])  # (k, Qu, Q)
            own_sums.index_add_(0, group.keys, products)
    return shared_sums, own_sums


def _compact(model: ConditionalLogit, slots: slice, cases: slice, probability) -> torch.Tensor:
    """m_n = sum_r p_r z_r of a block of cases in compact columns. (C, Q)"""
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
    return torch.cat(parts, dim=1)


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
