"""Score a long table with a fitted model: utilities, probabilities, shares.

Notation: R rows of a batch (sorted by case), N its cases.
"""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import torch

from choicecli.data import check_columns
from choicecli.errors import ArtifactError, DataError
from choicecli.formula import suggest
from choicecli.models import block_utility
from choicecli.problem import ModelSpec, build_problem, dense_design
from choicecli.results import FitResult
from choicecli.spec import spec_from_document

INPUT_ROW = "__input_row"


def spec_from_result(result: FitResult, overrides: dict[str, str]) -> ModelSpec:
    """The fitted spec (see `choicecli.spec`) with these role columns, refusing missing rows."""
    spec = spec_from_document(result.spec)
    return replace(spec, roles=replace(spec.roles, **overrides), missing="error")


def _parameter_key(parameter) -> tuple:
    return (parameter.level, parameter.term, parameter.feature, parameter.item, parameter.user)


def predict_frame(
    result: FitResult,
    source: pl.DataFrame | pl.LazyFrame,
    *,
    where: str,
    roles: dict[str, str] | None = None,
    unseen: str = "error",
    batch_cases: int = 200_000,
    extra_columns: tuple[str, ...] = (),
) -> tuple[pl.DataFrame, dict]:
    """One output row per input row, in input order; a fit report when choices are present.

    `source` may be a lazy scan of a file: cases are then read and scored `batch_cases` at a
    time, so memory holds one batch of the input (and the output), never the whole input.
    Output columns: case, item, user and choice as given, any `extra_columns`, then utility,
    probability and predicted.
    """
    empty = pl.DataFrame(schema=source.lazy().collect_schema())  # the input's columns only
    lazy = source.lazy().with_row_index(INPUT_ROW)
    spec = spec_from_result(result, roles or {})
    # scoring needs neither weights nor sessions; choices and availability only when given;
    # missing values are an error (predict has no --missing to drop them)
    present = {name: getattr(spec.roles, name) for name in ("choice", "available")}
    present = {k: v if v in empty.columns else None for k, v in present.items()}
    roles_used = replace(spec.roles, weights=None, session=None, **present)
    roles_used.check_distinct()
    spec = replace(spec, roles=roles_used, missing="refuse")
    columns = [name for name in empty.columns if name != INPUT_ROW]
    for option, name in (("--case", spec.roles.case), ("--item", spec.roles.item)):
        if name not in columns:  # a role column renamed since the fit: say which option fixes it
            raise DataError(
                f"{where}: no column {name!r} (the model's {option} column); if it has another "
                f"name here, pass {option} NAME{suggest(name, columns)} (columns: "
                f"{', '.join(columns)})"
            )
    check_columns(empty, [spec.roles.case, spec.roles.item, *extra_columns], where)
    user_labels = result.labels.get("users")
    if user_labels is not None and unseen == "zero" and spec.roles.user in empty.columns:
        user_labels = _with_unseen_users(user_labels, lazy, spec.roles.user)
    estimates = {
        _parameter_key(p): float(v)
        for p, v in zip(result.parameters, result.estimate.tolist(), strict=True)
        if p.parameter in (None, "mean")  # a mixed logit's spreads: in `spreads` below
    }
    spreads = [v for p, v in zip(result.parameters, result.estimate.tolist(), strict=True)
               if p.parameter in ("sd", "cholesky")]  # fmt: skip
    case = spec.roles.case
    cases = lazy.select(pl.col(case).unique().sort()).collect().to_series()
    batch_cases = min(batch_cases, max(cases.len(), 1))  # a huge --batch-cases: one batch
    pieces = []
    totals = {"log_likelihood": 0.0, "null": 0.0, "hits": 0, "cases": 0}
    for first in range(0, max(cases.len(), 1), batch_cases):
        labels = cases.slice(first, batch_cases)
        batch = lazy.filter(pl.col(case).is_in(labels.implode())).collect()
        if cases.null_count() and first == 0:
            batch = pl.concat([batch, lazy.filter(pl.col(case).is_null()).collect()])
        pieces.append(
            _score_batch(
                result,
                spec,
                batch,
                where,
                user_labels,
                (estimates, spreads),
                totals,
                extra_columns,
            )  # fmt: skip
        )
    scored = pl.concat(pieces).sort(INPUT_ROW).drop(INPUT_ROW)
    report = {}
    if spec.roles.choice:
        report = {
            "log_likelihood": totals["log_likelihood"],
            "n_cases": totals["cases"],
            "mean_log_likelihood": totals["log_likelihood"] / max(totals["cases"], 1),
            "hit_rate": totals["hits"] / max(totals["cases"], 1),
            "null_log_likelihood": totals["null"],
        }
    return scored, report


