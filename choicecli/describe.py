"""Summaries of a saved fit: its statistics as one row, and the spread of per-user coefficients.

Notation: U users; a user-varying term has one coefficient per user (and per alternative for
user-item terms, per feature column for globs), summarised over users.
"""

from __future__ import annotations

import polars as pl
from rich.table import Table
from rich.text import Text

from choicecli.errors import UsageError
from choicecli.results import Z_95, FitResult

GROUP_COLUMNS = ["level", "term", "variable", "feature", "item"]
QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95}
SCALAR_TYPES = (int, float, str, bool)


def fit_statistics_frame(result: FitResult) -> pl.DataFrame:
    """One row: the model, its formula, every scalar fit statistic and the observed shares."""
    row: dict = {
        "kind": "nested logit" if result.spec.get("nests") else "conditional logit",
        "formula": result.spec["formula"],
        "nest_formula": result.spec.get("nest_formula"),
    }
    row.update(
        {
            key: value
            for key, value in result.fit.items()
            if value is None or isinstance(value, SCALAR_TYPES)
        }
    )
    for label, share in (result.fit.get("observed_shares") or {}).items():
        row[f"observed_share_{label}"] = share
    row["input_sha256"] = result.provenance.get("input_sha256")
    row["warnings"] = len(result.warnings)
    frame = pl.DataFrame([row])
    return frame.with_columns(  # statistics a fit could not give (None) stay numbers
        pl.col(name).cast(pl.String if name in ("nest_formula", "input_sha256") else pl.Float64)
        for name, dtype in frame.schema.items()
        if dtype == pl.Null
    )


def describe_user_terms(table: pl.DataFrame, term: str | None) -> pl.DataFrame:
    """Count, mean, sd, quantiles and the share with |z| > 1.96 of each user-varying
    coefficient over users (one row per term, feature and alternative).

    Only estimated, free rows count (the base alternative's zeros and coefficients the fit
    could not identify are left out; `not_estimated` counts the latter). The share counts
    users whose coefficient has a standard error.
    """
    users = table.filter(pl.col("user").is_not_null() & ~pl.col("fixed"))
    if users.height == 0:
        what = f"{term!r} does not vary by user" if term else "the model has no user terms"
        raise UsageError(
            f"--describe summarises coefficients that vary by user, and {what}; "
            "use 'choice coef' without --describe"
        )
    estimated = pl.col("estimate").filter(pl.col("identified") & pl.col("estimate").is_not_null())
    z_value = pl.col("z_value").filter(pl.col("identified") & pl.col("z_value").is_not_null())
    return (
        users.group_by(GROUP_COLUMNS, maintain_order=True)
        .agg(
            estimated.count().alias("count"),
            (~pl.col("identified")).sum().cast(pl.Int64).alias("not_estimated"),
            estimated.mean().alias("mean"),
            estimated.std().alias("sd"),
            estimated.min().alias("min"),
            *[estimated.quantile(q, "linear").alias(name) for name, q in QUANTILES.items()],
            estimated.max().alias("max"),
            (z_value.abs() > Z_95).mean().alias("share_significant"),
        )
        .with_columns(pl.col("count").cast(pl.Int64))
    )


def description_renderable(described: pl.DataFrame) -> Table:
    """One row per user-varying coefficient: count, mean, sd, quantiles, share significant."""
    view = Table(show_edge=False, header_style="bold")
    with_items = described.get_column("item").null_count() < described.height
    view.add_column("term", no_wrap=True)
    if with_items:
        view.add_column("item", no_wrap=True)
    numbers = ["count", "mean", "sd", "min", *QUANTILES, "max", "share_significant"]
    for name in numbers:
        header = "|z| > 1.96" if name == "share_significant" else name
        view.add_column(header, justify="right", no_wrap=True)
    for row in described.iter_rows(named=True):
        term = row["term"]
        if row["feature"] not in (None, "intercept", row["variable"]):
            term = f"{term} {row['feature']}"
        cells = [Text(term)] + ([Text(row["item"] or "")] if with_items else [])
        cells.append(str(row["count"]))
        cells += ["" if row[name] is None else f"{row[name]:.4g}" for name in numbers[1:-1]]
        share = row["share_significant"]
        cells.append("" if share is None else f"{share:.1%}")
        view.add_row(*cells)
    return view
