"""Conditional logit: log-likelihood and gradient (the Hessian is in conditional_hessian.py).

Notation: R rows, N cases, J alternatives, S slots (see slots.py), P parameters of the full
layout (fixed ones included). Models take the full layout vector `theta` (P,); `estimate`
maps free parameters into it.

P(i | n) = exp(V[n,i]) / sum_j exp(V[n,j]), V linear in theta (slots.ColumnStore.utility).
"""

from __future__ import annotations

import torch

from choicecli.models.conditional_hessian import Group, conditional_hessian
from choicecli.models.segments import segment_logsumexp
from choicecli.models.slots import ColumnStore, ones_unless_given


class ConditionalLogit:
    """The conditional logit of a column store; analytic derivatives. Also the identification
    model (see identify.py): the nested logit at lambda = 1 is the conditional logit of both
    levels' terms."""

    analytic_hessian_limit = None  # the Hessian is analytic at any parameter count
    can_subsample = True

    def __init__(
        self,
        store: ColumnStore,
        user_of_case: torch.Tensor | None = None,  # (N,)
        case_weights: torch.Tensor | None = None,  # (N,)
    ) -> None:
        """The likelihood of the rows laid out in `store` (built with the chosen rows)."""
        self.store = store
        self.n_parameters = store.n_parameters
        self.n_cases = store.n_cases
        self.n_items = store.n_items
        self.n_rows = store.n_rows
        self.user_of_case = user_of_case
        self.weighted = case_weights is not None
        self.case_weights = ones_unless_given(case_weights, store.n_cases, store.columns.device)
        self.by_user = any(block.term.variation.by_user for block in store.blocks)
        self._subsamples: dict[int, ConditionalLogit] = {}
        # the last point evaluated: (theta, probabilities) and (theta, Hessian), for reuse
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self._probability_buffer: torch.Tensor | None = None  # (S,) dense value_and_gradient
        self._last_hessian: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        # the Hessian's slots grouped by (user, alternative), made on first use (it depends on
        # the data only; see conditional_hessian.py)
        self.row_groups: list[Group] | None = None
        self.case_groups: list[list[Group]] | None = None  # each block's cases by user

    @property
    def layout(self) -> str:
        return self.store.layout

    def subsample(self, every: int) -> ConditionalLogit:
        """The same model on every `every`-th case (a copy of a 1/every share of the values),
        for a cheap starting point of the full fit and rank check; built once."""
        if every not in self._subsamples:
            sample = self.store.sample(every)
            store = self.store.subsample(sample)
            self._subsamples[every] = ConditionalLogit(
                store,
                sample.of_cases(self.user_of_case),
                sample.of_cases(self.case_weights if self.weighted else None),
            )
        return self._subsamples[every]

    def drop_subsamples(self) -> None:
        """Forget the cached subsamples (their share of the values) once the fit is past them."""
        self._subsamples.clear()

    def second_moments(self) -> torch.Tensor:  # (P,)
        return self.store.second_moments()

    # -- likelihood -------------------------------------------------------------------------
    def log_normaliser(self, utility: torch.Tensor) -> torch.Tensor:  # (N,)
        if self.store.dense:
            return utility.view(self.n_cases, self.n_items).logsumexp(dim=1)  # masked: -inf
        return segment_logsumexp(utility, self.store.case_index, self.n_cases)

    def probability(self, utility: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
        """exp(utility - normaliser of its case), broadcast in dense layouts. (S,)"""
        if self.store.dense:
            grid = utility.view(self.n_cases, self.n_items) - normaliser[:, None]
            return torch.exp(grid).view(-1)
        return torch.exp(utility - normaliser[self.store.case_index])

    def log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (S,)
        utility = self.store.masked_utility(theta)
        return utility - self.log_normaliser(utility)[self.store.case_index]

    def row_log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,) input rows
        log_p = self.log_probabilities(theta)  # (S,)
        positions = self.store.positions  # (R,) made from the mask when rows are in slot order
        return log_p if positions is None else log_p[positions]

    def log_likelihood(self, theta: torch.Tensor) -> torch.Tensor:
        utility = self.store.masked_utility(theta)
        normaliser = self.log_normaliser(utility)  # (N,)
        return (self.case_weights * (utility[self.store.chosen_slot] - normaliser)).sum()

    def value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-likelihood and its gradient: sum_r w (y_r - p_r) z_r. ((), (P,))"""
        if self.store.dense:
            return self._dense_value_and_gradient(theta)
        utility = self.store.masked_utility(theta)  # (S,)
        normaliser = self.log_normaliser(utility)  # (N,)
        value = (self.case_weights * (utility[self.store.chosen_slot] - normaliser)).sum()
        probability = self.probability(utility, normaliser)  # (S,) 0 where masked
        self._last = (theta.clone(), probability)  # a Newton step asks the Hessian here next
        residual = self.store.chosen - probability
        if self.weighted:
            residual = self.case_weights[self.store.case_index] * residual
        return value, self.store.accumulate(residual)

    def _dense_value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """value_and_gradient in one pass over blocks of cases: every temporary is a block's,
        so it stays in cache and is reused, and each block's values are read while warm."""
        store, n_items = self.store, self.n_items
        self._last = (None, None)  # the buffer below is rewritten: nothing may point into it
        if self._probability_buffer is None:  # one buffer for every call: no fresh pages
            self._probability_buffer = theta.new_empty(store.n_slots)
        probability = self._probability_buffer  # (S,)
        sums = store.gradient_sums(theta)
        coefficients = store.grid_coefficients(theta)  # (J, F) once, for every block
        value = theta.new_zeros(())
        for slots, cases in store.chunks():
            n_cases = cases.stop - cases.start
            utility = store.block_utility(theta, coefficients, slots, cases)  # (C, J)
            if store.mask is not None:
                utility.masked_fill_(~store.mask[slots].view(n_cases, n_items), -torch.inf)
            # log-sum-exp by hand, so the exponentials serve the probabilities too
            top = utility.amax(dim=1, keepdim=True)  # (C, 1) finite: every case offers one
            exponential = torch.exp(utility - top)  # (C, J) 0 where not offered
            total = exponential.sum(dim=1, keepdim=True)  # (C, 1)
            block_probability = probability[slots].view(n_cases, n_items)  # (C, J) view
            torch.div(exponential, total, out=block_probability)
            chosen_local = store.chosen_slot[cases] - slots.start  # (C,)
            normaliser = (top + torch.log(total)).view(-1)  # (C,)
            weights = self.case_weights[cases]  # (C,)
            value += (weights * (utility.view(-1)[chosen_local] - normaliser)).sum()
            residual = torch.neg(block_probability)  # (C, J) y - p, y added at the chosen slots
            residual.view(-1)[chosen_local] += 1.0
            if self.weighted:
                residual *= weights[:, None]
            store.add_gradient(sums, slots, residual, offered_only=True)
        self._last = (theta.clone(), probability)  # a Newton step asks the Hessian here next
        return value, store.gradient_from(sums)

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """Hessian of the log-likelihood (see conditional_hessian.py). (P, P)"""
        cached_theta, cached = self._last_hessian
        if cached_theta is not None and torch.equal(cached_theta, theta):
            return cached.clone()  # the rank check and Newton's first step share theta = 0
        last_theta, probability = self._last
        if last_theta is None or not torch.equal(last_theta, theta):
            utility = self.store.masked_utility(theta)  # (S,)
            probability = self.probability(utility, self.log_normaliser(utility))  # (S,)
        hessian = conditional_hessian(self, probability)
        self._last_hessian = (theta.clone(), hessian)
        return hessian

    # -- per-case scores and weights (inference.py) --------------------------------------------
    def case_scores(self, theta: torch.Tensor, cases: slice | None = None) -> torch.Tensor:
        """Gradient of each case's log-probability of its choice, unweighted: sum over the
        case's slots of (y - p) dV/dtheta. (C, P) for the cases of `cases` (default all)."""
        store, n_items = self.store, self.n_items
        cases = slice(0, self.n_cases) if cases is None else cases
        n_cases = cases.stop - cases.start
        if store.dense:
            slots = slice(cases.start * n_items, cases.stop * n_items)
            jacobian = store.jacobian(cases)  # (s, P + 1)
            local_case = torch.arange(jacobian.shape[0], device=theta.device) // n_items  # (s,)
        else:
            slots = slice(int(store.case_start[cases.start]), int(store.case_start[cases.stop]))
            jacobian = _ragged_jacobian(store, slots)  # (s, P + 1)
            local_case = store.case_index[slots] - cases.start  # (s,)
        utility = jacobian @ torch.cat([theta, theta.new_zeros(1)])  # (s,) linear in theta
        if store.mask is not None:
            utility = utility.masked_fill(~store.mask[slots], -torch.inf)
        normaliser = segment_logsumexp(utility, local_case, n_cases)  # (C,)
        residual = -torch.exp(utility - normaliser[local_case])  # (s,) y - p, y added below
        residual[store.chosen_slot[cases] - slots.start] += 1.0
        scores = theta.new_zeros(n_cases, jacobian.shape[1])  # (C, P + 1)
        scores.index_add_(0, local_case, residual[:, None] * jacobian)
        return scores[:, :-1]

    def set_case_weights(self, case_weights: torch.Tensor | None) -> None:
        """Weight the cases anew (a bootstrap resample's counts; None: every case 1); the
        cached probabilities and Hessian go, subsamples too."""
        self.weighted = case_weights is not None
        self.case_weights = ones_unless_given(case_weights, self.n_cases, self.store.columns.device)
        self._last = (None, None)
        self._last_hessian = (None, None)
        self._subsamples.clear()


def _ragged_jacobian(store: ColumnStore, slots: slice) -> torch.Tensor:
    """d utility / d theta for a run of slots of the ragged layout. (s, P + 1), the last
    column collects nothing"""
    n_slots = slots.stop - slots.start
    jacobian = store.columns.new_zeros(n_slots, store.n_parameters + 1)  # (s, P + 1)
    constant = store.columns[: store.n_constant, slots].T  # (s, Fc)
    jacobian.index_add_(1, store.constant_index, constant)
    for block in store.other_blocks:
        jacobian.scatter_add_(1, block.layout_index[block.code[slots]], block.x[slots])
    return jacobian