def _with_unseen_users(user_labels: list, lazy: pl.LazyFrame, column: str) -> list:
    """The model's user labels followed by the data's users it has not seen (sorted).

    Where the model's labels and the column differ in type (integers against text), users are
    matched by their text and every label is given as text.
    """
    kind = lazy.collect_schema()[column]
    seen = pl.Series(user_labels).cast(kind, strict=False)
    users = lazy.select(pl.col(column).unique()).collect().to_series()
    fresh = users.filter(~users.is_in(seen.implode())).drop_nulls().sort().to_list()
    if fresh and pl.Series(user_labels).dtype != kind:
        return [str(label) for label in user_labels] + [str(label) for label in fresh]
    return list(user_labels) + fresh


def _score_batch(
    result, spec, batch, where, user_labels, parameters, totals, extra_columns
) -> pl.DataFrame:
    estimates, spreads = parameters
    problem = build_problem(
        batch.drop(INPUT_ROW),
        spec,
        where,
        item_labels=result.labels["items"],
        user_labels=user_labels,
        drop_single_alternative=False,  # every input row gets a score
    )
    layout = {_parameter_key(p) for p in problem.parameters}
    if not estimates.keys() <= layout:
        raise ArtifactError(
            "the model's formula does not lay out the parameters it stores (model.json was "
            "edited, or the files come from different fits); refit the model"
        )
    theta = torch.tensor(
        [estimates.get(_parameter_key(p), 0.0) for p in problem.parameters], dtype=torch.float64
    )
    theta = torch.nan_to_num(theta, nan=0.0)  # not-estimated coefficients contribute nothing
    data = problem.data
    if problem.mixed is not None:
        log_p, utility = _mixed_scores(problem, theta, torch.tensor(spreads, dtype=torch.float64))
    else:
        model = problem.model(torch.device("cpu"))
        log_p = model.row_log_probabilities(theta)  # (R,)
        utility = block_utility(problem.item_blocks + problem.nest_blocks, theta, data.n_rows)
    probability = torch.exp(log_p)
    best = segment_best(probability, data.case_index, data.n_cases)  # (R,) bool
    if data.chosen is not None:
        totals["log_likelihood"] += float((data.chosen * log_p).sum())
        totals["null"] -= float(torch.log(data.alternatives_per_case().double()).sum())
        totals["hits"] += int((best & (data.chosen > 0)).sum())
        totals["cases"] += data.n_cases
    roles = spec.roles
    keep = [c for c in (roles.case, roles.item, roles.user, roles.choice, *extra_columns) if c]
    keep = list(dict.fromkeys(keep))  # a column in two roles (--user case) is output once
    source = batch.select([INPUT_ROW, *keep])[data.source_row.numpy()]
    return source.with_columns(
        pl.Series("utility", utility.numpy()),
        pl.Series("probability", probability.numpy()),
        pl.Series("predicted", best.numpy()),
    )


