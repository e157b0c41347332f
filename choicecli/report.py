"""What a reader sees: the fit summary, coefficient tables, and warnings about the estimates.

Everything here returns plain lines (rich `Text`, one per printed line) laid out for a width,
or strings; nothing prints. A table never cuts a number: when the width is short it drops the
interval columns, then z, then puts each row on two lines; with no width (not a terminal) it
uses every column. Lines never carry trailing spaces.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl
from rich.text import Text

if TYPE_CHECKING:
    from choicecli.results import FitResult

GAP = 2  # spaces between table columns
WRAP_INDENT = 4  # the second line of a row wrapped in two
FACT_WIDTH = 17  # the label column of the summary's facts
BLOCK_ROWS = 12  # a per-alternative block longer than this is one line in the summary
LAMBDA_RUNAWAY = 100.0  # a lambda above this: a likely non-identified or runaway model
COEFFICIENT_RUNAWAY = 1e4  # a coefficient above this in absolute value: the same,
RUNAWAY_RELATIVE_ERROR = 0.01  # when its standard error is below this share of it (or none)
WARNED_ROWS = 10  # estimates named one by one in warnings; the rest are counted
P_FLOOR = 1e-300  # p-values below this print as "< 1e-300"
SIGNIFICANCE = "sig: *** p < 0.001, ** p < 0.01, * p < 0.05"
HEADERS = {
    "term": "term",
    "level": "level",
    "item": "item",
    "user": "user",
    "estimate": "estimate",
    "std_error": "std. error",
    "z": "z",
    "p": "p",
    "sig": "sig",
    "ci_low": "95% low",
    "ci_high": "95% high",
    "note": "note",
}
LABELS = ("term", "level", "item", "user")
RIGHT_ALIGNED = frozenset({"estimate", "std_error", "z", "p", "ci_low", "ci_high"})
DROPPED_FIRST = (("ci_low", "ci_high"), ("z",))  # columns left out, in order, when narrow


# ---------------------------------------------------------------------------------------------
# Numbers and words


def stars(p_value: float | None) -> str:
    if p_value is None:
        return ""
    return "***" if p_value < 0.001 else "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


def format_p(p_value: float | None) -> str:
    """Three significant digits down to 1e-300, "< 1e-300" below (past the float's range)."""
    if p_value is None:
        return ""
    return f"< {P_FLOOR:.0e}" if p_value < P_FLOOR else f"{p_value:.3g}"


def _number(value: float | None, digits: int = 6) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """'1 case', '2 cases', '1,000 cases'."""
    word = singular if count == 1 else (plural_form or singular + "s")
    return f"{count:,} {word}"


def _inference_row(fit: dict) -> tuple[str, str]:
    """The tests against the null, the optimum's gradient and curvature, and which standard
    errors the table shows (and which weights apply)."""
    tests = [
        f"LR chi2 {test['chi_squared']:.1f} (df {test['df']}, p {format_p(test['p_value'])}) "
        f"against {name.replace('_', ' ')}"
        for name in ("equal_shares", "market_shares")
        if (test := fit.get(f"lr_{name}"))
    ]
    condition = fit.get("hessian_condition_number")
    if fit.get("gradient_norm") is not None:
        tests.append(f"gradient norm {fit['gradient_norm']:.3g}")
    if condition is not None:
        tests.append(f"Hessian condition number {condition:.3g}")
    kind = fit.get("standard_errors", "classic")
    weights = fit.get("weights_kind")
    tests.append(f"standard errors: {kind}" + (f", {weights} weights" if weights else ""))
    return "tests", "; ".join(tests)


def text_width(
    is_terminal: bool, terminal_width: int, environ: Mapping[str, str] | None = None
) -> int | None:
    """The width to lay text out for: COLUMNS when set, the terminal's, or none (no limit)."""
    environ = os.environ if environ is None else environ
    declared = environ.get("COLUMNS", "").strip()
    if declared.isdigit() and int(declared) > 0:
        return int(declared)
    return terminal_width if is_terminal else None


def _wrap(text: str, width: int | None, indent: str = "", first: str = "") -> list[str]:
    """Break `text` between words to `width` (no limit when None); never cuts a word."""
    if width is None:
        return [first + text]
    return textwrap.wrap(
        text,
        max(width, len(first) + 20),
        initial_indent=first,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [first]


# ---------------------------------------------------------------------------------------------
# Reading the estimates


def describe(row: Mapping[str, Any]) -> str:
    """A coefficient in words: "lambda of nest 'a'", "intercept[item] for 'bus'"."""
    if row["term"] == "lambda":
        return f"lambda of nest {row['item']!r}" if row.get("item") else "lambda"
    name = row["term"]
    if row.get("feature") not in (None, "intercept", row.get("variable")):
        name += f" ({row['feature']})"
    if row.get("level") == "nest":
        name += " at nest level"
    where = [f"{row['item']!r}" for key in ("item",) if row.get(key) is not None]
    where += [f"user {row['user']!r}"] if row.get("user") is not None else []
    return name + (f" for {' and '.join(where)}" if where else "")


def is_runaway(row: Mapping[str, Any]) -> bool:
    """A free estimate so large it most likely ran off toward infinity: a lambda over 100, or a
    coefficient over 1e4 whose standard error is tiny beside it (or missing)."""
    estimate = row.get("estimate")
    if estimate is None or row.get("fixed") or math.isnan(estimate):
        return False
    if row["term"] == "lambda":
        return estimate > LAMBDA_RUNAWAY
    error = row.get("std_error")
    precise = error is None or math.isnan(error) or error < RUNAWAY_RELATIVE_ERROR * abs(estimate)
    return abs(estimate) > COEFFICIENT_RUNAWAY and precise


def runaway_rows() -> pl.Expr:
    """`is_runaway` as a polars expression (True where a free estimate ran away)."""
    estimate = pl.col("estimate")
    large = (
        pl.when(pl.col("term") == "lambda")
        .then(estimate > LAMBDA_RUNAWAY)
        .otherwise(
            (estimate.abs() > COEFFICIENT_RUNAWAY)
            & (
                pl.col("std_error").is_null()
                | (pl.col("std_error") < RUNAWAY_RELATIVE_ERROR * estimate.abs())
            )
        )
    )
    return (large & ~pl.col("fixed").fill_null(False)).fill_null(False)


def _flagged(table: pl.DataFrame) -> pl.DataFrame:
    """Rows on a bound or run away: the few that warnings and legends speak of."""
    on_bound = pl.col("at_bound").fill_null(False) if "at_bound" in table.columns else pl.lit(False)
    return table.filter(on_bound | runaway_rows())


def estimate_warnings(table: pl.DataFrame, spec: Mapping[str, Any]) -> list[str]:
    """Warnings about the final estimates: on a bound, or so large the model likely ran away;
    one each for the first WARNED_ROWS, then one line counting the rest."""
    from choicecli.results import LAMBDA_FLOOR

    found = []
    bounds = spec.get("lambda_bounds")
    flagged = _flagged(table)
    for row in flagged.head(WARNED_ROWS).iter_rows(named=True):
        if row.get("at_bound"):
            low, high = bounds or (LAMBDA_FLOOR, None)
            where = f"--lambda-bounds {low:g},{high:g}" if bounds else f"lambda's floor {low:g}"
            found.append(
                f"{describe(row)} = {_number(row['estimate'])} sits on its bound ({where}): "
                "the data push it past the bound, and its standard error and test assume an "
                "interior optimum, so they do not hold"
            )
        elif is_runaway(row):
            spread = _number(row["std_error"], 4) or "none"
            fix = (
                "fix it (--lambda-fixed) or bound it (--lambda-bounds 0.01,1), or simplify "
                "the nests"
                if row["term"] == "lambda"
                else "look for perfect prediction or a term collinear with others, and drop "
                "or rescale it"
            )
            found.append(
                f"{describe(row)} = {_number(row['estimate'])} (std. error {spread}): a likely "
                "non-identified or runaway model; the estimate ran off toward infinity and a "
                f"small standard error there is not precision; {fix}"
            )
    if flagged.height > WARNED_ROWS:
        rest = flagged.height - WARNED_ROWS
        found.append(f"{plural(rest, 'more estimate')} on a bound or run away: see choice coef")
    return found


# ---------------------------------------------------------------------------------------------
# Tables


@dataclass
class _Line:
    """One table row: cells by column key, or a label and free text spanning the numbers."""

    cells: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (text, style)
    span: str | None = None


def _coefficient_line(row: Mapping[str, Any], with_levels: bool, with_users: bool) -> _Line:
    """A glob term's column (its feature) goes with the alternative: "user_obs_1: bus"."""
    item = row["item"] or ""
    if row.get("feature") not in (None, "intercept", row.get("variable")):
        item = f"{row['feature']}: {item}" if item else row["feature"]
    term = row["term"]
    if row.get("parameter"):  # a mixed logit's mean, sd or Cholesky entry
        partner = f" with {row['partner']}" if row.get("partner") else ""
        term = f"{term} {row['parameter']}{partner} ({row['distribution']})"
    cells: dict[str, tuple[str, str]] = {"term": (term, "")}
    if with_levels:
        cells["level"] = (row["level"] or "", "")
    cells["item"] = (item, "")
    if with_users:
        cells["user"] = (row["user"] or "", "")
    notes: list[str] = []
    if not row["identified"]:
        notes.append("not estimated")
    else:
        cells["estimate"] = (_number(row["estimate"]), "")
        if row["fixed"]:
            notes.append("fixed")
        else:
            cells["std_error"] = (_number(row["std_error"], 4), "")
            cells["z"] = (_number(row["z_value"], 4), "")
            cells["p"] = (format_p(row["p_value"]), "")
            cells["sig"] = (stars(row["p_value"]), "")
            cells["ci_low"] = (_number(row["ci_low"], 4), "")
            cells["ci_high"] = (_number(row["ci_high"], 4), "")
    if row.get("at_bound"):
        notes.append("at bound")
    if is_runaway(row):
        notes.append("runaway?")
    style = "dim" if row["fixed"] and row["identified"] else "yellow" if notes else ""
    cells["note"] = (", ".join(notes), style)
    return _Line(cells)


def _with_levels(table: pl.DataFrame) -> bool:
    """Whether a level column is needed: terms other than lambda at the nest level."""
    return table.filter((pl.col("level") != "item") & (pl.col("term") != "lambda")).height > 0


def _columns(table: pl.DataFrame) -> list[str]:
    keys = ["term"]
    if _with_levels(table):
        keys.append("level")
    keys.append("item")
    if table.get_column("user").null_count() < table.height:
        keys.append("user")
    return keys + ["estimate", "std_error", "z", "p", "sig", "ci_low", "ci_high", "note"]


def _layout(keys: list[str], lines: list[_Line], width: int | None) -> tuple[list[Text], list[str]]:
    """Align `lines` in columns for `width`: drop CI, then z; then a row whose labels are too
    long for the room left of the numbers gets its labels on a line of their own, its numbers
    below, still in their columns. Numbers are never cut.

    Returns the printed lines and the columns shown; columns no row fills are left out.
    """
    keys = [k for k in keys if k == "term" or any(line.cells.get(k, ("",))[0] for line in lines)]
    header = _Line({k: (HEADERS[k], "bold") for k in HEADERS})
    cells = [line for line in lines if line.span is None]

    def widths_of(chosen: list[str], among: list[_Line]) -> dict[str, int]:
        return {
            k: max(len(line.cells.get(k, ("",))[0]) for line in [header, *among]) for k in chosen
        }

    def spread(sizes: Mapping[str, int]) -> int:
        return sum(sizes.values()) + GAP * (len(sizes) - 1) if sizes else 0

    for dropped in DROPPED_FIRST:
        if width is None or spread(widths_of(keys, lines)) <= width:
            break
        keys = [k for k in keys if k not in dropped]
    labels = [k for k in keys if k in LABELS]
    numbers = [k for k in keys if k not in LABELS]
    sizes = widths_of(keys, lines)
    fitting = set(range(len(lines)))
    if width is not None and spread(sizes) > width:
        room = width - spread(widths_of(numbers, cells)) - GAP  # left of the numbers
        fitting = _fitting_rows(lines, labels, room, widths_of(labels, []))
        sizes = {**widths_of(labels, [lines[i] for i in fitting]), **widths_of(numbers, cells)}
    lead = spread({k: sizes[k] for k in labels}) + GAP
    rows: list[Text] = [_join(keys, header.cells, sizes)]
    if not fitting:  # no room left of the numbers: every row on two lines, numbers indented
        lead = WRAP_INDENT
        rows = [
            _join(labels, header.cells, sizes),
            Text(" " * lead) + _join(numbers, header.cells, sizes),
        ]
    for index, line in enumerate(lines):
        fits = index in fitting
        if line.span is not None:
            label = _join(labels, line.cells, sizes if fits else {k: 0 for k in labels})
            label.rstrip()
            first = label.plain + " " * max(GAP, lead - len(label.plain) if fits else GAP)
            parts = _wrap(line.span, width, " " * WRAP_INDENT, first)
            rows.append(label + Text(parts[0][len(label.plain) :]))
            rows.extend(Text(part) for part in parts[1:])
        elif fits:
            rows.append(_join(keys, line.cells, sizes))
        else:
            rows.append(
                _join(labels, line.cells, {k: len(line.cells.get(k, ("",))[0]) for k in labels})
            )
            rows.append(Text(" " * lead) + _join(numbers, line.cells, sizes))
    for row in rows:
        row.rstrip()
    return [row for row in rows if row.plain], keys


def _fitting_rows(
    lines: list[_Line], labels: list[str], room: int, least: Mapping[str, int]
) -> set[int]:
    """The rows whose labels share columns that fit in `room`: the shortest labels first, as
    many as fit (none when even the headers do not)."""
    length = [sum(len(line.cells.get(k, ("",))[0]) for k in labels) for line in lines]
    order = sorted(range(len(lines)), key=lambda i: length[i])
    sizes = dict(least)
    chosen: set[int] = set()
    for index in order:
        grown = {k: max(sizes[k], len(lines[index].cells.get(k, ("",))[0])) for k in labels}
        if sum(grown.values()) + GAP * (len(labels) - 1) > room:
            break
        sizes = grown
        chosen.add(index)
    return chosen


def _join(keys: list[str], cells: Mapping[str, tuple[str, str]], sizes: Mapping[str, int]) -> Text:
    line = Text()
    for index, key in enumerate(keys):
        text, style = cells.get(key, ("", ""))
        padding = " " * (sizes[key] - len(text))
        if index:
            line.append(" " * GAP)
        if key in RIGHT_ALIGNED:
            line.append(padding)
            line.append(text, style=style)
        else:
            line.append(text, style=style)
            line.append(padding)
    return line


def _legend(table: pl.DataFrame, width: int | None, shown: list[str]) -> list[Text]:
    """What the stars and marks mean, for what the table shows."""
    parts = []
    if "sig" in shown:
        parts.append(SIGNIFICANCE)
    if (table.get_column("term") == "lambda").any():
        parts.append("z and p of lambda test lambda = 1")
    if "at_bound" in table.columns and table.get_column("at_bound").fill_null(False).any():
        parts.append(
            "at bound: the estimate sits on a bound, its standard error and test do not hold"
        )
    if table.select(runaway_rows().any()).item():
        parts.append("runaway?: an estimate so large the model likely is not identified")
    if not parts:
        return []
    return [Text(line, style="dim") for line in _wrap("; ".join(parts), width, "  ")]


def coefficient_lines(table: pl.DataFrame, width: int | None = None) -> list[Text]:
    """The coefficient table with a legend, laid out for `width` (None: no limit)."""
    with_levels = _with_levels(table)
    with_users = table.get_column("user").null_count() < table.height
    lines = [_coefficient_line(row, with_levels, with_users) for row in table.iter_rows(named=True)]
    rows, shown = _layout(_columns(table), lines, width)
    return rows + _legend(table, width, shown)


# ---------------------------------------------------------------------------------------------
# The fit summary


def _who(level: str, variation: str) -> str:
    item = "nest" if level == "nest" else "alternative"
    if variation.startswith("user-item"):
        return f"user and {item}"
    return "user" if variation == "user" else item


def _collapsed(rows: pl.DataFrame) -> _Line:
    """One line standing for a long block of one term: counts, range, where to see it all."""
    first = rows.row(0, named=True)
    term, level = first["term"], first["level"]
    estimated = rows.filter(pl.col("identified") & ~pl.col("fixed"))
    fixed = rows.filter(pl.col("fixed")).height
    missing = rows.filter(~pl.col("identified")).height
    text = f"{plural(rows.height, 'coefficient')} by {_who(level, first['variation'])}: "
    if estimated.height:
        values = estimated.get_column("estimate")
        low, high = _number(values.min(), 4), _number(values.max(), 4)
        text += f"{estimated.height:,} estimated, from {low} to {high}"
    else:
        text += "none estimated"
    if fixed:
        text += f", {fixed:,} fixed"
    if missing and estimated.height:
        text += f", {missing:,} not estimated"
    level_option = " --level nest" if level == "nest" else ""
    text += f"; see choice coef '{term}'{level_option}"
    cells: dict[str, tuple[str, str]] = {"term": (term, "")}
    if level != "item":
        cells["level"] = (level, "")
    return _Line(cells, span=text)


def _summary_lines(table: pl.DataFrame) -> list[_Line]:
    """Single coefficients and lambdas first, then each term's block, long ones as one line."""
    with_levels = _with_levels(table)
    singles: list[_Line] = []
    lambdas: list[_Line] = []
    others: list[_Line] = []
    for rows in table.partition_by(["level", "term"], maintain_order=True):
        term = rows.get_column("term")[0]
        by_user = rows.get_column("user").null_count() < rows.height
        if term == "lambda":
            lambdas.extend(
                _coefficient_line(row, with_levels, False) for row in rows.iter_rows(named=True)
            )
        elif rows.height == 1 and not by_user:
            singles.append(_coefficient_line(rows.row(0, named=True), with_levels, False))
        elif by_user or rows.height > BLOCK_ROWS:
            others.append(_collapsed(rows))
        else:
            others.extend(
                _coefficient_line(row, with_levels, False) for row in rows.iter_rows(named=True)
            )
    return singles + lambdas + others


def _converged_text(fit: Mapping[str, Any], runaway: bool) -> str:
    if not fit["converged"]:
        return f"NOT converged ({fit['message']})"
    if runaway:
        return (
            f"converged by the optimiser's test ({fit['message']}), but some estimates look "
            "runaway: a likely non-identified model (see the warnings)"
        )
    return f"converged ({fit['message']})"


def fit_summary(
    result: FitResult, width: int | None = None, table: pl.DataFrame | None = None
) -> list[Text]:
    """Data facts, observed shares, optimiser facts, goodness of fit, coefficients, warnings.
    `table`: the result's coefficient table, when the caller has it already."""
    fit = result.fit
    table = result.coefficient_table() if table is None else table
    runaway = bool(table.select(runaway_rows().any()).item())
    facts: list[tuple[str, str]] = []
    kind = "nested logit" if result.spec.get("nests") else "conditional logit"
    kind = "mixed logit" if result.spec.get("random") else kind
    facts.append(("model", f"{kind}: {result.spec['formula']}"))
    if result.spec.get("random"):
        facts.append(("draws", _draws_text(result)))
    if result.spec.get("nests"):
        nests = "; ".join(f"{k}={','.join(map(str, v))}" for k, v in result.spec["nests"].items())
        facts.append(("nests", nests))
        facts.append(("nest formula", result.spec.get("nest_formula") or "(empty)"))
    data = (
        f"{plural(fit['n_rows'], 'row')}, {plural(fit['n_cases'], 'case')}, "
        f"{plural(fit['n_alternatives'], 'alternative')}"
    )
    if fit.get("n_users"):
        data += f", {plural(fit['n_users'], 'user')}"
    facts.append(("data", data))
    shares = fit.get("observed_shares") or {}
    if shares and len(shares) <= 30:
        facts.append(("observed shares", ", ".join(f"{k} {v:.3f}" for k, v in shares.items())))
    facts.append(
        (
            "optimiser",
            f"{fit['method']}, {plural(fit['iterations'], 'iteration')}, "
            f"{_converged_text(fit, runaway)}, {fit['seconds']:.2f} s on {fit['device']}",
        )
    )
    facts.append(
        (
            "log-likelihood",
            f"{fit['log_likelihood']:.4f} (equal shares {fit['null_log_likelihood']:.4f})",
        )
    )
    against_shares = fit.get("rho_squared_shares")
    facts.append(
        (
            "goodness of fit",
            f"rho-squared {fit['rho_squared']:.4f}, adjusted {fit['adjusted_rho_squared']:.4f}"
            + (
                f", against market shares {against_shares:.5f}"
                if against_shares is not None
                else ""
            )
            + f", AIC {fit['aic']:.2f}, BIC {fit['bic']:.2f}, "
            f"{plural(fit['n_parameters'], 'parameter')}",
        )
    )
    facts.append(_inference_row(fit))
    out: list[Text] = []
    for label, value in facts:
        pad = " " * FACT_WIDTH
        parts = _wrap(value, width, pad, f"{label:<{FACT_WIDTH}}")
        out.append(Text(parts[0][:FACT_WIDTH], style="bold") + Text(parts[0][FACT_WIDTH:]))
        out.extend(Text(part) for part in parts[1:])
    lines = _summary_lines(table)
    keys = _columns(table)
    keys = [k for k in keys if k != "user"]
    rows, shown = _layout(keys, lines, width)
    out.append(Text(""))
    out.extend(rows)
    out.extend(_legend(table, width, shown))
    if result.warnings:
        out.append(Text(""))
        out.append(Text(f"{plural(len(result.warnings), 'warning')}:", style="bold yellow"))
        for warning in result.warnings:
            out.extend(Text(part, style="yellow") for part in _wrap(warning, width, "    ", "  - "))
    return out


def loaded_model_warning(result: FitResult) -> str | None:
    """One line for a command that uses a model which did not converge or left warnings."""
    fit = result.fit
    count = len(result.warnings)
    if not fit.get("converged", True):
        return (
            f"warning: this model did not converge ({fit.get('message', 'no message')}); its "
            "estimates are not a maximum of the likelihood; refit (raise --max-iter) before "
            "using them"
        )
    if count:
        return (
            f"warning: this model was fitted with {plural(count, 'warning')} (the first: "
            f"{result.warnings[0]}); see 'warnings' in model.json"
        )
    return None


def unknown_term_message(table: pl.DataFrame, term: str | None, level: str) -> str:
    """Why a term (or a level) is not in the model, and the terms it has at each level."""
    terms = {
        name: _distinct(table.filter(pl.col("level") == name).get_column("term").to_list())
        for name in ("item", "nest")
    }
    nested = "lambda" in terms["nest"] or "lambda" in terms["item"] or bool(terms["nest"])
    if not nested:
        listing = f"its terms (all at level item): {', '.join(terms['item']) or '(none)'}"
        if term == "lambda":
            return (
                "'lambda' belongs to a nested logit, and this model is a conditional logit "
                f"(fitted without --nests); {listing}"
            )
        if level == "nest":
            return f"this model is a conditional logit: it has no nest level; {listing}"
        return f"unknown term {term!r}; {listing}"
    listing = "; ".join(
        f"at level {name}: {', '.join(found) or '(none)'}" for name, found in terms.items()
    )
    other = "nest" if level == "item" else "item"
    hint = f" (it is a term at --level {other})" if term in terms[other] else ""
    return f"unknown term {term!r} at level {level}{hint}; the model's terms are {listing}"


def _distinct(values: list[Any]) -> list[str]:
    return [str(value) for value in dict.fromkeys(values) if value is not None]


def _draws_text(result: FitResult) -> str:
    """A mixed logit's draws and the simulation's standard error of the log-likelihood."""
    fit = result.fit
    return (
        f"{fit['draws']:,} {fit['draw_kind']} draws per {fit['draws_per']} "
        f"({fit['n_draw_units']:,}), seed {fit['seed']}; simulation standard error of the "
        f"log-likelihood {fit['simulation_standard_error']:.4g} (as for independent draws)"
    )
