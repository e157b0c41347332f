"""Willingness to pay: every coefficient divided by minus the price coefficient.

Notation: b a coefficient, p the price coefficient, q = -p, w = b / q the willingness to pay
(in units of the price column per unit of b's variable; for an intercept, what an alternative
is worth against the base one). With V_b, V_p and C_bp from the fit's covariance, the delta
method gives Var(w) = V_b / p^2 + b^2 V_p / p^4 - 2 b C_bp / p^3 (the gradient of w is
(-1/p, b/p^2)). Fieller's 95% set is {r : (b - r q)^2 <= z^2 Var(b - r q)}, the roots of
A r^2 - 2 B r + C = 0 with A = q^2 - z^2 V_q, B = b q - z^2 C_bq, C = b^2 - z^2 V_b: a bounded
interval when A > 0, that is when p differs significantly from zero, unbounded otherwise.

A price varying by nothing divides every coefficient; a price per user divides each user's
coefficients, and every coefficient shared by all users once per user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl
import torch

from choicecli.errors import FormulaError, UsageError
from choicecli.results import Z_95, FitResult

PARAMETER = "__parameter"
PRICE = "__price"
KEYS = ["level", "term", "variable", "variation", "feature", "item", "user"]


@dataclass(frozen=True)
class WillingnessToPay:
    """One row per coefficient (per user and coefficient where either varies by user)."""

    table: pl.DataFrame
    notes: list[str]


def price_rows(table: pl.DataFrame, price: str, level: str) -> pl.DataFrame:
    """The price term's rows: one (varying by nothing) or one per user."""
    chosen = table.filter((pl.col("term") == price) & (pl.col("level") == level))
    if chosen.height == 0:
        known = (
            table.filter(pl.col("term") != "lambda").get_column("term").unique(maintain_order=True)
        )
        raise FormulaError(
            f"--price {price!r}: no such term at level {level}; the model's terms are: "
            f"{', '.join(known.to_list())}"
        )
    variation = chosen.get_column("variation")[0]
    if variation not in ("constant", "user") or chosen.get_column("feature").n_unique() > 1:
        raise UsageError(
            f"--price {price!r} varies by {variation} (or names several columns); the price "
            "must be one coefficient (constant) or one per user (user), e.g. (cost|constant)"
        )
    if not chosen.get_column("identified").all():
        raise FormulaError(
            f"--price {price!r} was not estimated by the fit; refit with a price that varies "
            "across the alternatives"
        )
    return chosen


def willingness_to_pay(result: FitResult, price: str, level: str = "item") -> WillingnessToPay:
    """WTP of every estimated coefficient, its delta-method error, 95% and Fieller intervals."""
    table = result.coefficient_table().with_row_index(PARAMETER)
    prices = price_rows(table, price, level).select(
        pl.col(PARAMETER).alias(PRICE), pl.col("user").alias("price_user")
    )
    coefficients = table.filter(
        pl.col("identified")
        & ~pl.col("fixed")
        & pl.col("estimate").is_not_null()
        & (pl.col("term") != "lambda")
        & ~((pl.col("term") == price) & (pl.col("level") == level))
    ).select(PARAMETER, *KEYS)
    if prices.height == 1:
        pairs = coefficients.join(prices.drop("price_user"), how="cross")
    else:  # a price per user: each user's own coefficients, and every shared one per user
        own = coefficients.filter(pl.col("user").is_not_null()).join(
            prices, left_on="user", right_on="price_user", how="inner"
        )
        shared = (
            coefficients.filter(pl.col("user").is_null())
            .drop("user")
            .join(prices, how="cross")
            .rename({"price_user": "user"})
            .select(own.columns)
        )
        pairs = pl.concat([own, shared])
    numbers = _ratios(result, pairs.get_column(PARAMETER), pairs.get_column(PRICE))
    frame = pairs.drop(PARAMETER, PRICE).with_columns(
        pl.Series(name, values.numpy()).fill_nan(None) for name, values in numbers.items()
    )
    return WillingnessToPay(table=frame, notes=_notes(result, table, prices, price))


def _ratios(result: FitResult, numerator: pl.Series, price: pl.Series) -> dict[str, torch.Tensor]:
    """w = -b/p with its delta-method error, 95% interval and Fieller interval. (M,) each."""
    estimate = result.estimate.double()  # (P,)
    b_index = torch.from_numpy(numerator.to_numpy().astype("int64"))  # (M,)
    p_index = torch.from_numpy(price.to_numpy().astype("int64"))  # (M,)
    b, p = estimate[b_index], estimate[p_index]  # (M,)
    variance_b, variance_p, covariance_bp = _covariances(result, b_index, p_index)
    wtp = -b / p  # (M,)
    variance = variance_b / p**2 + b**2 * variance_p / p**4 - 2.0 * b * covariance_bp / p**3  # (M,)
    std_error = variance.clamp_min(0.0).sqrt()  # (M,)
    q, covariance_bq = -p, -covariance_bp  # (M,)
    z2 = Z_95**2
    a = q**2 - z2 * variance_p  # (M,) > 0 exactly when p differs from zero at 5%
    half = b * q - z2 * covariance_bq  # (M,)
    c = b**2 - z2 * variance_b  # (M,)
    root = (half**2 - a * c).clamp_min(0.0).sqrt()  # (M,)
    bounded = a > 0  # (M,)
    nan = torch.full_like(wtp, math.nan)
    return {
        "coefficient": b,
        "price_coefficient": p,
        "wtp": wtp,
        "std_error": std_error,
        "ci_low": wtp - Z_95 * std_error,
        "ci_high": wtp + Z_95 * std_error,
        "fieller_low": torch.where(bounded, (half - root) / a, nan),
        "fieller_high": torch.where(bounded, (half + root) / a, nan),
    }