def _mixed_scores(
    problem, theta: torch.Tensor, spreads: torch.Tensor, draw_batch: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """A mixed logit's simulated probabilities P = (1/R) sum_r P(beta_r) (log, (R,)) and
    utilities averaged over the draws (R,), with the fit's draws: kind, seed, and each unit's
    place (a user's code among the model's users, or the case's in this batch), so a user the
    fit saw gets the draws the fit gave it. Unconditional probabilities (the population's
    distribution, not the user's conditional one)."""
    from choicecli.models import mixed

    spec, layout, data = problem.spec, problem.mixed, problem.data
    means = torch.tensor(layout.means, dtype=torch.long)  # (Kr,)
    fixed_theta = theta.clone()
    fixed_theta[means] = 0.0
    fixed_utility = block_utility(problem.item_blocks, fixed_theta, data.n_rows)  # (R,)
    random_design = dense_design(problem, layout.means)  # (R, Kr)
    mixed_spec = mixed.MixedSpec(0, layout.distributions, layout.correlated)
    core_theta = torch.cat([theta[means], spreads])  # (2 Kr + Q,)
    if data.user_of_case is not None:
        unit_of_row, n_units = data.user_of_row, len(data.user_labels)
    else:
        unit_of_row, n_units = data.case_index, data.n_cases
    draws = mixed.make_draws(mixed_spec, n_units, spec.draws, spec.draw_kind, spec.seed)
    probability = torch.zeros(data.n_rows, dtype=torch.float64)  # (R,)
    utility = torch.zeros(data.n_rows, dtype=torch.float64)  # (R,)
    case = data.case_index  # (R,)
    for start in range(0, spec.draws, draw_batch):
        beta = mixed.random_coefficients(
            mixed_spec, core_theta, draws[:, start : start + draw_batch]
        )[0]
        values = fixed_utility.unsqueeze(1) + torch.bmm(
            beta[unit_of_row], random_design.unsqueeze(2)
        ).squeeze(2)  # (R, B)
        index = case.unsqueeze(1).expand_as(values)  # (R, B)
        top = torch.full((data.n_cases, values.shape[1]), -torch.inf, dtype=values.dtype)
        top = top.scatter_reduce(0, index, values, reduce="amax")  # (N, B)
        exponent = torch.exp(values - top[case])  # (R, B)
        total = torch.zeros_like(top).index_add(0, case, exponent)  # (N, B)
        probability += (exponent / total[case]).sum(dim=1)
        utility += values.sum(dim=1)
    return torch.log(probability / spec.draws), utility / spec.draws


def segment_best(probability: torch.Tensor, case_index: torch.Tensor, n_cases: int) -> torch.Tensor:
    """True on the first most probable row of each case. (R,)"""
    top = torch.full((n_cases,), -1.0, dtype=probability.dtype).scatter_reduce(
        0, case_index, probability, "amax"
    )
    rows = torch.arange(probability.shape[0])
    candidate = torch.where(probability == top[case_index], rows, probability.shape[0])
    first = torch.full((n_cases,), probability.shape[0], dtype=torch.long).scatter_reduce(
        0, case_index, candidate, "amin"
    )
    return rows == first[case_index]


def share_table(scored: pl.DataFrame, result: FitResult, by: str | None) -> pl.DataFrame:
    """Predicted (and observed) share of each alternative, per segment when `by` is given."""
    roles = result.spec["roles"]
    case, item, choice = roles["case"], roles["item"], roles["choice"]
    groups = [by] if by else []
    if by and by not in scored.columns:
        raise DataError(f"--by {by!r}: no such column among {', '.join(scored.columns)}")
    n_cases = scored.group_by(groups or pl.lit(1)).agg(pl.col(case).n_unique().alias("__n"))
    aggregations = [pl.col("probability").sum().alias("predicted_share")]
    if choice in scored.columns:
        aggregations.append(pl.col(choice).cast(pl.Float64).sum().alias("observed_share"))
    table = scored.group_by([*groups, item]).agg(aggregations)
    joined = (
        table.join(n_cases, on=groups)
        if groups
        else table.with_columns(pl.lit(n_cases.get_column("__n")[0]).alias("__n"))
    )
    shares = [pl.col("predicted_share") / pl.col("__n")]
    if choice in scored.columns:
        shares.append(pl.col("observed_share") / pl.col("__n"))
    return (
        joined.with_columns(shares)
        .drop("__n")
        .with_columns(pl.col(item).cast(pl.String).alias("item"))
        .select(
            [
                *groups,
                "item",
                *[c for c in ("predicted_share", "observed_share") if c in joined.columns],
            ]
        )  # fmt: skip
        .sort([*groups, "item"])
    )
