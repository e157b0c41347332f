"""Elasticities, semi-elasticities and marginal effects of one column on choice probabilities.

Notation: R rows, N cases, J alternatives; x[n,i] the column's value for alternative i in case
n, P[n,j] the probability of j, w[n] the case weight (1 without weights), c[n,i] the
coefficient x multiplies in V[n,i] (the sum over the terms that read x, for that alternative
and user). The model is rebuilt from the saved spec with one extra term, h_i times a column
that is c[n,i] x[n,i] (elasticity) or c[n,i] (semi-elasticity, marginal effect) on the rows of
alternative i, so that at h = 0 the derivative of the model's own probabilities with respect
to h_i is the effect of x_i: no probability formula is written twice. Autograd gives

    dT[j,i] = d/dh_i sum_n w[n] P[n,j]        dL[j,i] = d/dh_i sum_n w[n] log P[n,j]

(one backward pass per alternative j for each), and again, through those, the gradient of
every table entry with respect to the estimated parameters, for delta-method errors.

Two averages over cases, for the effect of x_i on the probability of j:
- aggregate: the effect on the predicted share S[j] = sum_n w P[n,j] / sum_n w when x_i changes
  in every case (biogeme's probability-weighted aggregate): elasticity dT/T, semi-elasticity
  dT/T (x_i up by one unit), marginal effect dT / sum_n w;
- average: the plain (weighted) mean of each case's own effect over the cases that offer both
  i and j: dL / O for elasticities and semi-elasticities, dT / O for marginal effects, with O
  the weight of those cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import polars as pl
import torch

from choicecli.errors import FormulaError, UsageError
from choicecli.results import FitResult

KINDS = ("elasticity", "semi-elasticity", "marginal")
EFFECT_COLUMN = "__choice_effect_shift"
# the delta method takes 2 J^2 second-order gradient passes over the R rows: by default only
# while 2 J^2 R stays below this (ModeCanada: 32 x 11,116; about 8 us per row and pass here)
MAX_ROW_PASSES = 20_000_000


@dataclass(frozen=True)
class Effects:
    """One row per (responding alternative, changed alternative); notes in words."""

    table: pl.DataFrame
    notes: list[str]


def _key(parameter) -> tuple:
    return (parameter.level, parameter.term, parameter.feature, parameter.item, parameter.user)


def compute_effects(
    result: FitResult,
    frame: pl.DataFrame,
    variable: str,
    kind: str,
    *,
    where: str,
    roles: dict[str, str] | None = None,
    std_errors: bool | None = None,
    by: str | None = None,
) -> Effects:
    """The J x J table of effects of `variable`, both averages, with delta-method errors
    (std_errors: always, never, or None: while the passes they take stay within budget)."""
    from choicecli.predict import spec_from_result
    from choicecli.problem import build_problem

    if kind not in KINDS:
        raise UsageError(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    spec = spec_from_result(result, roles or {})
    present = {
        name: getattr(spec.roles, name) if getattr(spec.roles, name) in frame.columns else None
        for name in ("choice", "available", "weights")
    }
    spec = replace(spec, roles=replace(spec.roles, session=None, **present))
    labels = {"item_labels": result.labels["items"], "user_labels": result.labels.get("users")}
    segment_codes, segment_labels = _segments(frame, by, where)  # (rows of frame,), (G,)
    base = build_problem(frame, spec, where, drop_single_alternative=False, **labels)
    free = result.estimated_index.long()  # (k,) in the saved layout
    estimated = result.estimate.double()[free].clone().requires_grad_(True)  # (k,)
    with torch.enable_grad():
        base_theta = _placed(result, base.parameters, estimated)  # (P,)
        coefficient, values = _column_coefficient(base, base_theta, variable)  # (R,), (R,)
        per_item = _per_item(coefficient, base.data.item_index, base.data.n_items)  # (J,)
    # c constant within alternative (no user term reads x): dT[j,i] = C_i dT_s[j,i] with the
    # shift column s alone, so the tables stay functions of the estimates through C as well
    by_item = bool((coefficient == per_item[base.data.item_index]).all())
    scale = values.double() if kind == "elasticity" else torch.ones_like(values.double())
    shift = scale if by_item else (coefficient.detach() * scale)  # (R,)
    in_input_order = torch.zeros(frame.height, dtype=torch.float64)
    in_input_order[base.data.source_row] = shift.detach()
    shifted = frame.with_columns(pl.Series(EFFECT_COLUMN, in_input_order.numpy()))
    spec = replace(spec, formula=f"{spec.formula} + ({EFFECT_COLUMN}|item-full)")
    problem = build_problem(shifted, spec, where, drop_single_alternative=False, **labels)
    del base, shifted
    data = problem.data
    n_items = data.n_items
    n_segments = len(segment_labels)
    segment = _segment_of_case(data, segment_codes, by)  # (N,)
    layout = {_key(p): index for index, p in enumerate(problem.parameters)}
    effect_term = f"{EFFECT_COLUMN}[item-full]"
    effect_position = torch.tensor(
        [
            layout[("item", effect_term, EFFECT_COLUMN, str(label), None)]
            for label in result.labels["items"]
        ]
    )  # fmt: skip  (J,)
    h = torch.zeros(n_items, dtype=torch.float64, requires_grad=True)  # (J,)
    model = problem.model(torch.device("cpu"))
    notes: list[str] = []
    passes = 2 * n_segments * n_items**2
    if std_errors is None:
        std_errors = passes * data.n_rows <= MAX_ROW_PASSES
        if not std_errors:
            notes.append(
                f"no standard errors: the delta method takes {passes} second-order gradient "
                f"passes over {data.n_rows:,} rows here; --std-errors computes them anyway"
            )
    if not by_item and std_errors:
        notes.append(
            f"no standard errors: the coefficient of {variable!r} varies by user, and the "
            "delta method here needs it constant within each alternative"
        )
    std_errors = std_errors and by_item
    with torch.enable_grad():
        point = _placed(result, problem.parameters, estimated).index_put((effect_position,), h)
        log_p = model.row_log_probabilities(point)  # (R,)
        weights = (
            data.case_weights[data.case_index]
            if data.case_weights is not None
            else torch.ones(data.n_rows, dtype=torch.float64)
        )  # (R,)
        group = segment[data.case_index] * n_items + data.item_index  # (R,) segment, item
        size = n_segments * n_items
        total = torch.zeros(size, dtype=torch.float64).index_add(0, group, weights * log_p.exp())
        log_total = torch.zeros(size, dtype=torch.float64).index_add(0, group, weights * log_p)
        d_total = torch.stack([_grad(total[g], h, std_errors) for g in range(size)])  # (G*J, J)
        d_log = torch.stack([_grad(log_total[g], h, std_errors) for g in range(size)])
        d_total = d_total.view(n_segments, n_items, n_items)  # (G, J, J)
        d_log = d_log.view(n_segments, n_items, n_items)  # (G, J, J)
        if by_item:
            d_total, d_log = d_total * per_item, d_log * per_item  # C_i along the last axis
        case_weights = _case_weights(data)  # (N,)
        both = _offered_together(data, case_weights, segment, n_segments)  # (G, J, J)
        counts = _offered_together(data, torch.ones_like(case_weights), segment, n_segments)
        if kind == "marginal":
            segment_weight = torch.zeros(n_segments, dtype=torch.float64).index_add(
                0, segment, case_weights
            )  # (G,)
            aggregate = d_total / segment_weight[:, None, None]
            average = d_total / both
        else:
            aggregate = d_total / total.view(n_segments, n_items, 1)
            average = d_log / both
        aggregate = torch.where(counts > 0, aggregate, torch.nan)  # (G, J, J)
        average = torch.where(counts > 0, average, torch.nan)  # (G, J, J)
        tables = torch.stack([aggregate, average])  # (2, G, J, J)
        errors = (
            _delta_method(result, estimated, tables, notes)
            if std_errors
            else torch.full_like(tables, math.nan)
        )
    table = _table(result, variable, kind, aggregate.detach(), average.detach(), errors, counts)
    if by is not None:
        table = pl.DataFrame(
            {by: [label for label in segment_labels for _ in range(n_items**2)]}
        ).hstack(table)
    if kind in ("elasticity", "semi-elasticity"):
        notes.insert(
            0,
            "aggregate: the effect on the predicted share (probability-weighted); average: the "
            "plain mean of each case's effect over the cases offering both alternatives",
        )
    return Effects(table=table, notes=notes)


def _grad(value: torch.Tensor, wrt: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """d value / d wrt; differentiable again for the delta method. (J,)"""
    if not value.requires_grad:
        return torch.zeros_like(wrt)
    (gradient,) = torch.autograd.grad(
        value, wrt, create_graph=differentiable, retain_graph=True, allow_unused=True
    )
    return torch.zeros_like(wrt) if gradient is None else gradient


def _placed(result: FitResult, parameters: list, estimated: torch.Tensor) -> torch.Tensor:
    """The saved estimates laid out for `parameters`, the estimated ones taken from
    `estimated` (so the result is a function of them); 0 for new or not-estimated ones. (P,)"""
    from choicecli.errors import ArtifactError

    layout = {_key(p): index for index, p in enumerate(parameters)}
    if any(_key(p) not in layout for p in result.parameters):
        raise ArtifactError(
            "the model's formula does not lay out the parameters it stores (model.json was "
            "edited, or the files come from different fits); refit the model"
        )
    saved = torch.nan_to_num(result.estimate.double(), nan=0.0)  # not estimated: contribute 0
    where_saved = torch.tensor([layout[_key(p)] for p in result.parameters], dtype=torch.long)
    theta = torch.zeros(len(parameters), dtype=torch.float64).index_put((where_saved,), saved)
    free = where_saved[result.estimated_index.long()]  # (k,)
    return theta.index_put((free,), estimated)  # (P,)


def _per_item(coefficient: torch.Tensor, item: torch.Tensor, n_items: int) -> torch.Tensor:
    """The coefficient on the first row of each alternative (0 where none). (J,)"""
    rows = torch.arange(item.shape[0])
    first = torch.full((n_items,), item.shape[0], dtype=torch.long).scatter_reduce(
        0, item, rows, "amin"
    )  # (J,)
    padded = torch.cat([coefficient, coefficient.new_zeros(1)])  # (R + 1,)
    return padded[first]


def _column_coefficient(problem, theta: torch.Tensor, variable: str):
    """c[r], the coefficient x multiplies in row r's utility, and x[r]. (R,), (R,)"""
    if any(variable in block.features for block in problem.nest_blocks):
        raise FormulaError(
            f"--variable {variable!r} is in the nest formula, where it is constant within a "
            "nest: its effect on one alternative is not defined; use a column of --formula"
        )
    coefficient = torch.zeros(problem.data.n_rows, dtype=torch.float64)  # (R,)
    values = None
    for block in problem.item_blocks:
        for k, feature in enumerate(block.features):
            if feature == variable:
                per_group = theta[block.layout_index]  # (G, K)
                coefficient = coefficient + per_group[block.code][:, k]  # (R,)
                values = block.x[:, k]  # (R,)
    if values is None:
        used = sorted({f for b in problem.item_blocks for f in b.features} - {"intercept"})
        raise FormulaError(
            f"--variable {variable!r} is not a column of the model's formula, so its effects "
            f"are zero; the formula reads: {', '.join(used) or 'no columns'}"
        )
    return coefficient, values.double()


