"""Conditional and nested logit: utilities, log-likelihoods, gradients, Hessians. No I/O.

Notation: R rows (case x offered alternative, sorted by case), N cases, J alternatives,
M nests, P parameters of the full layout (fixed ones included), F value columns of all blocks.
Models take the full layout vector `theta` (P,); `estimate` maps free parameters into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from choicecli.design import Block
from choicecli.formula import Variation

# the nested logit's analytic Hessian forms (cases x alternatives x P) blocks: up to this P
ANALYTIC_NESTED_LIMIT = 512


def segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """log(sum(exp(values))) within each segment; empty segments give -inf. (S,)"""
    top = torch.full((n_segments,), -torch.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, segment, values.detach(), reduce="amax", include_self=True)
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # (S,)
    total = torch.zeros(n_segments, dtype=values.dtype, device=values.device)
    total = total.index_add(0, segment, torch.exp(values - safe_top[segment]))  # (S,)
    return safe_top + torch.log(total)


def block_utility(blocks: list[Block], theta: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum over blocks of x[r] . beta[code[r]]. (R,)"""
    utility = torch.zeros(n_rows, dtype=theta.dtype, device=theta.device)
    for block in blocks:
        coefficients = theta[block.layout_index]  # (G, K)
        utility = utility + (block.x * coefficients[block.code]).sum(dim=1)  # (R,)
    return utility


def _rank(block: Block) -> int:
    """A model's block order: constant terms, then per-user, then per-alternative ones."""
    variation = block.term.variation
    return 0 if not (variation.by_user or variation.by_item) else 2 if variation.by_item else 1


def _reads_code(block: Block, dense: bool) -> bool:
    """Whether a model reads the block's group code slot by slot: not for constant terms, nor
    for per-alternative terms in a dense layout (there the slot's place in the grid says it)."""
    by_alternative = block.term.variation in (Variation.ITEM, Variation.ITEM_FULL)
    return not (_rank(block) == 0 or (dense and by_alternative))


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


