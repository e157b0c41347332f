"""Nested logit on nearly full choice sets: (N, J) grids, analytic gradient and Hessian.

Notation and formulas: see nested.py. The utilities come from two column stores laid out in
the same N x J slots: the item formula's (V) and the nest formula's (W, constant in a nest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from choicecli.models.nested import NestedLogit, NestedRows, nested_logit
from choicecli.models.nested_hessian import CompactHessian, case_pairs, compact_columns
from choicecli.models.slots import ColumnStore, HandedRows

# up to this P without per-user terms the Hessian forms (cases x alternatives x P) blocks;
# past it, or with per-user terms, it is summed case by case in compact columns
# (nested_hessian.py): analytic at any P
ANALYTIC_NESTED_LIMIT = 512


class DenseNestedLogit(NestedLogit):
    """Two-level nested logit over N x J slots (missing alternatives masked)."""

    analytic_hessian_limit = None  # analytic at any P (see hessian)
    can_subsample = True

    def __init__(self, rows: NestedRows) -> None:
        super().__init__(rows)
        nest_of_item, lambda_index, n_nests = self.nest_of_item, self.lambda_index, self.n_nests
        # both levels' values in the same N x J slots, whatever the share of them offered
        item_rows = HandedRows(rows.case_index, rows.item_index, rows.chosen)
        sizes = (self.n_cases, self.n_items)
        grid = {"dense_threshold": 0.0}
        self.item_store = ColumnStore(
            rows.item_blocks, self.n_parameters, item_rows, *sizes, **grid
        )
        nest_rows = HandedRows(rows.case_index, rows.item_index)
        self.nest_store = ColumnStore(
            rows.nest_blocks, self.n_parameters, nest_rows, *sizes, **grid
        )
        members = [(nest_of_item == k).nonzero().flatten() for k in range(n_nests)]
        # a nest whose alternatives are consecutive codes is a slice: a view, not a copy
        self.members = [
            slice(int(m[0]), int(m[-1]) + 1)
            if m.numel() and bool((m == torch.arange(int(m[0]), int(m[0]) + m.numel())).all())
            else m
            for m in members
        ]
        chosen_slot = self.item_store.chosen_slot if rows.chosen is not None else None
        self.chosen_item = None if chosen_slot is None else chosen_slot % self.n_items  # (N,)
        self._subsamples: dict[int, NestedLogit] = {}
        self._columns = None  # the compact columns of the per-case Hessian, made when asked
        self._last_state: tuple[torch.Tensor | None, dict | None] = (None, None)
        # the structured Hessian: per nest, the parameter of each compact column of Zbar
        # (constant columns, each member's alternative-level columns, the nest's lambda)
        self._compact_columns = None
        if not self.item_store.other_blocks and not self.nest_store.n_features:
            grid_index, n_constant = self.item_store.grid_index, self.item_store.n_constant
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

    def subsample(self, every: int) -> NestedLogit:
        """The same model on every `every`-th case, as a starting point; built once."""
        if every not in self._subsamples:
            sample = self.item_store.sample(every)
            rows = self.item_store.rows_at(sample)
            self._subsamples[every] = nested_logit(
                NestedRows(
                    self.item_store.blocks_at(sample),
                    self.nest_store.blocks_at(sample),
                    self.lambda_index,
                    self.nest_of_item,
                    self.n_parameters,
                    rows.case_index,
                    rows.item_index,
                    sample.n_cases,
                    rows.chosen,
                    sample.of_cases(self.case_weights if self.weighted else None),
                    sample.of_cases(self.user_of_case),
                )
            )
        return self._subsamples[every]

    def drop_subsamples(self) -> None:
        """Forget the cached subsamples (their share of the values) once the fit is past them."""
        self._subsamples.clear()

    def _terms(self, theta: torch.Tensor, cases: slice | None = None):
        """Scaled utilities (C, J), inclusive values, upper utilities (C, M) and the case
        normaliser (C,)."""
        store, n_items = self.item_store, self.n_items
        lambdas = theta[self.lambda_index]  # (M,)
        utility = store.utility(theta, cases).view(-1, n_items)  # (C, J)
        scaled = utility / lambdas[self.nest_of_item]  # (C, J)
        offered = None
        if store.mask is not None:  # mask after scaling: -inf / lambda has no gradient
            offered = store.mask.view(-1, n_items)[cases if cases is not None else slice(None)]
            scaled = scaled.masked_fill(~offered, -torch.inf)
        inclusive = torch.stack([scaled[:, m].logsumexp(dim=1) for m in self.members], dim=1)
        present = torch.isfinite(inclusive)  # (C, M) nests with an offered alternative
        inclusive = inclusive.masked_fill(~present, 0.0)  # finite, so lambda * I has a gradient
        upper = lambdas * inclusive  # (C, M)
        if self.nest_store.n_features:  # W_m: the nest formula, constant within a nest
            nest_utility = self.nest_store.utility(theta, cases).view(-1, n_items)  # (C, J)
            if offered is not None:
                nest_utility = nest_utility.masked_fill(~offered, -torch.inf)
            nest_value = torch.stack([nest_utility[:, m].amax(dim=1) for m in self.members], 1)
            upper = upper + nest_value.masked_fill(~present, 0.0)
        upper = upper.masked_fill(~present, -torch.inf)  # (C, M)
        return scaled, inclusive, upper, upper.logsumexp(dim=1)

    def _log_likelihood(self, theta: torch.Tensor, cases: slice | None = None):
        scaled, inclusive, upper, normaliser = self._terms(theta, cases)
        rows = torch.arange(scaled.shape[0], device=scaled.device)
        item = self.chosen_item[cases if cases is not None else slice(None)]  # (C,)
        nest = self.nest_of_item[item]  # (C,)
        per_case = scaled[rows, item] - inclusive[rows, nest] + upper[rows, nest] - normaliser
        weights = self.case_weights[cases if cases is not None else slice(None)]
        return (weights * per_case).sum()

    def log_probabilities(self, theta: torch.Tensor) -> torch.Tensor:  # (R,)
        scaled, inclusive, upper, normaliser = self._terms(theta)
        nest = self.nest_of_item
        log_p = scaled - inclusive[:, nest] + upper[:, nest] - normaliser[:, None]  # (N, J)
        log_p = log_p.reshape(-1)
        positions = self.item_store.positions  # (R,)
        return log_p if positions is None else log_p[positions]

    def log_likelihood(self, theta: torch.Tensor) -> torch.Tensor:
        return self._log_likelihood(theta)

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:  # (P, P)
        cached_theta, state = self._last_state
        if cached_theta is None or not torch.equal(cached_theta, theta):
            state = self._state(theta)
        if self.by_user or self.n_parameters > ANALYTIC_NESTED_LIMIT:
            return self._compact_hessian(theta, state)
        width = self.n_parameters + 1
        total = theta.new_zeros(width, width)
        per_case = self.n_items * max(width, self.item_store.n_features + 1)
        step = max(16, (1 << 20) // per_case)
        for first in range(0, self.n_cases, step):
            cases = slice(first, min(first + step, self.n_cases))
            total += self._block_hessian(theta, state, cases)
        return total[:-1, :-1]

    def _compact_hessian(self, theta: torch.Tensor, state: dict) -> torch.Tensor:  # (P, P)
        """Case by case in compact columns, summed per user (nested_hessian.py): any terms,
        any parameter count, two users' coefficients never meet."""
        if self._columns is None:
            self._columns = compact_columns(self.item_store, self.nest_store, self.lambda_index)
        columns, n_items = self._columns, self.n_items
        sums = CompactHessian(columns, self.nest_of_item, theta)
        row_width = self.item_store.n_features + 1
        per_case = 2 * (2 * self.n_nests + 3) * columns.n_columns + n_items * row_width**2
        step = max(16, (1 << 20) // per_case)
        nest_store = self.nest_store
        for first in range(0, self.n_cases, step):
            cases = slice(first, min(first + step, self.n_cases))
            block = _HessianBlock.of(self, theta, state, cases)
            nest_values = None
            if nest_store.n_features:
                slots = slice(cases.start * n_items, cases.stop * n_items)
                nest_values = nest_store.columns[:, slots].T.view(block.rows.shape[0], n_items, -1)
            lower, left, right = case_pairs(block, columns, self.nest_of_item, nest_values)
            users = None if self.user_of_case is None else self.user_of_case[cases]
            sums.add_rows(lower, block.rho, users)
            sums.add(left, right, users)
        return sums.hessian(self.n_parameters)

    def forget(self) -> None:
        """Drop the state and subsamples made with the old case weights."""
        self._last_state = (None, None)
        self._subsamples.clear()

    def case_scores(self, theta: torch.Tensor, cases: slice | None = None) -> torch.Tensor:
        """Gradient of each case's log-probability of its choice, unweighted: the terms of
        value_and_gradient per case (see the derivatives below). (C, P)"""
        cases = slice(0, self.n_cases) if cases is None else cases
        n_cases, n_items, width = cases.stop - cases.start, self.n_items, self.n_parameters + 1
        scaled, inclusive, upper, normaliser = self._terms(theta, cases)
        nest, lambdas = self.nest_of_item, theta[self.lambda_index]  # (J,), (M,)
        offered = torch.isfinite(scaled)  # (C, J)
        within = torch.exp(scaled - inclusive[:, nest])  # (C, J) q
        share = torch.exp(upper - normaliser[:, None])  # (C, M) P
        scaled = scaled.masked_fill(~offered, 0.0)
        mean_scaled = torch.zeros_like(inclusive).index_add_(1, nest, within * scaled)  # (C, M)
        item = self.chosen_item[cases]  # (C,)
        chosen_nest = nest[item]  # (C,)
        rows = torch.arange(n_cases, device=theta.device)
        in_chosen = (nest[None, :] == chosen_nest[:, None]).to(theta.dtype)  # (C, J)
        upper_part = (in_chosen - share[:, nest]) * within  # (C, J) coefficient of dW
        lower_part = -in_chosen * within
        lower_part[rows, item] += 1.0
        lower_part = lower_part / lambdas[nest]
        d_item = self.item_store.jacobian(cases).view(n_cases, n_items, width)  # (C, J, P+1)
        scores = torch.bmm((lower_part + upper_part)[:, None, :], d_item)[:, 0]  # (C, P+1)
        if self.nest_store.n_features:
            d_nest = self.nest_store.jacobian(cases).view(n_cases, n_items, width)
            scores += torch.bmm(upper_part[:, None, :], d_nest)[:, 0]
        one_hot = torch.zeros_like(share)
        one_hot[rows, chosen_nest] = 1.0  # (C, M)
        per_nest = (one_hot - share) * (inclusive - mean_scaled)  # (C, M)
        per_nest[rows, chosen_nest] += (
            mean_scaled[rows, chosen_nest] - scaled[rows, item]
        ) / lambdas[chosen_nest]
        scores.index_add_(1, self.lambda_index, per_nest)
        return scores[:, :-1]

    # -- analytic derivatives ---------------------------------------------------------------
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

    def _state(self, theta: torch.Tensor) -> dict:
        """Everything the value and derivatives need: (N, J) and (N, M) tensors, and lambdas."""
        scaled, inclusive, upper, normaliser = self._terms(theta)
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

    def value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._state(theta)
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
        gradient = self.item_store.accumulate((weight * (lower_part + upper_part)).reshape(-1))
        gradient = gradient + self.nest_store.accumulate((weight * upper_part).reshape(-1))
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

    def _block_hessian(self, theta: torch.Tensor, state: dict, cases: slice) -> torch.Tensor:
        """Analytic Hessian of a block of cases, in the layout plus one spare column.

        When every block is constant or alternative-level and the nest formula is empty
        ('structured'), sum rho Z Z' is summed per alternative over its few value columns and
        each nest's Zbar is held compactly (constant columns, its own alternatives' columns,
        its lambda); otherwise Z, Zbar and G are formed densely, (C, J or M, P+1).
        """
        block = _HessianBlock.of(self, theta, state, cases)
        width = self.n_parameters + 1
        hessian = theta.new_zeros(width, width)
        chosen_terms = block.zeros(self.n_nests, width)  # (M, P+1) sum of scale * a
        if self._compact_columns is not None:
            chosen_utility, mean_upper = self._structured_part(block, hessian, chosen_terms)
        else:
            chosen_utility, mean_upper = self._dense_part(block, cases, hessian, chosen_terms)
        hessian += _gram(mean_upper, block.weights, width)
        # the chosen item's own lambda terms: -(a dl' + dl a') / l^2 + 2 (s_i - A_k) / l^2 dl dl'
        chosen_nest, lambda_index = block.chosen_nest, self.lambda_index
        chosen_terms.index_add_(0, chosen_nest, block.chosen_scale[:, None] * chosen_utility)
        hessian.index_add_(0, lambda_index, chosen_terms)
        hessian.index_add_(1, lambda_index, chosen_terms.T)
        own = (
            2.0
            * block.weights
            * (block.scaled[block.rows, block.item] - block.mean_scaled[block.rows, chosen_nest])
        )
        own = own / block.chosen_lambda**2  # (C,)
        diagonal = block.zeros(self.n_nests).index_add_(0, chosen_nest, own)
        hessian.index_put_((lambda_index, lambda_index), diagonal, accumulate=True)
        return hessian

    def _structured_part(self, block: _HessianBlock, hessian, chosen_terms):
        """Constant and alternative-level terms only: rows per alternative, each nest's Zbar
        compactly. Adds to `hessian` and `chosen_terms`; returns dV_i and Gbar. (C, P+1) x 2"""
        store, nest, lambda_index = self.item_store, self.nest_of_item, self.lambda_index
        n_cases, width = block.scaled.shape[0], self.n_parameters + 1
        values, within, share, weight = block.values, block.within, block.share, block.weight
        chosen_utility = block.zeros(n_cases, width).scatter_add_(
            1, store.grid_index[block.item], values[block.rows, block.item]
        )  # (C, P+1) dV_i
        # rows: per alternative j, sum_c rho y y' over y = (values, -s), then scattered
        own = torch.cat([values, -block.scaled[:, :, None]], dim=2)  # (C, J, F+1)
        weighted = own * block.rho[:, :, None]  # (C, J, F+1)
        sums = torch.bmm(weighted.permute(1, 2, 0), own.transpose(0, 1))  # (J, F+1, F+1)
        index = torch.cat([store.grid_index, lambda_index[nest][:, None]], dim=1)  # (J, F+1)
        hessian.index_put_((index[:, :, None], index[:, None, :]), sums, accumulate=True)
        # nests: Zbar_m = sum_{j in m} q_j dV_j - A_m dlambda_m, compact per nest
        mean_upper = block.zeros(n_cases, width)  # Gbar = sum_m P_m G_m
        upper_scale = weight * share * block.inclusive  # (C, M)
        n_constant = store.n_constant
        compact_columns = zip(self.members, self._compact_columns, strict=True)
        for m, (members, columns) in enumerate(compact_columns):
            q = within[:, members, None]  # (C, J_m, 1)
            member_values = values[:, members]  # (C, J_m, F)
            compact = torch.cat(
                [
                    torch.bmm(q.transpose(1, 2), member_values[:, :, :n_constant])[:, 0],
                    (q * member_values[:, :, n_constant:]).reshape(n_cases, -1),
                    -block.mean_scaled[:, m : m + 1],
                ],
                dim=1,
            )  # (C, W_m) Zbar_m
            # G_m = Zbar_m + I_m dlambda_m: sum_m (pi - wP) Zbar Zbar' plus sparse terms
            scale = block.pi[:, m] - weight[:, 0] * share[:, m]  # (C,)
            gram = (compact * scale[:, None]).T @ compact  # (W_m, W_m)
            hessian.index_put_((columns[:, None], columns[None, :]), gram, accumulate=True)
            cross = block.zeros(width).index_add_(0, columns, upper_scale[:, m] @ compact)
            hessian[lambda_index[m]] -= cross  # (P+1,)
            hessian[:, lambda_index[m]] -= cross
            hessian[lambda_index[m], lambda_index[m]] -= upper_scale[:, m] @ block.inclusive[:, m]
            mean_upper.index_add_(1, columns, share[:, m : m + 1] * compact)
            chosen_here = block.chosen_scale * (block.chosen_nest == m)  # (C,)
            chosen_terms[m].index_add_(0, columns[:-1], -(chosen_here @ compact[:, :-1]))
        mean_upper.index_add_(1, lambda_index, share * block.inclusive)
        return chosen_utility, mean_upper

    def _dense_part(self, block: _HessianBlock, cases: slice, hessian, chosen_terms):
        """Any terms: Z, Zbar and G formed densely, (C, J or M, P+1). Adds to `hessian` and
        `chosen_terms`; returns dV_i and Gbar. (C, P+1) x 2"""
        nest, lambda_index, n_items = self.nest_of_item, self.lambda_index, self.n_items
        n_cases, width = block.scaled.shape[0], self.n_parameters + 1
        within, share, rows = block.within, block.share, block.rows
        nests = torch.arange(self.n_nests, device=within.device)
        members = (nest[None, :] == nests[:, None]).to(within.dtype)  # (M, J)
        d_utility = self.item_store.jacobian(cases).view(n_cases, n_items, width)  # (C, J, P+1)
        chosen_utility = d_utility[rows, block.item]  # (C, P+1)
        expected_scaled = torch.bmm(within[:, None, :] * members, d_utility)  # (C, M, P+1)
        d_utility[:, torch.arange(n_items), lambda_index[nest]] -= block.scaled  # now Z
        hessian += _gram(d_utility, block.rho, width)
        chosen_expected = expected_scaled[rows, block.chosen_nest]  # (C, P+1) sum q dV
        chosen_terms.index_add_(
            0, block.chosen_nest, -block.chosen_scale[:, None] * chosen_expected
        )
        expected_scaled[:, nests, lambda_index] -= block.mean_scaled  # (C, M, P+1) Zbar
        d_upper = expected_scaled.clone()  # G_m = dW_m + Zbar_m + I_m dlambda_m
        d_upper[:, nests, lambda_index] += block.inclusive
        if self.nest_store.n_features:
            d_nest = self.nest_store.jacobian(cases).view(n_cases, n_items, width)
            d_upper += torch.bmm(within[:, None, :] * members, d_nest)  # W: constant in m
        mean_upper = torch.bmm(share[:, None, :], d_upper)[:, 0]  # (C, P+1) Gbar
        hessian += _gram(expected_scaled, block.pi, width) - _gram(
            d_upper, block.weight * share, width
        )
        return chosen_utility, mean_upper


@dataclass
class _HessianBlock:
    """A block of cases' share of the state, and the weights of the Hessian's sums."""

    scaled: torch.Tensor  # (C, J) s, 0 where not offered
    within: torch.Tensor  # (C, J) q
    share: torch.Tensor  # (C, M) P
    inclusive: torch.Tensor  # (C, M) I
    mean_scaled: torch.Tensor  # (C, M) A
    weights: torch.Tensor  # (C,) case weights
    weight: torch.Tensor  # (C, 1) the same, as a column
    item: torch.Tensor  # (C,) chosen alternative
    chosen_nest: torch.Tensor  # (C,)
    chosen_lambda: torch.Tensor  # (C,)
    chosen_scale: torch.Tensor  # (C,) coefficient of a in the chosen nest's lambda terms
    rho: torch.Tensor  # (C, J)
    pi: torch.Tensor  # (C, M)
    rows: torch.Tensor  # (C,) 0..C-1
    values: torch.Tensor  # (C, J, F) the item store's values, a view

    @classmethod
    def of(cls, model: DenseNestedLogit, theta: torch.Tensor, state: dict, cases: slice):
        part = {k: v[cases] for k, v in state.items()}
        scaled, within, share, weights = (part[k] for k in ("scaled", "within", "share", "weights"))
        chosen_nest, nest = part["nest"], model.nest_of_item
        lambdas = theta[model.lambda_index]  # (M,)
        n_cases, n_items = scaled.shape[0], model.n_items
        rows = torch.arange(n_cases, device=theta.device)
        weight = weights[:, None]  # (C, 1)
        in_chosen = nest[None, :] == chosen_nest[:, None]  # (C, J)
        one_hot = torch.zeros_like(share)
        one_hot[rows, chosen_nest] = 1.0  # (C, M)
        curvature = (lambdas - 1.0) / lambdas**2  # (M,)
        rho = weight * within * (in_chosen * curvature[nest] - share[:, nest] / lambdas[nest])
        pi = weight * (share / lambdas - one_hot * curvature)  # (C, M)
        chosen_lambda = lambdas[chosen_nest]  # (C,)
        columns = model.item_store.columns
        values = columns[:, cases.start * n_items : cases.stop * n_items].T  # (s, F) view
        return cls(
            scaled, within, share, part["inclusive"], part["mean_scaled"], weights, weight,
            part["item"], chosen_nest, chosen_lambda, -weights / chosen_lambda**2, rho, pi,
            rows, values.view(n_cases, n_items, -1),
        )  # fmt: skip

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=self.scaled.dtype, device=self.scaled.device)


def _gram(vectors: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """sum over rows of scale * v v'. (..., width), (...) -> (width, width)"""
    flat = vectors.reshape(-1, width)
    return (flat * scale.reshape(-1, 1)).T @ flat