def _case_weights(data) -> torch.Tensor:  # (N,)
    if data.case_weights is not None:
        return data.case_weights
    return torch.ones(data.n_cases, dtype=torch.float64)


def _offered_together(
    data, case_weights: torch.Tensor, segment: torch.Tensor, n_segments: int
) -> torch.Tensor:
    """Weight of the cases of each segment that offer both i and j. (G, J, J)"""
    offered = torch.zeros(data.n_cases, data.n_items, dtype=torch.float64)  # (N, J)
    offered[data.case_index, data.item_index] = 1.0
    member = torch.zeros(data.n_cases, n_segments, dtype=torch.float64)  # (N, G)
    member[torch.arange(data.n_cases), segment] = case_weights.detach()
    return torch.einsum("ng,nj,ni->gji", member, offered, offered)


def _segments(frame: pl.DataFrame, by: str | None, where: str) -> tuple[torch.Tensor, list]:
    """The segment code of every input row and the segment labels, sorted. (rows,), (G,)"""
    from choicecli.data import check_columns
    from choicecli.errors import DataError

    if by is None:
        return torch.zeros(frame.height, dtype=torch.long), [None]
    check_columns(frame, [by], where)
    column = frame.get_column(by)
    if column.null_count():
        raise DataError(f"{where}: --by {by!r} has {column.null_count()} empty cells; fill them")
    codes = column.rank("dense").cast(pl.Int64).to_numpy() - 1
    labels = column.unique().sort().to_list()
    return torch.from_numpy(codes), labels


