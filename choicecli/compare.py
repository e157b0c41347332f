"""Compare saved models: fit statistics side by side and likelihood-ratio tests of nested pairs.

Model A is nested in model B when both were fit on the same data and A's parameters are a
proper subset of B's: the same data means the same input bytes (SHA-256), the same case count
and the same case, item, choice, availability and weight columns; a parameter is named by its
level, term, feature column, alternative and user, and only estimated parameters count (fixed
base rows and coefficients the fit could not identify are left out). Setting B's extra
parameters to zero (a nest's lambda to one) gives A, so twice the log-likelihood difference is
chi-squared with as many degrees of freedom as B has extra parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import polars as pl
import torch

from choicecli.results import FitResult

SAME_DATA_ROLES = ("case", "item", "choice", "available", "weights")


@dataclass(frozen=True)
class Comparison:
    """What `compare` reports: one row per model, one per test, and notes in words."""

    models: pl.DataFrame
    tests: pl.DataFrame
    notes: list[str]


def chi_squared_upper(statistic: float, df: int) -> float:
    """P(X > statistic) for X chi-squared with df degrees of freedom."""
    value = torch.tensor(statistic / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), value))


def parameter_labels(result: FitResult) -> frozenset[tuple]:
    """Names of the estimated parameters: (level, term, feature, item, user)."""
    estimated = result.identified.tolist()
    return frozenset(
        (p.level, p.term, p.feature, p.item, p.user)
        for p, identified in zip(result.parameters, estimated, strict=True)
        if identified and not p.fixed
    )


def _data_key(result: FitResult) -> tuple:
    roles = result.spec.get("roles", {})
    return (
        result.provenance.get("input_sha256"),
        result.fit.get("n_cases"),
        tuple(roles.get(name) for name in SAME_DATA_ROLES),
    )


def _same_data(first: FitResult, second: FitResult) -> bool:
    one = _data_key(first)
    return one[0] is not None and one == _data_key(second)


def _why_different(first: FitResult, second: FitResult) -> str:
    one, two = _data_key(first), _data_key(second)
    if one[0] is None or two[0] is None:
        return "the input's SHA-256 is not recorded"
    if one[0] != two[0]:
        return "the input files differ (SHA-256)"
    if one[1] != two[1]:
        return f"the case counts differ ({one[1]:,} and {two[1]:,})"
    return "they read different case, item, choice, availability or weight columns"


def _penalty(result: FitResult) -> float:
    return float(result.spec.get("options", {}).get("l2_penalty") or 0.0)


def compare_models(results: list[FitResult], names: list[str]) -> Comparison:
    """The statistics table, the LR test of every nested pair on the same data, and notes."""
    models = pl.DataFrame(
        {
            "model": names,
            "kind": [
                "nested logit" if r.spec.get("nests") else "conditional logit" for r in results
            ],
            "formula": [r.spec["formula"] for r in results],
            "n_cases": [r.fit.get("n_cases") for r in results],
            "log_likelihood": [r.fit.get("log_likelihood") for r in results],
            "n_parameters": [r.fit.get("n_parameters") for r in results],
            "aic": [r.fit.get("aic") for r in results],
            "bic": [r.fit.get("bic") for r in results],
            "rho_squared": [r.fit.get("rho_squared") for r in results],
            "adjusted_rho_squared": [r.fit.get("adjusted_rho_squared") for r in results],
            "converged": [r.fit.get("converged") for r in results],
            "input_sha256": [r.provenance.get("input_sha256") for r in results],
        },
        schema_overrides={"n_cases": pl.Int64, "n_parameters": pl.Int64},
    )
    labels = [parameter_labels(r) for r in results]
    tests, notes = [], []
    for first in range(len(results)):  # pairs of models: a handful, never a hot path
        for second in range(first + 1, len(results)):
            pair = f"{names[first]} and {names[second]}"
            if not _same_data(results[first], results[second]):
                why = _why_different(results[first], results[second])
                notes.append(
                    f"{pair} were not fit on the same data: {why}; their log-likelihoods "
                    "cannot be compared, so no likelihood-ratio test is made"
                )
                continue
            if labels[first] < labels[second]:
                small, large = first, second
            elif labels[second] < labels[first]:
                small, large = second, first
            else:
                same = labels[first] == labels[second]
                notes.append(
                    f"{pair}: "
                    + ("the same parameters" if same else "neither nests the other")
                    + "; no likelihood-ratio test (compare AIC and BIC)"
                )
                continue
            tests.append(_lr_test(results, names, labels, small, large, notes))
    test_frame = pl.DataFrame(
        tests,
        schema={
            "restricted": pl.String,
            "full": pl.String,
            "lr_statistic": pl.Float64,
            "df": pl.Int64,
            "p_value": pl.Float64,
        },
        orient="row",
    )
    return Comparison(models=models, tests=test_frame, notes=notes)


def _lr_test(results, names, labels, small: int, large: int, notes: list[str]) -> tuple:
    """(restricted, full, statistic, df, p); notes where the test cannot be trusted."""
    statistic = 2.0 * (results[large].fit["log_likelihood"] - results[small].fit["log_likelihood"])
    df = len(labels[large]) - len(labels[small])
    pair = f"{names[small]} within {names[large]}"
    p_value: float | None = chi_squared_upper(max(statistic, 0.0), df)
    if statistic < -1e-6:
        notes.append(
            f"{pair}: the larger model has the lower log-likelihood, so one fit stopped short "
            "of its optimum; refit before testing (no p-value)"
        )
        p_value = None
    if not (results[small].fit.get("converged") and results[large].fit.get("converged")):
        notes.append(f"{pair}: a fit did not converge, so the test is not reliable")
    if _penalty(results[small]) or _penalty(results[large]):
        notes.append(f"{pair}: a fit is penalised (--l2), so the statistic is not chi-squared")
    if p_value is not None and math.isnan(p_value):
        p_value = None
    return (names[small], names[large], statistic, df, p_value)


def comparison_renderable(comparison: Comparison, tests_only: bool = False):
    """The models table, the tests table and the notes, for a terminal."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts = []
    if not tests_only:
        view = Table(show_edge=False, header_style="bold")
        for name in ("model", "log-likelihood", "parameters", "AIC", "BIC", "adj. rho-squared"):
            view.add_column(name, justify="left" if name == "model" else "right", no_wrap=True)
        for row in comparison.models.iter_rows(named=True):
            view.add_row(
                Text(row["model"]),
                _fixed(row["log_likelihood"], 4),
                str(row["n_parameters"]),
                _fixed(row["aic"], 2),
                _fixed(row["bic"], 2),
                _fixed(row["adjusted_rho_squared"], 4),
            )
        parts.append(view)
    if comparison.tests.height:
        view = Table(title="likelihood-ratio tests", title_justify="left", show_edge=False,
                     header_style="bold")  # fmt: skip
        for name in ("restricted", "full", "LR statistic", "df", "p"):
            view.add_column(name, justify="right" if name[0] in "Ldp" else "left", no_wrap=True)
        for row in comparison.tests.iter_rows(named=True):
            p = row["p_value"]
            view.add_row(
                Text(row["restricted"]),
                Text(row["full"]),
                _fixed(row["lr_statistic"], 4),
                str(row["df"]),
                "" if p is None else f"{p:.3g}",
            )
        parts.append(view)
    parts += [Text(f"Note: {note}") for note in comparison.notes]
    return Group(*parts)


def _fixed(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