def _covariances(
    result: FitResult, b_index: torch.Tensor, p_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Var(b), Var(p), Cov(b, p) from the saved covariance of the estimated parameters;
    NaN where there is none. (M,) each."""
    count = len(result.parameters)
    covariance = result.covariance.double()  # (k, k)
    if covariance.numel() == 0:
        nan = torch.full(b_index.shape, math.nan, dtype=torch.float64)
        return nan, nan, nan
    position = torch.full((count,), -1, dtype=torch.long)  # (P,) row of each in the covariance
    position[result.estimated_index.long()] = torch.arange(result.estimated_index.numel())
    row_b, row_p = position[b_index], position[p_index]  # (M,)
    known = (row_b >= 0) & (row_p >= 0)  # (M,)
    row_b, row_p = row_b.clamp_min(0), row_p.clamp_min(0)
    nan = torch.tensor(math.nan, dtype=torch.float64)
    return (
        torch.where(known, covariance[row_b, row_b], nan),
        torch.where(known, covariance[row_p, row_p], nan),
        torch.where(known, covariance[row_b, row_p], nan),
    )


def _notes(result: FitResult, table: pl.DataFrame, prices: pl.DataFrame, price: str) -> list[str]:
    """Where the ratios cannot be trusted: an insignificant or positive price coefficient."""
    rows = table.filter(pl.col(PARAMETER).is_in(prices.get_column(PRICE).implode()))
    z_value = rows.get_column("z_value")
    estimate = rows.get_column("estimate")
    notes = []
    if result.covariance.numel() == 0:
        notes.append("the model holds no covariance matrix, so there are no standard errors")
    weak = int((z_value.abs() < Z_95).sum() or 0)
    if weak and rows.height == 1:
        notes.append(
            f"the price coefficient {price} = {estimate[0]:.6g} is not significantly different "
            f"from zero (z = {z_value[0]:.3g}): the willingness to pay may be unbounded, the "
            "delta-method errors and intervals are not to be trusted, and the Fieller "
            "intervals are unbounded (left empty)"
        )
    elif weak:
        notes.append(
            f"{weak} of {rows.height} users' price coefficients are not significantly different "
            "from zero (|z| < 1.96): their delta-method intervals are not to be trusted and "
            "their Fieller intervals are unbounded (left empty)"
        )
    positive = int((estimate > 0).sum() or 0)
    if positive:
        whose = "the price coefficient is" if rows.height == 1 else f"{positive} users' are"
        notes.append(
            f"{whose} positive (a higher price is preferred), so the signs of the willingness "
            "to pay are reversed"
        )
    return notes


def describe_users(table: pl.DataFrame) -> pl.DataFrame:
    """The per-user rows summarised over users as `coef --describe` does, |z| = |wtp| / error."""
    from choicecli.describe import describe_user_terms

    users = table.filter(pl.col("user").is_not_null()).select(
        *KEYS,
        pl.col("wtp").alias("estimate"),
        (pl.col("wtp") / pl.col("std_error")).alias("z_value"),
        pl.lit(True).alias("identified"),
        pl.lit(False).alias("fixed"),
    )
    return describe_user_terms(users, None)


def wtp_renderable(answer: WillingnessToPay, price: str):
    """Coefficients shared by all users one per row; per-user ones summarised; the notes."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from choicecli.describe import description_renderable

    shared = answer.table.filter(pl.col("user").is_null())
    view = Table(title=Text(f"willingness to pay: coefficient / -{price}"), title_justify="left",
                 show_edge=False, header_style="bold")  # fmt: skip
    view.add_column("term", no_wrap=True)
    view.add_column("item", no_wrap=True)
    for name in ("coefficient", "WTP", "std. error", "95% interval", "Fieller 95%"):
        view.add_column(name, justify="right", no_wrap=True)
    for row in shared.iter_rows(named=True):
        term = row["term"]
        if row["feature"] not in (None, "intercept", row["variable"]):
            term = f"{term} {row['feature']}"
        view.add_row(
            Text(term),
            Text(row["item"] or ""),
            _number(row["coefficient"]),
            _number(row["wtp"]),
            _number(row["std_error"], 4),
            _interval(row["ci_low"], row["ci_high"]),
            _interval(row["fieller_low"], row["fieller_high"], "unbounded"),
        )
    parts = [view] if shared.height else []
    if shared.height < answer.table.height:
        parts.append(Text("per user, over users:"))
        parts.append(description_renderable(describe_users(answer.table)))
    parts += [Text(f"Note: {note}") for note in answer.notes]
    return Group(*parts)


def _number(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _interval(low: float | None, high: float | None, missing: str = "") -> str:
    if low is None or high is None:
        return missing
    return f"[{low:.4g}, {high:.4g}]"
