"""Rich renderables for the fit summary and coefficient tables; nothing here prints."""

from __future__ import annotations

import polars as pl
from rich.console import Group
from rich.table import Table
from rich.text import Text

from choicecli.results import FitResult


def stars(p_value: float | None) -> str:
    if p_value is None:
        return ""
    return "***" if p_value < 0.001 else "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


def _number(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def coefficient_renderable(table: pl.DataFrame, title: str | None = None) -> Table:
    """Estimate, std. error, z, p and stars, one row per coefficient."""
    view = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    with_users = table.get_column("user").null_count() < table.height
    with_levels = (table.get_column("level") != "item").any()
    view.add_column("term", no_wrap=True)
    if with_levels:
        view.add_column("level", no_wrap=True)
    view.add_column("item", no_wrap=True)
    if with_users:
        view.add_column("user", no_wrap=True)
    for name in ("estimate", "std. error", "z", "p"):
        view.add_column(name, justify="right", no_wrap=True)
    view.add_column("", no_wrap=True)
    for row in table.iter_rows(named=True):
        term = row["term"]
        if row["feature"] not in (None, "intercept", row["variable"]):
            term = f"{term} {row['feature']}"
        if row.get("parameter"):  # a mixed logit's mean, sd or Cholesky entry
            partner = f" with {row['partner']}" if row.get("partner") else ""
            term = f"{term} {row['parameter']}{partner} ({row['distribution']})"
        if not row["identified"]:
            estimate = Text("not estimated", style="yellow")
        elif row["fixed"]:
            estimate = Text(f"{_number(row['estimate'])} fixed", style="dim")
        else:
            estimate = _number(row["estimate"])
        cells = [Text(term)] + ([row["level"]] if with_levels else []) + [Text(row["item"] or "")]
        cells += [Text(row["user"] or "")] if with_users else []
        cells += [
            estimate,
            _number(row["std_error"], 4),
            _number(row["z_value"], 4),
            "" if row["p_value"] is None else f"{row['p_value']:.3g}",
            stars(row["p_value"]),
        ]
        view.add_row(*cells)
    return view


def fit_summary(result: FitResult, max_rows: int = 60) -> Group:
    """Data facts, observed shares, optimisation facts, goodness of fit, coefficients."""
    fit = result.fit
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    kind = "nested logit" if result.spec.get("nests") else "conditional logit"
    kind = "mixed logit" if result.spec.get("random") else kind
    facts.add_row("model", Text(f"{kind}: {result.spec['formula']}"))
    if result.spec.get("random"):
        facts.add_row("draws", _draws_text(result))
    if result.spec.get("nests"):
        nests = "; ".join(f"{k}={','.join(v)}" for k, v in result.spec["nests"].items())
        facts.add_row("nests", Text(nests))
        facts.add_row("nest formula", Text(result.spec.get("nest_formula") or "(empty)"))
    facts.add_row(
        "data",
        f"{fit['n_rows']:,} rows, {fit['n_cases']:,} cases, {fit['n_alternatives']} "
        f"alternatives" + (f", {fit['n_users']:,} users" if fit.get("n_users") else ""),
    )
    shares = fit.get("observed_shares") or {}
    if shares and len(shares) <= 30:
        facts.add_row("observed shares", ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    facts.add_row(
        "optimiser",
        f"{fit['method']}, {fit['iterations']} iterations, "
        f"{'converged' if fit['converged'] else 'NOT converged'} ({fit['message']}), "
        f"{fit['seconds']:.2f} s on {fit['device']}",
    )
    facts.add_row(
        "log-likelihood",
        f"{fit['log_likelihood']:.4f} (equal shares {fit['null_log_likelihood']:.4f})",
    )
    against_shares = fit.get("rho_squared_shares")
    facts.add_row(
        "goodness of fit",
        f"rho-squared {fit['rho_squared']:.4f}, adjusted {fit['adjusted_rho_squared']:.4f}"
        + (f", against market shares {against_shares:.5f}" if against_shares is not None else "")
        + f", AIC {fit['aic']:.2f}, BIC {fit['bic']:.2f}, {fit['n_parameters']} parameters",
    )
    table = result.coefficient_table()
    shown = table.filter(pl.col("user").is_null())
    by_user = table.height - shown.height
    parts = [facts, coefficient_renderable(shown.head(max_rows))]
    if shown.height > max_rows:
        parts.append(Text(f"... {shown.height - max_rows} more rows: see 'choice coef'"))
    if by_user:
        parts.append(Text(f"{by_user} user-specific coefficients: see 'choice coef TERM'"))
    return Group(*parts)


def _draws_text(result: FitResult) -> str:
    """A mixed logit's draws and the simulation's standard error of the log-likelihood."""
    fit = result.fit
    return (
        f"{fit['draws']:,} {fit['draw_kind']} draws per {fit['draws_per']} "
        f"({fit['n_draw_units']:,}), seed {fit['seed']}; simulation standard error of the "
        f"log-likelihood {fit['simulation_standard_error']:.4g} (as for independent draws)"
    )