class ConditionalLogit:
    """P(i | n) = exp(V[n,i]) / sum_j exp(V[n,j]), V linear in theta; analytic derivatives.

    Rows are held in one of three layouts: 'full' (every case offers every alternative, so
    (N, J) views are free), 'padded' (nearly full: rows scattered into N x J slots, the
    missing ones masked) or 'ragged' (sparse choice sets: segment sums over rows). Cost grows
    with the rows in the ragged layout, with N x J in the others.
    """

    def __init__(
        self,
        blocks: list[Block],
        n_parameters: int,
        case_index: torch.Tensor,  # (R,)
        item_index: torch.Tensor,  # (R,)
        n_cases: int,
        n_items: int,
        user_of_case: torch.Tensor | None = None,  # (N,)
        chosen: torch.Tensor | None = None,  # (R,) 0/1
        case_weights: torch.Tensor | None = None,  # (N,)
        dense_threshold: float = 0.5,
        own_blocks: bool = False,
    ) -> None:
        """own_blocks: the blocks are handed over; the group codes the model does not read slot
        by slot are dropped first, and each block's values (and codes) once copied, so a caller
        holding no other reference frees them column by column."""
        rows = HandedRows(case_index, item_index, chosen)
        del case_index, item_index, chosen
        self._build(blocks, n_parameters, rows, n_cases, n_items, user_of_case, case_weights,
                    dense_threshold, own_blocks)  # fmt: skip

    @classmethod
    def taking_rows(
        cls,
        blocks: list[Block],
        n_parameters: int,
        rows: HandedRows,
        n_cases: int,
        n_items: int,
        user_of_case: torch.Tensor | None = None,  # (N,)
        case_weights: torch.Tensor | None = None,  # (N,)
        dense_threshold: float = 0.5,
    ) -> ConditionalLogit:
        """The model of rows and blocks handed over: in a dense layout the row vectors go once
        the slots are laid out, and each block's values once copied (codes it does not read
        slot by slot before that), so a caller holding nothing else holds the data once while
        the model is built, then not at all."""
        model = cls.__new__(cls)
        model._build(blocks, n_parameters, rows, n_cases, n_items, user_of_case, case_weights,
                     dense_threshold, own_blocks=True)  # fmt: skip
        return model

    def _build(
        self,
        blocks: list[Block],
        n_parameters: int,
        rows: HandedRows,
        n_cases: int,
        n_items: int,
        user_of_case: torch.Tensor | None,
        case_weights: torch.Tensor | None,
        dense_threshold: float,
        own_blocks: bool,
    ) -> None:
        self.n_parameters = n_parameters
        self.n_cases = n_cases
        self.n_items = n_items
        self.user_of_case = user_of_case
        case_index, item_index, chosen = rows.take()
        device = case_index.device
        self.case_weights = (
            case_weights
            if case_weights is not None
            else torch.ones(n_cases, dtype=torch.float64, device=device)
        )
        self.weighted = case_weights is not None
        self.by_user = any(block.term.variation.by_user for block in blocks)
        n_rows = int(case_index.shape[0])
        n_slots = n_cases * n_items
        if n_rows == n_slots:
            self.layout = "full"
        elif n_rows >= dense_threshold * n_slots:
            self.layout = "padded"
        else:
            self.layout = "ragged"
        self.n_slots = n_rows if self.layout == "ragged" else n_slots
        if own_blocks:  # codes not read per slot go before anything (R,) is made
            for block in blocks:
                if not _reads_code(block, self.dense):
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
        del positions
        self._subsamples: dict[int, ConditionalLogit] = {}
        # the last point evaluated: (theta, probabilities) and (theta, Hessian), for reuse
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._probability_buffer: torch.Tensor | None = None  # (S,) dense value_and_gradient
        self._last_hessian: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

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
        return self._case_index if self._case_index is not None else self._slot_cases()

    @property
    def item_index(self) -> torch.Tensor:  # (S,) the alternative of each slot
        return self._item_index if self._item_index is not None else self._slot_items()

    @property
    def chosen(self) -> torch.Tensor | None:  # (S,) 1 at the chosen slots
        if self._ragged_chosen is not None or self.chosen_slot is None:
            return self._ragged_chosen
        chosen = torch.zeros(self.n_slots, dtype=torch.float64, device=self.chosen_slot.device)
        return chosen.index_fill_(0, self.chosen_slot, 1.0)

    def _slot_cases(self, slots: slice = slice(None)) -> torch.Tensor:  # (s,)
        if self._case_index is not None:
            return self._case_index[slots]
        start, stop, _ = slots.indices(self.n_slots)
        return torch.arange(start, stop, device=self.columns.device) // self.n_items

    def _slot_items(self, slots: slice = slice(None)) -> torch.Tensor:  # (s,)
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

        ordered = sorted(blocks, key=_rank)
        self._block_columns: list[tuple[int, int]] = []  # value columns of each arranged block
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
            if not _reads_code(block, self.dense):
                code = torch.zeros(1, dtype=torch.long, device=device).expand(n_slots)  # grid
            elif positions is not None:
                code = torch.zeros(n_slots, dtype=torch.long, device=device).index_copy_(
                    0, positions, block.code
                )  # missing slots: code 0, values 0
            if own_blocks:  # copied: the caller's values go once nothing else holds them
                block.x = block.code = None
            columns = self.columns[start:stop].T  # (S, K) view
            self._block_columns.append((start, stop))
            arranged.append(
                Block(block.term, block.level, block.features, columns, code, block.layout_index)
            )
            start = stop
        constant = [b for b in arranged if _rank(b) == 0]
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
            b for b in arranged if _rank(b) > 0 and all(b is not d for d in self.item_blocks)
        ]
        self._column_variation = [  # (by user, by alternative) of each value column
            (block.term.variation.by_user, block.term.variation.by_item)
            for block in arranged
            for _ in range(block.n_features)
        ]
        self.item_columns = [  # dense layouts: value columns of alternative-level blocks
            k
            for block, (start, stop) in zip(arranged, self._block_columns, strict=True)
            if any(block is d for d in self.item_blocks)
            for k in range(start, stop)
        ]
        # dense layouts: the coefficient of every (alternative, value column) as one (J, F)
        # table of parameter numbers; columns of other blocks point at a zero past the end
        self.grid_index = None
        if self.dense:
            grid_index = torch.full((self.n_items, n_features), self.n_parameters,
                                    dtype=torch.long, device=device)  # fmt: skip
            start = 0
            for block in arranged:
                stop = start + block.n_features
                if _rank(block) == 0:
                    grid_index[:, start:stop] = block.layout_index.reshape(1, -1)
                elif any(block is d for d in self.item_blocks):
                    level = block.level.code_of_item  # (J,) nest of each alternative, or None
                    items = torch.arange(self.n_items, device=device) if level is None else level
                    grid_index[:, start:stop] = block.layout_index[items]
                start = stop
            self.grid_index = grid_index  # (J, F)
        return arranged

    def subsample_rows(self, every: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Offered slots of every `every`-th case, their compact case numbers and items."""
        device = self.columns.device
        if self.dense:
            cases = torch.arange(0, self.n_cases, every, device=device)  # (N',)
            items = torch.arange(self.n_items, device=device)
            slots = (cases[:, None] * self.n_items + items).reshape(-1)  # (N'J,)
            if self.mask is not None:
                slots = slots[self.mask[slots]]
            return slots, slots // (self.n_items * every), slots % self.n_items
        slots = (self._case_index % every == 0).nonzero().flatten()  # (R',)
        return slots, self._case_index[slots] // every, self._item_index[slots]

    def blocks_at(self, slots: torch.Tensor, items: torch.Tensor) -> list[Block]:
        """This model's blocks restricted to some slots: one gather of their value rows."""
        rows = self.columns[:, slots]  # (F, R')
        blocks = []
        for block, (start, stop) in zip(self.blocks, self._block_columns, strict=True):
            if any(block is item_block for item_block in self.item_blocks):  # code by item
                level = block.level.code_of_item
                code = items if level is None else level[items]
            else:
                code = block.code[slots]
            blocks.append(Block(block.term, block.level, block.features, rows[start:stop].T,
                                code, block.layout_index))  # fmt: skip
        return blocks

    def chosen_at(self, slots: torch.Tensor) -> torch.Tensor | None:  # (R',) 0/1
        if self.chosen_slot is None:
            return None
        marked = torch.zeros(self.n_slots, dtype=torch.bool, device=slots.device)
        return marked.index_fill_(0, self.chosen_slot, True)[slots].double()

    def subsample(self, every: int) -> ConditionalLogit:
        """The same model on every `every`-th case (a copy of a 1/every share of the values),
        for a cheap starting point of the full fit and rank check; built once."""
        if every not in self._subsamples:
            slots, case_index, item_index = self.subsample_rows(every)
            cases = torch.arange(0, self.n_cases, every, device=slots.device)  # (N',)
            self._subsamples[every] = ConditionalLogit(
                self.blocks_at(slots, item_index),
                self.n_parameters,
                case_index,
                item_index,
                int(cases.shape[0]),
                self.n_items,
                None if self.user_of_case is None else self.user_of_case[cases],
                self.chosen_at(slots),
                self.case_weights[cases] if self.weighted else None,
                own_blocks=True,
            )
        return self._subsamples[every]

    def drop_subsamples(self) -> None:
        """Forget the cached subsamples (their share of the values) once the fit is past them."""
        self._subsamples.clear()

    # -- likelihood -------------------------------------------------------------------------
    def utility(self, theta: torch.Tensor, cases: slice | None = None) -> torch.Tensor:
        """Utility of every slot (S,), or of the slots of a block of cases (dense layouts)."""
        if self.dense:  # one pass over the values, block by block of cases
            coefficients = self._grid_coefficients(theta)  # (J, F)
            chunks = (
                [(slice(cases.start * self.n_items, cases.stop * self.n_items), cases)]
                if cases is not None
                else list(self._chunks())
            )
            first = chunks[0][0].start
            size = (cases.stop - cases.start) * self.n_items if cases is not None else self.n_slots
            utility = torch.empty(size, dtype=theta.dtype, device=theta.device)  # (S,) or (C*J,)
            for slots, block_cases in chunks:
                block = self._block_utility(theta, coefficients, slots, block_cases)  # (C, J)
                utility[slots.start - first : slots.stop - first] = block.view(-1)
            return utility
        utility = theta[self.constant_index] @ self.columns[: self.n_constant]  # (S,)
        for block in self.other_blocks:
            coefficients = theta[block.layout_index]  # (G, K)
            utility = utility + (block.x * coefficients[block.code]).sum(dim=1)
        return utility

    def _grid_coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        """Dense layouts: the coefficient of every (alternative, value column). (J, F)"""
        return torch.cat([theta, theta.new_zeros(1)])[self.grid_index]

    def _block_utility(
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

    def _log_normaliser(self, utility: torch.Tensor) -> torch.Tensor:  # (N,)
        if self.dense:
            return utility.view(self.n_cases, self.n_items).logsumexp(dim=1)  # masked: -inf
        return segment_logsumexp(utility, self.case_index, self.n_cases)

    def _masked_utility(self, theta: torch.Tensor) -> torch.Tensor:  # (S,) -inf where not offered
        utility = self.utility(theta)
        return utility if self.mask is None else utility.masked_fill(~self.mask, -torch.inf)

    def _probability(self, utility: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
        """exp(utility - normaliser of its case), broadcast in dense layouts. (S,)"""
        if self.dense:
            grid = utility.view(self.n_cases, self.n_items) - normaliser[:, None]
            return torch.exp(grid).view(-1)
        return torch.exp(utility - normaliser[self.case_index])

    def log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (S,)
        utility = self._masked_utility(theta)
        return utility - self._log_normaliser(utility)[self.case_index]

    def row_log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,) input rows
        log_p = self.log_probabilities(theta)  # (S,)
        positions = self.positions  # (R,) made from the mask when rows are in slot order
        return log_p if positions is None else log_p[positions]

    def log_likelihood(self, theta: torch.Tensor) -> torch.Tensor:
        utility = self._masked_utility(theta)
        normaliser = self._log_normaliser(utility)  # (N,)
        return (self.case_weights * (utility[self.chosen_slot] - normaliser)).sum()

    def value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood and its gradient: sum_r w (y_r - p_r) z_r. ((), (P,))"""
        if self.dense:
            return self._dense_value_and_gradient(theta)
        utility = self._masked_utility(theta)  # (S,)
        normaliser = self._log_normaliser(utility)  # (N,)
        value = (self.case_weights * (utility[self.chosen_slot] - normaliser)).sum()
        probability = self._probability(utility, normaliser)  # (S,) 0 where masked
        self._last = (theta.clone(), probability)  # a Newton step asks the Hessian here next
        residual = self.chosen - probability
        if self.weighted:
            residual = self.case_weights[self.case_index] * residual
        return value, self.accumulate(residual)

    def _dense_value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """value_and_gradient in one pass over blocks of cases: every temporary is a block's,
        so it stays in cache and is reused, and each block's values are read while warm."""
        n_items = self.n_items
        self._last = (None, None)  # the buffer below is rewritten: nothing may point into it
        if self._probability_buffer is None:  # one buffer for every call: no fresh pages
            self._probability_buffer = theta.new_empty(self.n_slots)
        probability = self._probability_buffer  # (S,)
        sums = self._gradient_sums(theta)
        coefficients = self._grid_coefficients(theta)  # (J, F) once, for every block
        value = theta.new_zeros(())
        for slots, cases in self._chunks():
            n_cases = cases.stop - cases.start
            utility = self._block_utility(theta, coefficients, slots, cases)  # (C, J)
            if self.mask is not None:
                utility.masked_fill_(~self.mask[slots].view(n_cases, n_items), -torch.inf)
            # log-sum-exp by hand, so the exponentials serve the probabilities too
            top = utility.amax(dim=1, keepdim=True)  # (C, 1) finite: every case offers one
            exponential = torch.exp(utility - top)  # (C, J) 0 where not offered
            total = exponential.sum(dim=1, keepdim=True)  # (C, 1)
            block_probability = probability[slots].view(n_cases, n_items)  # (C, J) view
            torch.div(exponential, total, out=block_probability)
            chosen_local = self.chosen_slot[cases] - slots.start  # (C,)
            normaliser = (top + torch.log(total)).view(-1)  # (C,)
            weights = self.case_weights[cases]  # (C,)
            value += (weights * (utility.view(-1)[chosen_local] - normaliser)).sum()
            residual = torch.neg(block_probability)  # (C, J) y - p, y added at the chosen slots
            residual.view(-1)[chosen_local] += 1.0
            if self.weighted:
                residual *= weights[:, None]
            self._add_gradient(sums, slots, residual, offered_only=True)
        self._last = (theta.clone(), probability)  # a Newton step asks the Hessian here next
        return value, self._gradient_from(sums)

    def _gradient_sums(self, like: torch.Tensor) -> list[torch.Tensor]:
        """Zeroed accumulators: constant columns (Fc,), alternative-level columns (J, Fi) in
        dense layouts, and each other block's (G, K)."""
        sums = [like.new_zeros(self.n_constant)]
        if self.dense:
            sums.append(like.new_zeros(self.n_items, len(self.item_columns)))
        return sums + [like.new_zeros(b.layout_index.shape) for b in self.other_blocks]

    def _add_gradient(
        self, sums: list[torch.Tensor], slots: slice, residual: torch.Tensor, offered_only=False
    ) -> None:
        """sums += the block's residual times its values, per accumulator of `_gradient_sums`.

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

    def _gradient_from(self, sums: list[torch.Tensor]) -> torch.Tensor:
        """The accumulators of `_gradient_sums` scattered into the layout. (P,)"""
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
        sums = self._gradient_sums(residual)
        if self.dense:
            for slots, _ in self._chunks():
                self._add_gradient(sums, slots, residual[slots])
        else:
            self._add_gradient(sums, slice(None), residual)
        return self._gradient_from(sums)

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
            for slots, _ in self._chunks():
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

    # -- Hessian ----------------------------------------------------------------------------
    def hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """Hessian of the log-likelihood: -sum_n w_n Z_n' (diag p_n - p_n p_n') Z_n. (P, P)

        Computed in two parts, each grouped by what the coefficients vary with, so the cost
        is rows x F^2 plus cases x Q^2, never rows x P^2:
        H1 = sum_r w p_r z_r z_r' grouped by (user, alternative) and
        H2 = sum_n w_n m_n m_n' with m_n = sum_r p_r z_r held compactly per case.
        Both are accumulated over blocks of cases, so temporaries stay small.
        """
        cached_theta, cached = self._last_hessian
        if cached_theta is not None and torch.equal(cached_theta, theta):
            return cached.clone()  # the rank check and Newton's first step share theta = 0
        last_theta, probability = self._last
        if last_theta is None or not torch.equal(last_theta, theta):
            utility = self._masked_utility(theta)  # (S,)
            probability = self._probability(utility, self._log_normaliser(utility))  # (S,)
        n_key_users = self._key_users()
        n_features = self.n_features
        row_sums = torch.zeros(n_key_users * self.n_items, n_features, n_features,
                               dtype=theta.dtype, device=theta.device)  # fmt: skip
        case_slots = self._case_slots(n_key_users)  # (U', Q)
        n_compact = case_slots.shape[1]
        case_sums = torch.zeros(n_key_users, n_compact, n_compact, dtype=theta.dtype,
                                device=theta.device)  # fmt: skip
        for slots, cases in self._chunks():
            self._add_row_part(row_sums, slots, cases, probability[slots])
            self._add_case_part(case_sums, slots, cases, probability[slots])
        hessian = torch.zeros(self.n_parameters, self.n_parameters, dtype=theta.dtype,
                              device=theta.device)  # fmt: skip
        row_slots = self._row_slots(n_key_users)  # (U'J, F)
        hessian.index_put_((row_slots[:, :, None], row_slots[:, None, :]), row_sums,
                           accumulate=True)  # fmt: skip
        hessian.index_put_((case_slots[:, :, None], case_slots[:, None, :]), -case_sums,
                           accumulate=True)  # fmt: skip
        self._last_hessian = (theta.clone(), -hessian)
        return -hessian

    def _chunks(self):
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

    def _key_users(self) -> int:
        if not self.by_user:
            return 1
        return int(self.user_of_case.max()) + 1 if self.user_of_case is not None else 1

    def _code_table(self, block: Block, n_key_users: int) -> torch.Tensor:
        """The block's code for every (user, alternative) key. (U', J)"""
        device = self.columns.device
        users = torch.arange(n_key_users, device=device)[:, None]  # (U', 1)
        items = torch.arange(self.n_items, device=device)[None, :]  # (1, J)
        variation = block.term.variation
        level_items = items if block.level.code_of_item is None else block.level.code_of_item[items]
        code = torch.zeros(n_key_users, self.n_items, dtype=torch.long, device=device)
        if variation.by_user:
            code = code + users * (len(block.level.labels) if variation.by_item else 1)
        if variation.by_item:
            code = code + level_items
        return code

    def _row_slots(self, n_key_users: int) -> torch.Tensor:
        """Parameter number of each value column under each (user, alternative) key. (U'J, F)"""
        return torch.cat(
            [b.layout_index[self._code_table(b, n_key_users).reshape(-1)] for b in self.blocks],
            dim=1,
        )

    def _case_slots(self, n_key_users: int) -> torch.Tensor:
        """Parameter number of each compact per-case column, per user. (U', Fa + Fb*J)"""
        case_level = [b for b in self.blocks if not b.term.variation.by_item]
        item_level = [b for b in self.blocks if b.term.variation.by_item]
        slots = []
        if case_level:
            tables = [b.layout_index[self._code_table(b, n_key_users)[:, 0]] for b in case_level]
            slots.append(torch.cat(tables, dim=1))  # (U', Fa)
        if item_level:  # column-major: all alternatives of a value column, then the next
            tables = [
                b.layout_index[self._code_table(b, n_key_users)].transpose(1, 2)  # (U', K, J)
                for b in item_level
            ]
            slots.append(torch.cat(tables, dim=1).reshape(n_key_users, -1))  # (U', Fb*J)
        return torch.cat(slots, dim=1)

    def _add_row_part(self, sums, slots: slice, cases: slice, probability) -> None:
        """sums[key] += sum over the block's slots of w p z z' (in value-column space)."""
        n_cases, n_features = cases.stop - cases.start, self.n_features
        weight = probability  # (s,)
        if self.weighted:
            weight = self.case_weights[self._slot_cases(slots)] * probability
        values = self.columns[:, slots]  # (F, s)
        weighted = values * weight  # (F, s)
        first_item = self.n_constant  # dense, no user terms: constant columns, then by item
        if self.dense and not self.by_user and len(self.item_columns) == n_features - first_item:
            # constant columns map to the same parameters under every alternative: one
            # product over all slots, kept under alternative 0
            if first_item:
                sums[0, :first_item, :first_item] += weighted[:first_item] @ values[:first_item].T
            grid = values.view(n_features, n_cases, self.n_items)  # (F, C, J)
            weighted_grid = weighted.view(n_features, n_cases, self.n_items)  # (F, C, J)
            for k in self.item_columns:  # each pair once: column k against columns 0..k
                products = (weighted_grid[k] * grid[: k + 1]).sum(dim=1).T  # (J, k+1)
                sums[:, k, : k + 1] += products
                sums[:, :k, k] += products[:, :k]
            return
        # any layout: each pair of columns once, summed by what its two parameters vary with
        # (one bincount per pair: torch's index_add_ of (s, F^2) rows is far slower)
        keys: dict[tuple[bool, bool], torch.Tensor] = {}  # (by user, by alternative) -> (s,)
        keys[False, True] = self._slot_items(slots)
        if self.by_user:
            keys[True, False] = self.user_of_case[self._slot_cases(slots)] * self.n_items
            keys[True, True] = keys[True, False] + keys[False, True]
        for f, (f_user, f_item) in enumerate(self._column_variation):
            for g, (g_user, g_item) in enumerate(self._column_variation[: f + 1]):
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

    def _add_case_part(self, sums, slots: slice, cases: slice, probability) -> None:
        """sums[user] += sum over the block's cases of w m m' (compact per-case columns)."""
        n_cases, n_items = cases.stop - cases.start, self.n_items
        n_case_level = sum(b.n_features for b in self.blocks if not b.term.variation.by_item)
        values = self.columns[:, slots] * probability  # (F, s)
        local_case = None if self.dense else self._slot_cases(slots) - cases.start  # (s,)
        parts = []
        if n_case_level and self.dense:
            grid = values[:n_case_level].view(n_case_level, n_cases, n_items)  # (Fa, C, J)
            parts.append(grid.sum(dim=2).T)  # (C, Fa)
        elif n_case_level:
            summed = values.new_zeros(n_cases, n_case_level)
            parts.append(summed.index_add_(0, local_case, values[:n_case_level].T))
        if self.n_features > n_case_level:
            item_values = values[n_case_level:]  # (Fb, s)
            if self.dense:
                spread = item_values  # already (Fb, C*J) in slot order
            else:
                spread = values.new_zeros(item_values.shape[0], n_cases * n_items)
                spread[:, local_case * n_items + self._slot_items(slots)] = item_values
            spread = spread.view(-1, n_cases, n_items).transpose(0, 1)  # (C, Fb, J)
            parts.append(spread.reshape(n_cases, -1))  # (C, Fb*J)
        compact = torch.cat(parts, dim=1)  # (C, Q)
        weighted = compact * self.case_weights[cases, None] if self.weighted else compact
        if sums.shape[0] == 1:
            sums[0] += weighted.T @ compact
            return
        # shared columns map to the same parameters for every user: one product over all
        # cases, kept under user 0; only the rows of user-specific columns go per user
        shared, own = self._compact_by_user(n_case_level)
        sums[0, shared[:, None], shared[None, :]] += weighted[:, shared].T @ compact[:, shared]
        outer = weighted[:, own].T[:, None, :] * compact.T[None, :, :]  # (Qu, Q, C)
        users = self.user_of_case[cases]  # (C,)
        per_user = torch.stack(  # one bincount per column: faster than index_add_ of rows
            [
                torch.bincount(users, weights=column, minlength=sums.shape[0])
                for column in outer.reshape(-1, n_cases)
            ],
            dim=1,
        ).view(sums.shape[0], own.numel(), compact.shape[1])  # (U', Qu, Q)
        sums[:, own, :] += per_user
        sums[:, shared[:, None], own[None, :]] += per_user[:, :, shared].transpose(1, 2)

    def _compact_by_user(self, n_case_level: int):
        """Compact per-case columns (case-level ones, then item-level ones x J): positions of
        those shared by all users and of the user-specific ones. ((Qs,), (Qu,))"""
        by_user = [
            block.term.variation.by_user for block in self.blocks for _ in range(block.n_features)
        ]  # one flag per value column, in value-column order
        item_level = [flag for flag in by_user[n_case_level:] for _ in range(self.n_items)]
        flags = torch.tensor(by_user[:n_case_level] + item_level, dtype=torch.bool,
                             device=self.columns.device)  # fmt: skip
        return (~flags).nonzero().flatten(), flags.nonzero().flatten()


class NestedLogit:
    """Two-level nested logit (Train ch. 4).

    Nearly full choice sets ('grid', (N, J) views): analytic gradient and Hessian, Newton up
    to ANALYTIC_NESTED_LIMIT parameters. Sparse ones (segment sums over rows): derivatives by
    automatic differentiation, whose Hessian costs about P gradients, so Newton only while
    that is cheap (`newton_limit`), else L-BFGS with one final Hessian for standard errors.

    P(i) = P(i | k) P(k), P(i | k) = exp(Y_i / l_k) / sum_{j in k} exp(Y_j / l_k),
    I_k = log sum_{j in k} exp(Y_j / l_k), P(k) = exp(W_k + l_k I_k) / sum_m exp(W_m + l_m I_m).
    """

    def __init__(
        self,
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
    ) -> None:
        # Newton needs a Hessian per step: analytic in dense layouts; elsewhere by autograd
        # (about P gradients), so only when cheap; otherwise L-BFGS first, then a Newton
        # polish (estimate.maximise)
        cheap = int(case_index.shape[0]) * n_parameters <= 5_000_000
        self.newton_limit = 40 if cheap else 0
        self.item_blocks = item_blocks
        self.nest_blocks = nest_blocks
        self.lambda_index = lambda_index
        self.n_parameters = n_parameters
        self.case_index = case_index
        self.n_cases = n_cases
        self.n_rows = int(case_index.shape[0])
        self.chosen = chosen
        device = case_index.device
        self.weighted = case_weights is not None
        self.case_weights = (
            case_weights
            if case_weights is not None
            else torch.ones(n_cases, dtype=torch.float64, device=device)
        )
        n_nests = int(lambda_index.shape[0])
        self.n_nests = n_nests
        self.nest_of_item = nest_of_item
        self.n_items = int(nest_of_item.shape[0])
        self.grid = None
        if self.n_rows >= dense_threshold * n_cases * self.n_items:
            # nearly full choice sets: (N, J) grids, utilities from padded conditional logits
            args = (n_parameters, case_index, item_index, n_cases, self.n_items)
            self.grid = ConditionalLogit(item_blocks, *args, chosen=chosen, dense_threshold=0)
            self.nest_grid = ConditionalLogit(nest_blocks, *args, dense_threshold=0)
            members = [(nest_of_item == k).nonzero().flatten() for k in range(n_nests)]
            # a nest whose alternatives are consecutive codes is a slice: a view, not a copy
            self.members = [
                slice(int(m[0]), int(m[-1]) + 1)
                if m.numel() and bool((m == torch.arange(int(m[0]), int(m[0]) + m.numel())).all())
                else m
                for m in members
            ]
            chosen_slot = self.grid.chosen_slot if chosen is not None else None
            self.chosen_item = None if chosen_slot is None else chosen_slot % self.n_items  # (N,)
            self.newton_limit = ANALYTIC_NESTED_LIMIT
            self._subsamples: dict[int, NestedLogit] = {}
            self._last_state: tuple[torch.Tensor | None, dict | None] = (None, None)
            # the structured Hessian: per nest, the parameter of each compact column of Zbar
            # (constant columns, each member's alternative-level columns, the nest's lambda)
            self._compact_columns = None
            if not self.grid.other_blocks and not self.nest_grid.n_features:
                grid_index, n_constant = self.grid.grid_index, self.grid.n_constant
                self._compact_columns = [
                    torch.cat(
                        [
                            grid_index[0, :n_constant],
                            grid_index[members, n_constant:].reshape(-1),
                            lambda_index[k : k + 1],
                        ]
                    )
                    for k, members in enumerate(self.members)
                ]
            return
        self.nest_of_row = nest_of_item[item_index]  # (R,)
        pair_key = case_index * n_nests + self.nest_of_row  # (R,) one per (case, nest) pair
        unique_keys, self.pair_of_row = torch.unique(pair_key, return_inverse=True)  # (Q,), (R,)
        self.n_pairs = int(unique_keys.shape[0])
        self.case_of_pair = unique_keys // n_nests  # (Q,)
        self.nest_of_pair = unique_keys % n_nests  # (Q,)
        first_row = torch.full((self.n_pairs,), self.n_rows, dtype=torch.long, device=device)
        rows = torch.arange(self.n_rows, device=device)
        self.first_row_of_pair = first_row.scatter_reduce(0, self.pair_of_row, rows, "amin")

    def subsample(self, every: int) -> NestedLogit | None:
        """The same model on every `every`-th case (dense layouts only), as a starting point."""
        if self.grid is None:
            return None
        if every not in self._subsamples:
            slots, case_index, item_index = self.grid.subsample_rows(every)
            cases = torch.arange(0, self.n_cases, every, device=slots.device)  # (N',)
            self._subsamples[every] = NestedLogit(
                self.grid.blocks_at(slots, item_index),
                self.nest_grid.blocks_at(slots, item_index),
                self.lambda_index,
                self.nest_of_item,
                self.n_parameters,
                case_index,
                item_index,
                int(cases.shape[0]),
                self.grid.chosen_at(slots),
                self.case_weights[cases] if self.weighted else None,
            )
        return self._subsamples[every]

    def drop_subsamples(self) -> None:
        """Forget the cached subsamples (their share of the values) once the fit is past them."""
        if self.grid is not None:
            self._subsamples.clear()

    def _grid_terms(self, theta: torch.Tensor, cases: slice | None = None):
        """Dense layout: scaled utilities (C, J), inclusive values, upper utilities (C, M)
        and the case normaliser (C,)."""
        grid, n_items = self.grid, self.n_items
        lambdas = theta[self.lambda_index]  # (M,)
        utility = grid.utility(theta, cases).view(-1, n_items)  # (C, J)
        scaled = utility / lambdas[self.nest_of_item]  # (C, J)
        offered = None
        if grid.mask is not None:  # mask after scaling: -inf / lambda has no gradient
            offered = grid.mask.view(-1, n_items)[cases if cases is not None else slice(None)]
            scaled = scaled.masked_fill(~offered, -torch.inf)
        inclusive = torch.stack([scaled[:, m].logsumexp(dim=1) for m in self.members], dim=1)
        present = torch.isfinite(inclusive)  # (C, M) nests with an offered alternative
        inclusive = inclusive.masked_fill(~present, 0.0)  # finite, so lambda * I has a gradient
        upper = lambdas * inclusive  # (C, M)
        if self.nest_grid.n_features:  # W_m: the nest formula, constant within a nest
            nest_utility = self.nest_grid.utility(theta, cases).view(-1, n_items)  # (C, J)
            if offered is not None:
                nest_utility = nest_utility.masked_fill(~offered, -torch.inf)
            nest_value = torch.stack([nest_utility[:, m].amax(dim=1) for m in self.members], 1)
            upper = upper + nest_value.masked_fill(~present, 0.0)
        upper = upper.masked_fill(~present, -torch.inf)  # (C, M)
        return scaled, inclusive, upper, upper.logsumexp(dim=1)

    def _grid_log_likelihood(self, theta: torch.Tensor, cases: slice | None = None):
        scaled, inclusive, upper, normaliser = self._grid_terms(theta, cases)
        rows = torch.arange(scaled.shape[0], device=scaled.device)
        item = self.chosen_item[cases if cases is not None else slice(None)]  # (C,)
        nest = self.nest_of_item[item]  # (C,)
        per_case = scaled[rows, item] - inclusive[rows, nest] + upper[rows, nest] - normaliser
        weights = self.case_weights[cases if cases is not None else slice(None)]
        return (weights * per_case).sum()

    def log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,)
        if self.grid is not None:
            scaled, inclusive, upper, normaliser = self._grid_terms(theta)
            nest = self.nest_of_item
            log_p = scaled - inclusive[:, nest] + upper[:, nest] - normaliser[:, None]  # (N, J)
            log_p = log_p.reshape(-1)
            positions = self.grid.positions  # (R,)
            return log_p if positions is None else log_p[positions]
        lambdas = theta[self.lambda_index]  # (M,)
        scaled = block_utility(self.item_blocks, theta, self.n_rows) / lambdas[self.nest_of_row]
        inclusive = segment_logsumexp(scaled, self.pair_of_row, self.n_pairs)  # (Q,)
        nest_utility = block_utility(self.nest_blocks, theta, self.n_rows)  # (R,)
        upper = nest_utility[self.first_row_of_pair] + lambdas[self.nest_of_pair] * inclusive
        normaliser = segment_logsumexp(upper, self.case_of_pair, self.n_cases)  # (N,)
        pair = self.pair_of_row
        return scaled - inclusive[pair] + upper[pair] - normaliser[self.case_index]

    def row_log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,)
        return self.log_probabilities(theta)

    def log_likelihood(self, theta: torch.Tensor) -> torch.Tensor:
        if self.grid is not None:
            return self._grid_log_likelihood(theta)
        row_weight = self.case_weights[self.case_index]  # (R,)
        return (row_weight * self.chosen * self.log_probabilities(theta)).sum()

    def value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grid is not None:
            return self._grid_value_and_gradient(theta)
        with torch.enable_grad():
            point = theta.detach().requires_grad_(True)
            value = self.log_likelihood(point)
            (gradient,) = torch.autograd.grad(value, point)
        return value.detach(), gradient

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:  # (P, P)
        if self.grid is not None and self.n_parameters <= ANALYTIC_NESTED_LIMIT:
            cached_theta, state = self._last_state
            if cached_theta is None or not torch.equal(cached_theta, theta):
                state = self._grid_state(theta)
            width = self.n_parameters + 1
            total = theta.new_zeros(width, width)
            per_case = self.n_items * max(width, self.grid.n_features + 1)
            step = max(16, (1 << 20) // per_case)
            for first in range(0, self.n_cases, step):
                cases = slice(first, min(first + step, self.n_cases))
                total += self._grid_hessian(theta, state, cases)
            return total[:-1, :-1]
        # vmap over P directions wins for few parameters, P backward passes for many;
        # in dense layouts, summed over blocks of cases to keep P copies of a block small
        vectorize = self.n_parameters <= 64 and self.n_rows * self.n_parameters <= 20_000_000
        if self.grid is None:
            with torch.enable_grad():
                return torch.autograd.functional.hessian(
                    self.log_likelihood, theta.detach(), vectorize=vectorize
                )
        step = max(256, (1 << 18) // self.n_items)
        total = theta.new_zeros(theta.shape[0], theta.shape[0])
        for first in range(0, self.n_cases, step):
            cases = slice(first, min(first + step, self.n_cases))
            with torch.enable_grad():
                total += torch.autograd.functional.hessian(
                    lambda t, c=cases: self._grid_log_likelihood(t, c), theta.detach(),
                    vectorize=vectorize,
                )  # fmt: skip
        return total

    # -- analytic derivatives, dense layout -------------------------------------------------
    # Per case with chosen i in nest k: l = s_i - I_k + T_k - L, where s_j = V_j / lambda_m(j),
    # I_m = logsumexp_{j in m} s_j, T_m = W_m + lambda_m I_m, L = logsumexp_m T_m. With
    # q_j = exp(s_j - I_m(j)) and P_m = exp(T_m - L), the derivatives in theta use
    # Z_j = dV_j - s_j dlambda_m(j), Zbar_m = sum_{j in m} q_j Z_j, G_m = dT_m = dW_m + Zbar_m
    # + I_m dlambda_m:  dl = (Z_i - Zbar_k) / lambda_k + G_k - sum_m P_m G_m, and
    # d2l = sum_j rho_j Z_j Z_j' + sum_m pi_m Zbar_m Zbar_m' - sum_m P_m G_m G_m' + Gbar Gbar'
    #       - (a dlambda_k' + dlambda_k a') / lambda_k^2 + 2 (s_i - A_k) / lambda_k^2 dl_k dl_k'
    # with rho_j = q_j ([m(j) = k] (lambda_k - 1) / lambda_k^2 - P_m(j) / lambda_m(j)),
    # pi_m = P_m / lambda_m - [m = k] (lambda_k - 1) / lambda_k^2, a = dV_i - sum_{j in k} q_j dV_j
    # and A_m = sum_{j in m} q_j s_j. Tests check both against autograd and finite differences.

    def _grid_state(self, theta: torch.Tensor) -> dict:
        """Everything the value and derivatives need: (N, J) and (N, M) tensors, and lambdas."""
        scaled, inclusive, upper, normaliser = self._grid_terms(theta)
        nest = self.nest_of_item  # (J,)
        offered = torch.isfinite(scaled)  # (N, J)
        within = torch.exp(scaled - inclusive[:, nest])  # (N, J) q, 0 where not offered
        share = torch.exp(upper - normaliser[:, None])  # (N, M) P, 0 where no alternative
        scaled = scaled.masked_fill(~offered, 0.0)  # (N, J)
        mean_scaled = torch.zeros_like(inclusive).index_add_(1, nest, within * scaled)  # (N, M)
        item = self.chosen_item  # (N,)
        chosen_nest = nest[item]  # (N,)
        rows = torch.arange(item.shape[0], device=item.device)
        value = (
            scaled[rows, item]
            - inclusive[rows, chosen_nest]
            + upper[rows, chosen_nest]
            - normaliser
        )  # (N,)
        state = {
            "scaled": scaled, "inclusive": inclusive, "within": within, "share": share,
            "mean_scaled": mean_scaled, "item": item, "nest": chosen_nest, "value": value,
            "weights": self.case_weights,
        }  # fmt: skip
        self._last_state = (theta.clone(), state)  # a Newton step asks the Hessian here next
        return state

    def _grid_value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._grid_state(theta)
        nest, lambdas, weights = self.nest_of_item, theta[self.lambda_index], state["weights"]
        within, share, item, chosen_nest = (state[k] for k in ("within", "share", "item", "nest"))
        rows = torch.arange(item.shape[0], device=item.device)
        in_chosen = (nest[None, :] == chosen_nest[:, None]).to(theta.dtype)  # (N, J)
        value = (weights * state["value"]).sum()
        # coefficients of dV_j and dW_j: (y_j - [j in k] q_j) / lambda_k + ([j in k] - P_m) q_j
        upper_part = (in_chosen - share[:, nest]) * within  # (C, J)
        lower_part = -in_chosen * within
        lower_part[rows, item] += 1.0
        lower_part = lower_part / lambdas[nest]
        weight = weights[:, None]
        gradient = self.grid.accumulate((weight * (lower_part + upper_part)).reshape(-1))
        gradient = gradient + self.nest_grid.accumulate((weight * upper_part).reshape(-1))
        # lambdas: [m = k] (A_k - s_i) / lambda_k + ([m = k] - P_m) (I_m - A_m)
        inclusive, mean_scaled = state["inclusive"], state["mean_scaled"]
        chosen_lower = (mean_scaled[rows, chosen_nest] - state["scaled"][rows, item]) / lambdas[
            chosen_nest
        ]  # (C,)
        one_hot = torch.zeros_like(share)
        one_hot[rows, chosen_nest] = 1.0  # (C, M)
        per_nest = (one_hot - share) * (inclusive - mean_scaled)  # (C, M)
        per_nest[rows, chosen_nest] += chosen_lower
        gradient = gradient.index_add(0, self.lambda_index, (weight * per_nest).sum(dim=0))
        return value, gradient

    def _grid_hessian(self, theta: torch.Tensor, state: dict, cases: slice) -> torch.Tensor:
        """Analytic Hessian of a block of cases, in the layout plus one spare column.

        When every block is constant or alternative-level and the nest formula is empty
        ('structured'), sum rho Z Z' is summed per alternative over its few value columns and
        each nest's Zbar is held compactly (constant columns, its own alternatives' columns,
        its lambda); otherwise Z, Zbar and G are formed densely, (C, J or M, P+1).
        """
        block = {k: v[cases] for k, v in state.items()}
        scaled, within, share = block["scaled"], block["within"], block["share"]
        inclusive, mean_scaled, weights = block["inclusive"], block["mean_scaled"], block["weights"]
        item, chosen_nest = block["item"], block["nest"]
        nest, lambda_index = self.nest_of_item, self.lambda_index
        lambdas = theta[lambda_index]  # (M,)
        n_cases, n_items, n_nests = scaled.shape[0], self.n_items, self.n_nests
        width = self.n_parameters + 1
        options = {"dtype": theta.dtype, "device": theta.device}
        rows = torch.arange(n_cases, device=theta.device)
        weight = weights[:, None]  # (C, 1)
        in_chosen = nest[None, :] == chosen_nest[:, None]  # (C, J)
        one_hot = torch.zeros_like(share)
        one_hot[rows, chosen_nest] = 1.0  # (C, M)
        curvature = (lambdas - 1.0) / lambdas**2  # (M,)
        rho = weight * within * (in_chosen * curvature[nest] - share[:, nest] / lambdas[nest])
        pi = weight * (share / lambdas - one_hot * curvature)  # (C, M)
        chosen_lambda = lambdas[chosen_nest]  # (C,)
        # coefficient of a = dV_i - sum_{j in k} q_j dV_j in the chosen nest's lambda terms
        chosen_scale = -weights / chosen_lambda**2  # (C,)
        grid = self.grid
        values = grid.columns[:, cases.start * n_items : cases.stop * n_items].T  # (s, F) view
        values = values.view(n_cases, n_items, -1)  # (C, J, F)
        hessian = theta.new_zeros(width, width)
        chosen_terms = torch.zeros(n_nests, width, **options)  # (M, P+1) sum of scale * a
        if self._compact_columns is not None:
            chosen_utility = torch.zeros(n_cases, width, **options).scatter_add_(
                1, grid.grid_index[item], values[rows, item]
            )  # (C, P+1) dV_i
            # rows: per alternative j, sum_c rho y y' over y = (values, -s), then scattered
            own = torch.cat([values, -scaled[:, :, None]], dim=2)  # (C, J, F+1)
            weighted = own * rho[:, :, None]  # (C, J, F+1)
            sums = torch.bmm(weighted.permute(1, 2, 0), own.transpose(0, 1))  # (J, F+1, F+1)
            index = torch.cat([grid.grid_index, lambda_index[nest][:, None]], dim=1)  # (J, F+1)
            hessian.index_put_((index[:, :, None], index[:, None, :]), sums, accumulate=True)
            # nests: Zbar_m = sum_{j in m} q_j dV_j - A_m dlambda_m, compact per nest
            mean_upper = torch.zeros(n_cases, width, **options)  # Gbar = sum_m P_m G_m
            upper_scale = weight * share * inclusive  # (C, M)
            n_constant = grid.n_constant
            compact_columns = zip(self.members, self._compact_columns, strict=True)
            for m, (members, columns) in enumerate(compact_columns):
                q = within[:, members, None]  # (C, J_m, 1)
                member_values = values[:, members]  # (C, J_m, F)
                compact = torch.cat(
                    [
                        torch.bmm(q.transpose(1, 2), member_values[:, :, :n_constant])[:, 0],
                        (q * member_values[:, :, n_constant:]).reshape(n_cases, -1),
                        -mean_scaled[:, m : m + 1],
                    ],
                    dim=1,
                )  # (C, W_m) Zbar_m
                # G_m = Zbar_m + I_m dlambda_m: sum_m (pi - wP) Zbar Zbar' plus sparse terms
                scale = pi[:, m] - weight[:, 0] * share[:, m]  # (C,)
                gram = (compact * scale[:, None]).T @ compact  # (W_m, W_m)
                hessian.index_put_((columns[:, None], columns[None, :]), gram, accumulate=True)
                cross = torch.zeros(width, **options).index_add_(
                    0, columns, upper_scale[:, m] @ compact
                )  # (P+1,)
                hessian[lambda_index[m]] -= cross
                hessian[:, lambda_index[m]] -= cross
                hessian[lambda_index[m], lambda_index[m]] -= upper_scale[:, m] @ inclusive[:, m]
                mean_upper.index_add_(1, columns, share[:, m : m + 1] * compact)
                chosen_here = chosen_scale * (chosen_nest == m)  # (C,)
                chosen_terms[m].index_add_(0, columns[:-1], -(chosen_here @ compact[:, :-1]))
            mean_upper.index_add_(1, lambda_index, share * inclusive)
        else:
            nests = torch.arange(n_nests, device=theta.device)
            members = (nest[None, :] == nests[:, None]).to(theta.dtype)  # (M, J)
            d_utility = grid.jacobian(cases).view(n_cases, n_items, width)  # (C, J, P+1)
            chosen_utility = d_utility[rows, item]  # (C, P+1)
            expected_scaled = torch.bmm(within[:, None, :] * members, d_utility)  # (C, M, P+1)
            d_utility[:, torch.arange(n_items), lambda_index[nest]] -= scaled  # now Z
            hessian += _gram(d_utility, rho, width)
            chosen_expected = expected_scaled[rows, chosen_nest]  # (C, P+1) sum q dV
            chosen_terms.index_add_(0, chosen_nest, -chosen_scale[:, None] * chosen_expected)
            expected_scaled[:, nests, lambda_index] -= mean_scaled  # (C, M, P+1) Zbar
            d_upper = expected_scaled.clone()  # G_m = dW_m + Zbar_m + I_m dlambda_m
            d_upper[:, nests, lambda_index] += inclusive
            if self.nest_grid.n_features:
                d_nest = self.nest_grid.jacobian(cases).view(n_cases, n_items, width)
                d_upper += torch.bmm(within[:, None, :] * members, d_nest)  # W: constant in m
            mean_upper = torch.bmm(share[:, None, :], d_upper)[:, 0]  # (C, P+1) Gbar
            hessian += _gram(expected_scaled, pi, width) - _gram(d_upper, weight * share, width)
        hessian += _gram(mean_upper, weights, width)
        # the chosen item's own lambda terms: -(a dl' + dl a') / l^2 + 2 (s_i - A_k) / l^2 dl dl'
        chosen_terms.index_add_(0, chosen_nest, chosen_scale[:, None] * chosen_utility)
        hessian.index_add_(0, lambda_index, chosen_terms)
        hessian.index_add_(1, lambda_index, chosen_terms.T)
        own = 2.0 * weights * (scaled[rows, item] - mean_scaled[rows, chosen_nest])
        own = own / chosen_lambda**2  # (C,)
        diagonal = torch.zeros(n_nests, **options).index_add_(0, chosen_nest, own)
        hessian.index_put_((lambda_index, lambda_index), diagonal, accumulate=True)
        return hessian


def _gram(vectors: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """sum over rows of scale * v v'. (..., width), (...) -> (width, width)"""
    flat = vectors.reshape(-1, width)
    return (flat * scale.reshape(-1, 1)).T @ flat
