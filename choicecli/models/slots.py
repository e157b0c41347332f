"""The slot layout and column store shared by every model: where each row's values live.

Notation: R rows (case x offered alternative, sorted by case), N cases, J alternatives,
S slots, F value columns of all blocks, P parameters of the full layout, G groups of a block,
K its value columns.

Rows are held in one of three layouts: 'full' (every case offers every alternative, so
(N, J) views are free), 'padded' (nearly full: rows scattered into N x J slots, the missing
ones masked) or 'ragged' (sparse choice sets: one slot per row, segment sums over rows).
Cost grows with the rows in the ragged layout, with N x J in the others. The values of every
block are one feature-major (F, S) matrix; a utility linear in theta and its gradient
(`accumulate`) are computed from it block by block of cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from choicecli.design import Block
from choicecli.formula import Variation


def block_rank(block: Block) -> int:
    """A store's block order: constant terms, then per-user, then per-alternative ones."""
    variation = block.term.variation
    return 0 if not (variation.by_user or variation.by_item) else 2 if variation.by_item else 1


def reads_code(block: Block, dense: bool) -> bool:
    """Whether a store reads the block's group code slot by slot: not for constant terms, nor
    for per-alternative terms in a dense layout (there the slot's place in the grid says it)."""
    by_alternative = block.term.variation in (Variation.ITEM, Variation.ITEM_FULL)
    return not (block_rank(block) == 0 or (dense and by_alternative))


def ones_unless_given(
    case_weights: torch.Tensor | None, n_cases: int, device: torch.device
) -> torch.Tensor:
    """The case weights, or 1 for every case when none were given. (N,)"""
    if case_weights is not None:
        return case_weights
    return torch.ones(n_cases, dtype=torch.float64, device=device)


@dataclass
class HandedRows:
    """A model's row vectors, handed over: the model takes them out (leaving None) once its
    slots are laid out, so a caller holding only this no longer holds them while the model
    copies the values."""

    case_index: torch.Tensor | None  # (R,)
    item_index: torch.Tensor | None  # (R,)
    chosen: torch.Tensor | None = None  # (R,) 0/1

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        rows = (self.case_index, self.item_index, self.chosen)
        self.case_index = self.item_index = self.chosen = None
        return rows


@dataclass(frozen=True)
class Sample:
    """Every `every`-th case of a store: their offered slots there and their rows, renumbered."""

    cases: torch.Tensor  # (N',) the kept cases
    slots: torch.Tensor  # (R',) their offered slots in the store
    case_index: torch.Tensor  # (R',) compact case number of each kept row
    item_index: torch.Tensor  # (R',)

    @property
    def n_cases(self) -> int:
        return int(self.cases.shape[0])

    def of_cases(self, per_case: torch.Tensor | None) -> torch.Tensor | None:
        """A per-case vector (N,) restricted to the kept cases. (N',)"""
        return None if per_case is None else per_case[self.cases]