def _segment_of_case(data, codes: torch.Tensor, by: str | None) -> torch.Tensor:
    """Each case's segment; a segment column must be constant within cases. (N,)"""
    from choicecli.errors import DataError

    per_row = codes[data.source_row]  # (R,)
    segment = torch.zeros(data.n_cases, dtype=torch.long).index_copy(0, data.case_index, per_row)
    changes = per_row != segment[data.case_index]  # (R,)
    if bool(changes.any()):
        first = int(data.case_index[changes.nonzero()[0, 0]])
        raise DataError(
            f"--by {by!r} changes within case {data.case_labels[first]!r}: a segment must be "
            "the same on every row of a case"
        )
    return segment


def _delta_method(result, estimated: torch.Tensor, tables: torch.Tensor, notes: list[str]):
    """Standard errors of every entry of `tables` (2, J, J): sqrt(g' V g), g by autograd."""
    covariance = result.covariance.double()  # (k, k)
    flat = tables.reshape(-1)  # (2 J^2,)
    errors = torch.full_like(flat, math.nan)
    if covariance.numel() == 0:
        notes.append("the model holds no covariance matrix, so there are no standard errors")
        return errors.reshape(tables.shape)
    for entry in range(flat.numel()):  # 2 J^2 gradients: a few dozen, not one per row or case
        if not torch.isfinite(flat[entry]) or not flat[entry].requires_grad:
            continue
        (gradient,) = torch.autograd.grad(
            flat[entry], estimated, retain_graph=True, allow_unused=True
        )  # (k,)
        if gradient is None:
            errors[entry] = 0.0
            continue
        errors[entry] = (gradient @ covariance @ gradient).clamp_min(0.0).sqrt()
    return errors.reshape(tables.shape)


def _table(result, variable, kind, aggregate, average, errors, counts) -> pl.DataFrame:
    """Long form: one row per (segment, item j responding, alternative i changed)."""
    labels = [str(label) for label in result.labels["items"]]
    n_items = len(labels)
    n_rows = aggregate.numel()  # G J^2
    responding = [labels[j] for j in range(n_items) for _ in range(n_items)]
    changed = [labels[i] for _ in range(n_items) for i in range(n_items)]
    repeat = n_rows // n_items**2
    return pl.DataFrame(
        {
            "variable": [variable] * n_rows,
            "kind": [kind] * n_rows,
            "item": responding * repeat,
            "changed": changed * repeat,
            "own": [j == i for j in range(n_items) for i in range(n_items)] * repeat,
            "aggregate": aggregate.reshape(-1).numpy(),
            "aggregate_std_error": errors[0].reshape(-1).detach().numpy(),
            "average": average.reshape(-1).numpy(),
            "average_std_error": errors[1].reshape(-1).detach().numpy(),
            "n_cases": counts.reshape(-1).long().numpy(),
        }
    ).with_columns(
        pl.col(name).fill_nan(None)
        for name in ("aggregate", "aggregate_std_error", "average", "average_std_error")
    )


def effects_renderable(effects: Effects, by: str | None = None):
    """Two J x J matrices (aggregate, average) per segment: rows respond, columns change."""
    from rich.console import Group
    from rich.text import Text

    table = effects.table
    variable, kind = table.get_column("variable")[0], table.get_column("kind")[0]
    parts = [
        Text(
            f"{kind} of the probability of each row's alternative with respect to {variable} "
            "of each column's alternative"
        )  # fmt: skip
    ]
    if by is None:
        parts += _matrices(table)
    else:
        for (label,), part in table.group_by(by, maintain_order=True):
            parts.append(Text(f"{by} = {label}", style="bold"))
            parts += _matrices(part)
    if table.get_column("aggregate_std_error").null_count() < table.height:
        parts.append(Text("(delta-method standard errors in parentheses)"))
    parts += [Text(f"Note: {note}") for note in effects.notes]
    return Group(*parts)


def _matrices(table: pl.DataFrame) -> list:
    """The aggregate and the average J x J matrix of one segment, estimates (errors)."""
    from rich.table import Table
    from rich.text import Text

    labels = table.get_column("item").unique(maintain_order=True).to_list()
    views = []
    for column, title in (
        ("aggregate", "aggregate: effect on the predicted share"),
        ("average", "average over cases"),
    ):
        view = Table(title=Text(title), title_justify="left", show_edge=False,
                     header_style="bold")  # fmt: skip
        view.add_column("P(row)", no_wrap=True)
        for label in labels:
            view.add_column(Text(str(label)), justify="right", no_wrap=True)
        values = table.get_column(column).to_list()
        errors = table.get_column(f"{column}_std_error").to_list()
        for j, label in enumerate(labels):
            cells = []
            for i in range(len(labels)):
                value, error = values[j * len(labels) + i], errors[j * len(labels) + i]
                cells.append(
                    ""
                    if value is None
                    else f"{value:.4g}" + ("" if error is None else f" ({error:.2g})")
                )
            view.add_row(Text(str(label)), *cells)
        views.append(view)
    return views