class ColumnStore:
    """The values of a model's blocks laid out in slots, and the utility linear in theta."""

    def __init__(
        self,
        blocks: list[Block],
        n_parameters: int,
        rows: HandedRows,
        n_cases: int,
        n_items: int,
        dense_threshold: float = 0.5,
        own_blocks: bool = False,
    ) -> None:
        """rows: taken over (see HandedRows). own_blocks: the blocks are handed over too; the
        group codes the store does not read slot by slot are dropped first, and each block's
        values (and codes) once copied, so a caller holding no other reference frees them
        column by column."""
        self.n_parameters = n_parameters
        self.n_cases = n_cases
        self.n_items = n_items
        case_index, item_index, chosen = rows.take()
        device = case_index.device
        self.n_rows = int(case_index.shape[0])
        n_slots = n_cases * n_items
        if self.n_rows == n_slots:
            self.layout = "full"
        elif self.n_rows >= dense_threshold * n_slots:
            self.layout = "padded"
        else:
            self.layout = "ragged"
        self.n_slots = self.n_rows if self.layout == "ragged" else n_slots
        if own_blocks:  # codes not read per slot go before anything (R,) is made
            for block in blocks:
                if not reads_code(block, self.dense):
                    block.code = None
        self.chosen_slot = None  # (N,) the chosen slot of each case
        chosen_row = None if chosen is None else chosen.nonzero().flatten()  # (N,) by case
        self._ragged_chosen = chosen if self.layout == "ragged" else None  # (R,)
        del chosen  # dense layouts: found, not needed any more
        positions = None  # (R,) slot of each row in the padded layout
        self.mask = None  # (N*J,) offered slots in the padded layout
        if self.layout == "padded":
            positions = case_index * n_items  # (R,)
            positions += item_index  # in place: no second (R,) temporary
        self.case_start = None  # (N+1,) first row of each case, ragged layout only
        if self.layout == "ragged":
            sizes = torch.bincount(case_index, minlength=n_cases)
            self.case_start = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)]).tolist()
        # slot -> case and alternative: stored for ragged rows, slot // J and slot % J otherwise
        self._case_index = case_index if self.layout == "ragged" else None  # (R,)
        self._item_index = item_index if self.layout == "ragged" else None  # (R,)
        del case_index, item_index  # dense layouts: laid out, not needed any more
        if positions is not None:
            self.mask = torch.zeros(n_slots, dtype=torch.bool, device=device)
            self.mask[positions] = True
        if chosen_row is not None:
            self.chosen_slot = chosen_row if positions is None else positions[chosen_row]
        self.blocks = self._arrange(blocks, self.n_slots, positions, device, own_blocks)
        # rows in slot order (sorted by case, then alternative) are the offered slots in order:
        # the mask gives them back when asked, and the (R,) vector need not be kept
        in_slot_order = positions is None or bool((positions[1:] > positions[:-1]).all())
        self._positions = None if in_slot_order else positions  # (R,)

    @property
    def dense(self) -> bool:
        return self.layout != "ragged"

    @property
    def positions(self) -> torch.Tensor | None:  # (R,) slot of each row; None: row = slot
        if self._positions is not None or self.mask is None:
            return self._positions
        return self.mask.nonzero().flatten()

    @property
    def case_index(self) -> torch.Tensor:  # (S,) the case of each slot
        return self._case_index if self._case_index is not None else self.slot_cases()

    @property
    def item_index(self) -> torch.Tensor:  # (S,) the alternative of each slot
        return self._item_index if self._item_index is not None else self.slot_items()

    @property
    def chosen(self) -> torch.Tensor | None:  # (S,) 1 at the chosen slots
        if self._ragged_chosen is not None or self.chosen_slot is None:
            return self._ragged_chosen
        chosen = torch.zeros(self.n_slots, dtype=torch.float64, device=self.chosen_slot.device)
        return chosen.index_fill_(0, self.chosen_slot, 1.0)

    def slot_cases(self, slots: slice = slice(None)) -> torch.Tensor:  # (s,)
        if self._case_index is not None:
            return self._case_index[slots]
        start, stop, _ = slots.indices(self.n_slots)
        return torch.arange(start, stop, device=self.columns.device) // self.n_items

    def slot_items(self, slots: slice = slice(None)) -> torch.Tensor:  # (s,)
        if self._item_index is not None:
            return self._item_index[slots]
        start, stop, _ = slots.indices(self.n_slots)
        return torch.arange(start, stop, device=self.columns.device) % self.n_items

    def _arrange(
        self,
        blocks: list[Block],
        n_slots: int,
        positions: torch.Tensor | None,  # (R,) slot of each row; None: row = slot
        device: torch.device,
        own_blocks: bool,
    ) -> list[Block]:
        """Order blocks constant, user, alternative-level; keep all values in one (F, S) matrix.

        Feature-major: each value column is one contiguous row, filled (and its pages first
        touched) when copied, so a caller freeing its columns as they are copied holds the
        data about once. Constant columns then form one matrix-vector product per block of
        slots, and alternative-level ones broadcast over (N, J) views.
        """
        ordered = sorted(blocks, key=block_rank)
        self.block_columns: list[tuple[int, int]] = []  # value columns of each arranged block
        n_features = sum(block.n_features for block in ordered)
        self.n_features = n_features
        self.columns = torch.empty(n_features, n_slots, dtype=torch.float64, device=device)
        self.ones_columns: list[int] = []  # intercept columns: 1 at every offered slot
        arranged, start = [], 0
        for block in ordered:  # fill column by column: no (S, F) temporaries
            stop = start + block.n_features
            for k in range(block.n_features):
                if positions is None:
                    self.columns[start + k].copy_(block.x[:, k])
                else:
                    self.columns[start + k].zero_().index_copy_(0, positions, block.x[:, k])
                if block.features[k] == "intercept":
                    self.ones_columns.append(start + k)
            code = block.code
            if not reads_code(block, self.dense):
                code = torch.zeros(1, dtype=torch.long, device=device).expand(n_slots)  # grid
            elif positions is not None:
                code = torch.zeros(n_slots, dtype=torch.long, device=device).index_copy_(
                    0, positions, block.code
                )  # missing slots: code 0, values 0
            if own_blocks:  # copied: the caller's values go once nothing else holds them
                block.x = block.code = None
            columns = self.columns[start:stop].T  # (S, K) view
            self.block_columns.append((start, stop))
            arranged.append(
                Block(block.term, block.level, block.features, columns, code, block.layout_index)
            )
            start = stop
        constant = [b for b in arranged if block_rank(b) == 0]
        self.n_constant = sum(b.n_features for b in constant)
        self.constant_index = (
            torch.cat([b.layout_index.reshape(-1) for b in constant])
            if constant
            else torch.zeros(0, dtype=torch.long, device=self.columns.device)
        )  # (Fc,)
        self.item_blocks = [
            b
            for b in arranged
            if self.dense and b.term.variation in (Variation.ITEM, Variation.ITEM_FULL)
        ]
        self.other_blocks = [
            b for b in arranged if block_rank(b) > 0 and all(b is not d for d in self.item_blocks)
        ]
        self.column_variation = [  # (by user, by alternative) of each value column
            (block.term.variation.by_user, block.term.variation.by_item)
            for block in arranged
            for _ in range(block.n_features)
        ]
        self.item_columns = [  # dense layouts: value columns of alternative-level blocks
            k
            for block, (start, stop) in zip(arranged, self.block_columns, strict=True)
            if any(block is d for d in self.item_blocks)
            for k in range(start, stop)
        ]
        self.grid_index = self._grid_index(arranged, device) if self.dense else None  # (J, F)
        return arranged

    def _grid_index(self, arranged: list[Block], device: torch.device) -> torch.Tensor:
        """Dense layouts: the coefficient of every (alternative, value column) as one (J, F)
        table of parameter numbers; columns of other blocks point at a zero past the end."""
        grid_index = torch.full((self.n_items, self.n_features), self.n_parameters,
                                dtype=torch.long, device=device)  # fmt: skip
        start = 0
        for block in arranged:
            stop = start + block.n_features
            if block_rank(block) == 0:
                grid_index[:, start:stop] = block.layout_index.reshape(1, -1)
            elif any(block is d for d in self.item_blocks):
                level = block.level.code_of_item  # (J,) nest of each alternative, or None
                items = torch.arange(self.n_items, device=device) if level is None else level
                grid_index[:, start:stop] = block.layout_index[items]
            start = stop
        return grid_index

    # -- subsamples -------------------------------------------------------------------------
    def sample(self, every: int) -> Sample:
        """Offered slots of every `every`-th case, their compact case numbers and items."""
        device = self.columns.device
        cases = torch.arange(0, self.n_cases, every, device=device)  # (N',)
        if self.dense:
            items = torch.arange(self.n_items, device=device)
            slots = (cases[:, None] * self.n_items + items).reshape(-1)  # (N'J,)
            if self.mask is not None:
                slots = slots[self.mask[slots]]
            return Sample(cases, slots, slots // (self.n_items * every), slots % self.n_items)
        slots = (self._case_index % every == 0).nonzero().flatten()  # (R',)
        return Sample(cases, slots, self._case_index[slots] // every, self._item_index[slots])

    def blocks_at(self, sample: Sample) -> list[Block]:
        """This store's blocks restricted to a sample's slots: one gather of their value rows."""
        slots, items = sample.slots, sample.item_index
        rows = self.columns[:, slots]  # (F, R')
        blocks = []
        for block, (start, stop) in zip(self.blocks, self.block_columns, strict=True):
            if any(block is item_block for item_block in self.item_blocks):  # code by item
                level = block.level.code_of_item
                code = items if level is None else level[items]
            else:
                code = block.code[slots]
            blocks.append(Block(block.term, block.level, block.features, rows[start:stop].T,
                                code, block.layout_index))  # fmt: skip
        return blocks

    def rows_at(self, sample: Sample) -> HandedRows:
        """A sample's row vectors, with the chosen ones marked where this store knows them."""
        chosen = None
        if self.chosen_slot is not None:
            marked = torch.zeros(self.n_slots, dtype=torch.bool, device=sample.slots.device)
            chosen = marked.index_fill_(0, self.chosen_slot, True)[sample.slots].double()
        return HandedRows(sample.case_index, sample.item_index, chosen)

    def subsample(self, sample: Sample) -> ColumnStore:
        """The store of a sample's rows: a copy of their values, handed over."""
        return ColumnStore(
            self.blocks_at(sample),
            self.n_parameters,
            self.rows_at(sample),
            sample.n_cases,
            self.n_items,
            own_blocks=True,
        )

    def chunks(self):
        """(slot slice, case slice) for consecutive blocks of about 512k values."""
        width = max(1, self.n_features) * self.n_items
        step = max(64, (1 << 19) // width)
        for first in range(0, self.n_cases, step):
            last = min(first + step, self.n_cases)
            if self.dense:
                yield slice(first * self.n_items, last * self.n_items), slice(first, last)
            else:
                yield (
                    slice(int(self.case_start[first]), int(self.case_start[last])),
                    slice(first, last),
                )

    # -- utility ----------------------------------------------------------------------------
    def utility(self, theta: torch.Tensor, cases: slice | None = None) -> torch.Tensor:
        """Utility of every slot (S,), or of the slots of a block of cases (dense layouts)."""
        if self.dense:  # one pass over the values, block by block of cases
            coefficients = self.grid_coefficients(theta)  # (J, F)
            chunks = (
                [(slice(cases.start * self.n_items, cases.stop * self.n_items), cases)]
                if cases is not None
                else list(self.chunks())
            )
            first = chunks[0][0].start
            size = (cases.stop - cases.start) * self.n_items if cases is not None else self.n_slots
            utility = torch.empty(size, dtype=theta.dtype, device=theta.device)  # (S,) or (C*J,)
            for slots, block_cases in chunks:
                block = self.block_utility(theta, coefficients, slots, block_cases)  # (C, J)
                utility[slots.start - first : slots.stop - first] = block.view(-1)
            return utility
        utility = theta[self.constant_index] @ self.columns[: self.n_constant]  # (S,)
        for block in self.other_blocks:
            coefficients = theta[block.layout_index]  # (G, K)
            utility = utility + (block.x * coefficients[block.code]).sum(dim=1)
        return utility

    def masked_utility(self, theta: torch.Tensor) -> torch.Tensor:  # (S,) -inf: not offered
        utility = self.utility(theta)
        return utility if self.mask is None else utility.masked_fill(~self.mask, -torch.inf)

    def grid_coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        """Dense layouts: the coefficient of every (alternative, value column). (J, F)"""
        return torch.cat([theta, theta.new_zeros(1)])[self.grid_index]

    def block_utility(
        self, theta: torch.Tensor, coefficients: torch.Tensor, slots: slice, cases: slice
    ) -> torch.Tensor:
        """Dense layouts: the utility of a block of cases, every term. (C, J)"""
        utility = self._grid_utility(theta, coefficients, slots, cases)  # (C, J)
        for block in self.other_blocks:
            per_group = theta[block.layout_index]  # (G, K)
            values = (block.x[slots] * per_group[block.code[slots]]).sum(dim=1)  # (s,)
            utility += values.view(utility.shape)
        return utility

    def _grid_utility(
        self, theta: torch.Tensor, coefficients: torch.Tensor, slots: slice, cases: slice
    ) -> torch.Tensor:
        """Dense layouts: the constant and alternative-level part of a block's utility. (C, J)

        Constant columns share one coefficient: a matrix-vector product over the block's
        contiguous rows. Alternative-level columns scale an (N, J) view by a (J,) row, and
        intercepts (1 where offered) add it: where nothing is offered the caller masks.
        """
        n_cases = cases.stop - cases.start
        values = self.columns[:, slots]  # (F, s)
        if self.n_constant:
            utility = theta[self.constant_index] @ values[: self.n_constant]  # (s,)
            utility = utility.view(n_cases, self.n_items)  # (C, J)
        else:
            utility = theta.new_zeros(n_cases, self.n_items)
        for k in self.item_columns:
            if k in self.ones_columns:
                utility += coefficients[:, k]
            else:
                utility += values[k].view(n_cases, self.n_items) * coefficients[:, k]
        return utility

    # -- gradient of the utility --------------------------------------------------------------
    def gradient_sums(self, like: torch.Tensor) -> list[torch.Tensor]:
        """Zeroed accumulators: constant columns (Fc,), alternative-level columns (J, Fi) in
        dense layouts, and each other block's (G, K)."""
        sums = [like.new_zeros(self.n_constant)]
        if self.dense:
            sums.append(like.new_zeros(self.n_items, len(self.item_columns)))
        return sums + [like.new_zeros(b.layout_index.shape) for b in self.other_blocks]

    def add_gradient(
        self, sums: list[torch.Tensor], slots: slice, residual: torch.Tensor, offered_only=False
    ) -> None:
        """sums += the block's residual times its values, per accumulator of `gradient_sums`.

        offered_only: the residual is 0 wherever nothing is offered, so intercepts need no
        product with their 0/1 column.
        """
        values = self.columns[:, slots]  # (F, s)
        flat = residual.reshape(-1)  # (s,)
        if self.n_constant:
            sums[0] += values[: self.n_constant] @ flat  # (Fc,)
        if self.dense:
            grid = residual.view(-1, self.n_items)  # (C, J)
            for i, k in enumerate(self.item_columns):
                if offered_only and k in self.ones_columns:
                    sums[1][:, i] += grid.sum(dim=0)
                else:
                    sums[1][:, i] += (values[k].view(-1, self.n_items) * grid).sum(dim=0)
        others = sums[2:] if self.dense else sums[1:]
        for block, per_group in zip(self.other_blocks, others, strict=True):
            per_group.index_add_(0, block.code[slots], block.x[slots] * flat[:, None])

    def gradient_from(self, sums: list[torch.Tensor]) -> torch.Tensor:
        """The accumulators of `gradient_sums` scattered into the layout. (P,)"""
        gradient = sums[0].new_zeros(self.n_parameters + 1)  # the last entry collects nothing
        gradient.index_add_(0, self.constant_index, sums[0])
        if self.dense:
            index = self.grid_index[:, self.item_columns]  # (J, Fi)
            gradient.index_add_(0, index.reshape(-1), sums[1].reshape(-1))
        others = sums[2:] if self.dense else sums[1:]
        for block, per_group in zip(self.other_blocks, others, strict=True):
            gradient.index_add_(0, block.layout_index.reshape(-1), per_group.reshape(-1))
        return gradient[:-1]

    def accumulate(self, residual: torch.Tensor) -> torch.Tensor:
        """sum over slots of residual[s] * d utility[s] / d theta. (S,) -> (P,)"""
        sums = self.gradient_sums(residual)
        if self.dense:
            for slots, _ in self.chunks():
                self.add_gradient(sums, slots, residual[slots])
        else:
            self.add_gradient(sums, slice(None), residual)
        return self.gradient_from(sums)

    def jacobian(self, cases: slice) -> torch.Tensor:
        """d utility / d theta for the slots of a block of cases, dense layouts only.

        (C*J, P + 1): one row per slot; the last column collects nothing.
        """
        n_items, n_features = self.n_items, self.n_features
        slots = slice(cases.start * n_items, cases.stop * n_items)
        n_slots = slots.stop - slots.start
        jacobian = self.columns.new_zeros(n_slots, self.n_parameters + 1)  # (s, P + 1)
        index = self.grid_index.expand(n_slots // n_items, n_items, n_features)  # (C, J, F)
        jacobian.scatter_add_(1, index.reshape(n_slots, n_features), self.columns[:, slots].T)
        for block in self.other_blocks:  # their columns point at the last one in grid_index
            index = block.layout_index[block.code[slots]]  # (s, K)
            jacobian.scatter_add_(1, index, block.x[slots])
        return jacobian

    def second_moments(self) -> torch.Tensor:
        """Sum over rows of each parameter's squared design value. (P,)"""
        moments = self.columns.new_zeros(self.n_parameters + 1)
        if self.dense:  # dense blocks by column per alternative, one pass over the values
            per_column = self.columns.new_zeros(self.grid_index.shape)  # (J, F)
            for slots, _ in self.chunks():
                values = self.columns[:, slots]  # (F, s)
                squares = (values * values).view(self.n_features, -1, self.n_items)  # (F, C, J)
                per_column += squares.sum(dim=1).T
            moments.index_add_(0, self.grid_index.reshape(-1), per_column.reshape(-1))
        for block in self.other_blocks if self.dense else self.blocks:
            per_group = torch.zeros(
                block.layout_index.shape, dtype=moments.dtype, device=moments.device
            ).index_add_(0, block.code, block.x**2)  # (G, K)
            moments.index_add_(0, block.layout_index.reshape(-1), per_group.reshape(-1))
        return moments[:-1]
