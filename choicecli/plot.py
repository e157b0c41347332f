"""Charts of a fitted model's coefficients and predicted shares, drawn headless to PNG.

Every chart is built on a bare `matplotlib.figure.Figure` with the Agg canvas (no pyplot state),
under matplotlib's default style and a fixed font, and saved without timestamps so the same input
gives byte-identical files. Matplotlib is imported inside the functions to keep imports cheap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from choicecli.errors import DataError, FormulaError, UsageError
from choicecli.output import chart_format, output_stream
from choicecli.report import plural

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

USER_VARIATIONS = frozenset({"user", "user-item", "user-item-full"})
LEVELS = ("item", "nest")
COEFFICIENT_COLUMNS = (
    "level",
    "term",
    "variable",
    "variation",
    "feature",
    "item",
    "user",
    "estimate",
    "ci_low",
    "ci_high",
    "fixed",
    "identified",
)
TITLE_LIMIT = 240  # characters of a title kept (cut at a term boundary), wrapped over lines
# no timestamps (nor the software version in PNG): the same input gives the same bytes
TIMELESS_METADATA = {
    "png": {"Software": None},
    "svg": {"Date": None},
    "pdf": {"CreationDate": None},
}
ROW_INCHES = 0.22  # vertical room per row in interval, forest and bar charts
MAX_HEIGHT = 40.0  # inches; beyond this rows squeeze and labels thin out
MIN_FONT = 4.0
MAX_FONT = 9.0
MIN_BINS = 5
MAX_BINS = 80
MAX_PANELS = 48  # small multiples shown for one user-item term
SCATTER_ABOVE = 40  # shares: bars up to this many alternatives, a scatter beyond
SHARE_COLUMNS = ("item", "predicted_share", "observed_share")
ESTIMATE_COLOR = "#1f77b4"
BOUND_COLOR = "#ff7f0e"
PANEL_INCHES = 0.6  # a forest panel's title and axis beyond its rows
SCALE_RATIO = 10.0  # single coefficients share a panel while their sizes stay within this
BASE_COLOR = "#d62728"
MEAN_COLOR = "#d62728"
OBSERVED_COLOR = "#7f7f7f"
TITLE_POINTS = 11.0
SUBTITLE_POINTS = 9.0
STYLE = {
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9.0,
    "axes.titlesize": SUBTITLE_POINTS,
    "figure.titlesize": TITLE_POINTS,
    "legend.fontsize": 8.0,
}


@dataclass(frozen=True)
class _Row:
    """One point of an interval or forest chart."""

    label: str
    estimate: float
    low: float | None
    high: float | None
    fixed: bool
    group: str = ""
    significant: bool = False  # p < 0.05 (the interval leaves out the null value)
    at_bound: bool = False  # on a bound: the interval does not hold
    by: str = ""  # what the term's coefficients vary by: alternative, nest, column (of a glob)


def draw_coefficients(
    table: pl.DataFrame,
    term: str | None,
    level: str,
    output: Path,
    *,
    title: str,
    dpi: int = 100,
    size: tuple[float, float] | None = None,
) -> Path:
    """Draw one term's coefficients (or all of them when `term` is None) to a PNG at `output`.

    A term varying by user gives histograms of the user estimates; a term varying by alternative
    or nest gives sorted estimates with 95% intervals; "lambda" gives the nest lambdas against 1;
    None gives a forest plot of every coefficient that does not vary by user.
    """
    missing = [column for column in COEFFICIENT_COLUMNS if column not in table.columns]
    if missing:
        raise DataError(f"the coefficients table lacks columns: {', '.join(missing)}")
    if level not in LEVELS:
        raise UsageError(f"--level must be item or nest, not {level!r}")
    title = shorten(title)
    if term is None:
        panels = _forest_panels(_forest_rows(table))
        if not panels:
            raise FormulaError(
                "the model has no estimated coefficients that do not vary by user; "
                "pass a term to plot its user estimates"
            )
        rows = [row for panel in panels for row in panel.rows]
        default = _rows_size(rows, extra_rows=len(panels) * PANEL_INCHES / ROW_INCHES)
        return _save(output, size or default, dpi, lambda fig: _draw_forest(fig, panels, title))
    if term == "lambda":
        selected = table.filter(pl.col("term") == "lambda")
        level = "nest"
    else:
        selected = table.filter((pl.col("term") == term) & (pl.col("level") == level))
    if selected.height == 0:
        raise FormulaError(_unknown_term_message(table, term, level))
    if _varies_by_user(selected):
        if "parameter" in selected.columns:  # a mixed logit: its users' conditional means
            selected = selected.filter(pl.col("user").is_not_null())
        return _draw_user_term(selected, term, level, output, title, dpi, size)
    rows, notes = _interval_rows(selected, term, level)
    reference = 1.0 if term == "lambda" else 0.0
    default = _rows_size(rows)

    def build(fig: Figure) -> None:
        _draw_intervals(fig, rows, notes, term, level, reference, title)

    return _save(output, size or default, dpi, build)


def draw_shares(
    shares: pl.DataFrame,
    output: Path,
    *,
    title: str,
    dpi: int = 100,
    size: tuple[float, float] | None = None,
) -> Path:
    """Draw predicted (and observed, when present) market shares per alternative to a PNG.

    Up to 40 alternatives get horizontal grouped bars sorted by predicted share; more
    alternatives with observed shares get a predicted-vs-observed scatter with the 45-degree line.
    A table with segment columns (`choice predict --shares --by COL`) gets one panel per segment.
    """
    missing = [column for column in ("item", "predicted_share") if column not in shares.columns]
    if missing:
        raise DataError(f"the shares table lacks columns: {', '.join(missing)}")
    if shares.height == 0:
        raise DataError("the shares table has no rows")
    segments = [column for column in shares.columns if column not in SHARE_COLUMNS]
    if segments:
        return _draw_segments(shares, segments, output, shorten(title), dpi, size)
    labels = [_text(value) for value in shares.get_column("item").to_list()]
    predicted = [_number(value) for value in shares.get_column("predicted_share").to_list()]
    observed: list[float | None] | None = None
    if "observed_share" in shares.columns:
        values = [_number(value) for value in shares.get_column("observed_share").to_list()]
        if any(value is not None for value in values):
            observed = values
    title = shorten(title)
    if observed is not None and len(labels) > SCATTER_ABOVE:
        known = observed

        def scatter(fig: Figure) -> None:
            _draw_share_scatter(fig, labels, predicted, known, title)

        return _save(output, size or (7.0, 7.0), dpi, scatter)

    def bars(fig: Figure) -> None:
        _draw_share_bars(fig, labels, predicted, observed, title)

    default = _sized(len(labels) * (2 if observed is not None else 1) * 0.6, labels)
    return _save(output, size or default, dpi, bars)


def shorten(text: str, limit: int = TITLE_LIMIT) -> str:
    """Collapse whitespace and cut `text` to `limit` characters with an ellipsis, at the last
    " + " between terms when there is one (a formula is never cut inside a term)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    head = text[: limit - 4]
    cut = head.rfind(" + ")
    return (head[:cut] + " + \u2026") if cut > 0 else head.rstrip() + "\u2026"


# ---------------------------------------------------------------------------------------------
# Selecting and labelling rows


def _unknown_term_message(table: pl.DataFrame, term: str, level: str) -> str:
    """One line naming the term, the level and the terms the model has at each level."""
    from choicecli.report import unknown_term_message

    return unknown_term_message(table, term, level)


def _varies_by_user(rows: pl.DataFrame) -> bool:
    variations = set(rows.get_column("variation").drop_nulls().to_list())
    return bool(variations & USER_VARIATIONS) or rows.get_column("user").null_count() < rows.height


def _estimated(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows with an estimate that is not a fixed base value."""
    return rows.filter(pl.col("estimate").is_not_null() & ~pl.col("fixed").fill_null(False))


def _not_estimated(term: str, level: str) -> FormulaError:
    return FormulaError(
        f"term {term!r} at level {level} was not estimated (every estimate is null: "
        "not identified from the data); nothing to plot"
    )


def _interval_rows(rows: pl.DataFrame, term: str, level: str) -> tuple[list[_Row], list[str]]:
    """Rows of an interval chart sorted by estimate, and notes on rows left out."""
    if _estimated(rows).height == 0:
        raise _not_estimated(term, level)
    several = len(_unique(rows.get_column("feature").to_list())) > 1
    drawn: list[_Row] = []
    skipped: list[str] = []
    for record in rows.iter_rows(named=True):
        label = _item_label(record, several)
        fixed = bool(record["fixed"])
        estimate = _number(record["estimate"])
        if estimate is None:
            if fixed:
                estimate = 0.0
            else:
                skipped.append(label)
                continue
        low, high = _number(record["ci_low"]), _number(record["ci_high"])
        drawn.append(_Row(label, estimate, low, high, fixed, **_flags(record)))
    drawn.sort(key=lambda row: (row.estimate, row.label))
    notes = []
    if skipped:
        shown = ", ".join(skipped[:5]) + (", \u2026" if len(skipped) > 5 else "")
        notes.append(f"{len(skipped):,} not identified: {shown}")
    return drawn, notes


def _flags(record: dict[str, Any]) -> dict[str, bool]:
    """Significance at 5% (from p, or the interval against 0, or 1 for lambda) and at_bound."""
    p_value = _number(record.get("p_value"))
    if p_value is None:
        low, high = _number(record.get("ci_low")), _number(record.get("ci_high"))
        null = 1.0 if record.get("term") == "lambda" else 0.0
        significant = low is not None and high is not None and not low <= null <= high
    else:
        significant = p_value < 0.05
    return {
        "significant": bool(significant and not record.get("fixed")),
        "at_bound": bool(record.get("at_bound")),
    }


@dataclass(frozen=True)
class _Panel:
    """One axis of a forest plot: a term's coefficients, or single coefficients of one scale."""

    title: str
    rows: list[_Row]
    reference: float = 0.0


def _forest_rows(table: pl.DataFrame) -> list[_Row]:
    """Every estimated coefficient without a user, grouped by term in table order; a row's
    label names its alternative or nest, or the term when the term has a single coefficient."""
    rows = table.filter(pl.col("user").is_null())
    rows = rows.filter(
        (pl.col("estimate").is_not_null() & pl.col("identified").fill_null(True))
        | pl.col("fixed").fill_null(False)
    )
    records: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in rows.iter_rows(named=True):
        key = (_text(record["level"]), _text(record["term"]))
        records.setdefault(key, []).append(record)
    drawn: list[_Row] = []
    for (level, term), group in records.items():
        several = len({_text(record["feature"]) for record in group}) > 1
        name = f"{term} (nest level)" if level == "nest" and term != "lambda" else term
        for record in group:
            detail = _item_label(record, several, empty="")
            estimate = _number(record["estimate"])
            drawn.append(
                _Row(
                    label=detail if len(group) > 1 or detail else name,
                    estimate=0.0 if estimate is None else estimate,
                    low=_number(record["ci_low"]),
                    high=_number(record["ci_high"]),
                    fixed=bool(record["fixed"]),
                    group=name,
                    by=_by(record, several),
                    **_flags(record),
                )
            )
    return drawn


def _forest_panels(rows: list[_Row]) -> list[_Panel]:
    """A panel per term with several coefficients; single coefficients share panels while
    their sizes stay within SCALE_RATIO of each other, so no estimate is squashed onto zero.
    A term with nothing estimated (its base alone) gets no panel."""
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    panels: list[_Panel] = []
    singles: list[_Row] = []

    def close_singles() -> None:
        if singles:
            panels.append(_Panel("", list(singles)))
            singles.clear()

    for name, group in groups.items():
        if all(row.fixed for row in group):  # only a base: nothing was estimated to draw
            continue
        if len(group) == 1 and name == group[0].label and name != "lambda":
            sizes = [_size(row) for row in [*singles, group[0]]]
            if singles and max(sizes) > SCALE_RATIO * max(min(sizes), 1e-300):
                close_singles()
            singles.append(group[0])
            continue
        close_singles()
        panels.append(_Panel(_panel_title(name, group), group, 1.0 if name == "lambda" else 0.0))
    close_singles()
    return panels


def _size(row: _Row) -> float:
    return max(abs(value) for value in (row.estimate, row.low, row.high) if value is not None)


def _by(record: dict[str, Any], several: bool) -> str:
    """What one coefficient of a term stands for: its alternative or nest, and glob column."""
    where = "" if record["item"] is None else "nest" if record["level"] == "nest" else "alternative"
    if several:
        return f"column and {where}" if where else "column"
    return where


def _panel_title(name: str, rows: list[_Row]) -> str:
    if name == "lambda":
        if len(rows) == 1 and rows[0].label == "lambda":
            return "lambda, shared by all nests (1 = no nesting)"
        return "lambda, one per nest (1 = no nesting)"
    who = rows[0].by or ("nest" if name.endswith("(nest level)") else "alternative")
    title = f"{name}, one per {who}"
    base = _unique([row.label.rpartition(": ")[2] for row in rows if row.fixed])
    if base:
        title += f" ({', '.join(base)}: base, fixed at 0)"
    return title


def _item_label(record: dict[str, Any], with_feature: bool, empty: str = "(all)") -> str:
    item = record["item"]
    label = empty if item is None else str(item)
    if with_feature and record["feature"] is not None:
        label = f"{record['feature']}: {label}" if label else str(record["feature"])
    return label


def _unique(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(value for value in values if value is not None))


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return None if math.isnan(number) else number


# ---------------------------------------------------------------------------------------------
# Sizes and saving


def _rows_size(rows: list[_Row], extra_rows: int = 0) -> tuple[float, float]:
    return _sized(len(rows) + extra_rows * 0.3, [row.label for row in rows])


def _sized(count: float, labels: list[str]) -> tuple[float, float]:
    """Default (width, height): height grows with the rows up to a cap, width with the labels."""
    longest = max((len(label) for label in labels), default=0)
    width = min(14.0, max(7.0, 4.5 + 0.07 * longest))
    floor = 2.6 if count <= 2 else 3.5  # one or two coefficients: a compact chart
    height = min(MAX_HEIGHT, max(floor, 2.2 + ROW_INCHES * count))
    return (width, round(height, 2))


def _row_font(fig: Figure, count: int) -> tuple[float, int]:
    """Label font size for `count` rows in this figure, and the step for thinning labels."""
    plot_points = max(fig.get_figheight() - 2.0, 0.5) * 72.0
    spacing = plot_points / max(count, 1)
    font = min(MAX_FONT, max(MIN_FONT, 0.72 * spacing))
    step = max(1, math.ceil(font / (0.9 * spacing)))
    return font, step


def _save(
    output: Path, size: tuple[float, float], dpi: int, build: Callable[[Figure], None]
) -> Path:
    """Build a figure under a fixed style and write it as a timestamp-free PNG, SVG or PDF (by
    the suffix of `output`; see `choicecli.output` for where and how it is written)."""
    import matplotlib
    import matplotlib.style
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = chart_format(output)
    width, height = float(size[0]), float(size[1])
    if round(width * dpi) < 1 or round(height * dpi) < 1:
        raise UsageError(f"the figure size and dpi must be positive, not {size} at {dpi} dpi")
    output = Path(output)
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        # Agg truncates inches * dpi to whole pixels; aim a hair above the rounded count so the
        # PNG is exactly round(size * dpi) pixels even when the product is 434.99999...
        figsize = ((round(width * dpi) + 1e-3) / dpi, (round(height * dpi) + 1e-3) / dpi)
        fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
        FigureCanvasAgg(fig)
        build(fig)
        with matplotlib.rc_context({"svg.hashsalt": "choice"}), output_stream(output) as handle:
            fig.savefig(handle, format=fmt, dpi=dpi, metadata=TIMELESS_METADATA[fmt])
    return output


# ---------------------------------------------------------------------------------------------
# Charts


def _draw_intervals(
    fig: Figure,
    rows: list[_Row],
    notes: list[str],
    term: str,
    level: str,
    reference: float,
    title: str,
) -> None:
    """Estimates with 95% intervals, one row per alternative or nest, largest at the top."""
    ax = fig.add_subplot()
    _plot_rows(ax, fig, rows, reference=reference)
    lambdas = term == "lambda"
    ax.axvline(
        reference,
        color="black",
        linewidth=0.9,
        linestyle="--",
        label="lambda = 1 (no nesting)" if lambdas else "zero",
    )
    who = "nest" if level == "nest" else "alternative"
    where = " at nest level" if level == "nest" else ""
    if lambdas:
        ax.set_xlabel("lambda (how alike a nest's alternatives are; 1 = no nesting)")
        ax.set_ylabel("nest")
        subtitle = "lambda by nest, sorted by estimate, with 95% confidence intervals"
    else:
        ax.set_xlabel(f"estimate of {term}{where}, with 95% confidence interval")
        ax.set_ylabel(who)
        subtitle = f"{term}{where}, one per {who}, sorted by estimate"
    if all(row.label == "(all)" for row in rows):
        ax.set_ylabel("")
        ax.set_yticks([])
        subtitle = f"{term}{where}"
    _titles(fig, ax, title, "; ".join([subtitle, *notes]), [row.label for row in rows])
    _legend(fig, rows, reference)


def _draw_forest(fig: Figure, panels: list[_Panel], title: str) -> None:
    """One axis per panel (a term, or single coefficients of one scale), each with its own
    scale, first term at the top."""
    heights = [len(panel.rows) + PANEL_INCHES / ROW_INCHES for panel in panels]
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    count = sum(len(panel.rows) for panel in panels)
    for ax, panel in zip(axes, panels, strict=True):
        positions = list(range(len(panel.rows) - 1, -1, -1))
        _plot_rows(ax, fig, panel.rows, positions=positions, reference=panel.reference, total=count)
        ax.axvline(panel.reference, color="black", linewidth=0.9, linestyle="--")
        if panel.title:
            text = _wrap(fig, panel.title, SUBTITLE_POINTS - 0.5, share=0.7)
            ax.set_title(text, loc="left", fontsize=SUBTITLE_POINTS - 0.5)
    terms = len({row.group for panel in panels for row in panel.rows})
    lambdas = any(panel.reference == 1.0 for panel in panels)
    line = "dashed line: 0; 1 for lambda" if lambdas else "dashed line: 0"
    axes[-1].set_xlabel(f"estimate with 95% confidence interval ({line})")
    _titles(fig, None, title)
    caption = f"{plural(count, 'coefficient')} of {plural(terms, 'term')}"
    _legend(fig, [row for panel in panels for row in panel.rows], None if lambdas else 0.0,
            caption + "; terms that vary by user are left out (plot them by name)")  # fmt: skip


def _legend(fig: Figure, rows: list[_Row], reference: float | None, caption: str = "") -> None:
    """What the marks present mean: filled = significant at 5%, hollow = not, base, bound."""
    from matplotlib.lines import Line2D

    null = "1" if reference == 1.0 else "0" if reference == 0.0 else "0 (1 for lambda)"
    free = [row for row in rows if not row.fixed and not row.at_bound]
    handles = []
    if any(row.significant for row in free):
        handles.append(Line2D([], [], color=ESTIMATE_COLOR, marker="o", linestyle="none",
                              label=f"differs from {null} at p < 0.05"))  # fmt: skip
    if any(not row.significant for row in free):
        handles.append(Line2D([], [], color=ESTIMATE_COLOR, marker="o", linestyle="none",
                              markerfacecolor="white", label="not significant"))  # fmt: skip
    if any(_has_interval(row) and not row.at_bound for row in rows):
        handles.append(Line2D([], [], color=ESTIMATE_COLOR, label="95% confidence interval"))
    if any(row.fixed for row in rows):
        handles.append(Line2D([], [], marker="D", markerfacecolor="white", linestyle="none",
                              markeredgecolor=BASE_COLOR, label="base, fixed at 0"))  # fmt: skip
    if any(row.at_bound for row in rows):
        handles.append(Line2D([], [], marker="s", color=BOUND_COLOR, linestyle=":",
                              label="on a bound: interval does not hold"))  # fmt: skip
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(3, len(handles)),
        title=_wrap(fig, caption, SUBTITLE_POINTS - 1) if caption else None,
        title_fontsize=SUBTITLE_POINTS - 1,
        fontsize=7.5,
    )


def _plot_rows(
    ax: Axes,
    fig: Figure,
    rows: list[_Row],
    positions: list[int] | None = None,
    reference: float = 0.0,
    total: int | None = None,
) -> None:
    """Points and interval lines for `rows`: filled when significant, hollow when not, fixed
    base rows as hollow red diamonds, estimates on a bound as orange squares."""
    if positions is None:
        positions = list(range(len(rows)))
    placed = list(zip(positions, rows, strict=True))
    bound = [(y, row) for y, row in placed if _has_interval(row) and row.at_bound]
    if bound:
        ax.hlines([y for y, _ in bound], [row.low for _, row in bound],
                  [row.high for _, row in bound], colors=BOUND_COLOR, linewidth=1.2,
                  linestyles=":")  # fmt: skip
    lines = [(y, row) for y, row in placed if _has_interval(row) and not row.at_bound]
    if lines:
        ax.hlines(
            [y for y, _ in lines],
            [row.low for _, row in lines],
            [row.high for _, row in lines],
            colors=ESTIMATE_COLOR,
            linewidth=1.2,
            alpha=0.7,
        )
    marker = 4.5 if (total or len(rows)) <= 60 else 2.5
    free = [(y, row) for y, row in placed if not row.fixed and not row.at_bound]
    for significant in (True, False):
        chosen = [(y, row) for y, row in free if row.significant == significant]
        if chosen:
            ax.plot(
                [row.estimate for _, row in chosen],
                [y for y, _ in chosen],
                "o",
                color=ESTIMATE_COLOR,
                markerfacecolor=ESTIMATE_COLOR if significant else "white",
                markersize=marker,
                linestyle="none",
            )
    bound = [(y, row) for y, row in placed if row.at_bound and not row.fixed]
    if bound:
        ax.plot([row.estimate for _, row in bound], [y for y, _ in bound], "s",
                color=BOUND_COLOR, markersize=marker + 1, linestyle="none")  # fmt: skip
    fixed = [(y, row) for y, row in placed if row.fixed]
    if fixed:
        ax.plot(
            [row.estimate for _, row in fixed],
            [y for y, _ in fixed],
            "D",
            markerfacecolor="white",
            markeredgecolor=BASE_COLOR,
            markeredgewidth=1.5,
            markersize=marker + 2,
            linestyle="none",
        )
    font, step = _row_font(fig, total or len(rows))
    ticks = list(range(0, len(rows), step))
    ax.set_yticks([positions[index] for index in ticks])
    ax.set_yticklabels([rows[index].label for index in ticks], fontsize=font)
    for index, tick in zip(ticks, ax.get_yticklabels(), strict=True):
        if rows[index].fixed:
            tick.set_color(BASE_COLOR)
    ax.set_ylim(min(positions, default=0) - 0.6, max(positions, default=0) + 0.6)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def _titles(
    fig: Figure, ax: Axes | None, title: str, subtitle: str = "", labels: list[str] | None = None
) -> None:
    """The figure title (none when empty) and an axes subtitle, wrapped to fit beside the y
    tick `labels`."""
    if title:
        fig.suptitle(_wrap(fig, title, TITLE_POINTS))
    if ax is not None and subtitle:
        # The subtitle starts at the axes' left edge, right of the tick labels.
        longest = max((len(label) for label in labels or []), default=8)
        left = 0.7 + longest * MAX_FONT * 0.55 / 72.0
        share = min(0.9, max(0.3, 1.0 - left / fig.get_figwidth()))
        ax.set_title(_wrap(fig, subtitle, SUBTITLE_POINTS, share=share), loc="left")


def _wrap(fig: Figure, text: str, points: float, share: float = 0.95) -> str:
    """Break `text` into lines that fit `share` of the figure's width at `points` size."""
    import textwrap

    columns = max(20, int(share * fig.get_figwidth() * 72.0 / (0.55 * points)))
    return "\n".join(textwrap.wrap(text, columns, break_on_hyphens=False)) or text


def _has_interval(row: _Row) -> bool:
    return row.low is not None and row.high is not None and not row.fixed


def _draw_user_term(
    rows: pl.DataFrame,
    term: str,
    level: str,
    output: Path,
    title: str,
    dpi: int,
    size: tuple[float, float] | None,
) -> Path:
    """Histograms of a user-varying term: one, or one per alternative (and feature)."""
    estimated = _estimated(rows)
    if estimated.height == 0:
        raise _not_estimated(term, level)
    several = len(_unique(rows.get_column("feature").to_list())) > 1
    panels: dict[str, list[float]] = {}
    missing: dict[str, int] = {}
    for record in rows.iter_rows(named=True):
        if record["fixed"]:
            continue
        label = _item_label(record, several, empty="")
        values = panels.setdefault(label, [])
        value = _number(record["estimate"])
        if value is None:
            missing[label] = missing.get(label, 0) + 1
        else:
            values.append(value)
    panels = {label: values for label, values in panels.items() if values}
    labels = list(panels)
    hidden = max(0, len(labels) - MAX_PANELS)
    labels = labels[:MAX_PANELS]
    pooled = [value for label in labels for value in panels[label]]
    edges = _bin_edges(pooled, max(len(panels[label]) for label in labels))
    if len(labels) == 1:
        label = labels[0]

        def single(fig: Figure) -> None:
            _draw_histogram(fig, term, level, label, panels[label], missing.get(label, 0), edges)
            _titles(fig, None, title)

        return _save(output, size or (8.0, 5.0), dpi, single)
    columns = min(6, math.ceil(math.sqrt(len(labels))))
    lines = math.ceil(len(labels) / columns)
    default = (
        max(7.0, round(2.6 * columns + 0.8, 2)),
        round(min(MAX_HEIGHT, 2.1 * lines + 1.4), 2),
    )

    def grid(fig: Figure) -> None:
        axes = fig.subplots(lines, columns, sharex=True, squeeze=False)
        for index, ax in enumerate(axes.flat):
            if index >= len(labels):
                ax.set_visible(False)
                continue
            label = labels[index]
            values = panels[label]
            ax.hist(values, bins=edges, color=ESTIMATE_COLOR, alpha=0.8)
            mean = sum(values) / len(values)
            ax.axvline(mean, color=MEAN_COLOR, linewidth=1.2, label="mean")
            ax.axvline(0.0, color="black", linewidth=0.9, linestyle="--", label="zero")
            caption = f"{label}\n{len(values):,} users, mean {mean:.3g}"
            if missing.get(label):
                caption += f", {missing[label]:,} not estimated"
            ax.set_title(caption, fontsize=7.5)
            ax.tick_params(labelsize=7, labelbottom=True)
        axes.flat[0].legend(loc="upper right", fontsize=6.5)
        note = f" (first {MAX_PANELS} of {MAX_PANELS + hidden} panels)" if hidden else ""
        at_nest = " at nest level" if level == "nest" else ""
        who = "nest" if level == "nest" else "alternative"
        fig.supxlabel(f"estimate of {term}{at_nest} for each user, one panel per {who}{note}")
        fig.supylabel("users")
        _titles(fig, None, title)

    return _save(output, size or default, dpi, grid)


def _draw_histogram(
    fig: Figure,
    term: str,
    level: str,
    label: str,
    values: list[float],
    missing: int,
    edges: list[float],
) -> None:
    ax = fig.add_subplot()
    ax.hist(values, bins=edges, color=ESTIMATE_COLOR, alpha=0.8, label="users")
    mean = sum(values) / len(values)
    ax.axvline(mean, color=MEAN_COLOR, linewidth=1.5, label=f"mean {mean:.3g}")
    ax.axvline(0.0, color="black", linewidth=1.0, linestyle="--", label="zero")
    where = f" {label}" if label else ""
    at_nest = " at nest level" if level == "nest" else ""
    ax.set_xlabel(f"estimate of {term}{where}{at_nest} for each user")
    ax.set_ylabel("users")
    caption = f"{term}{where}: {len(values):,} users"
    if missing:
        caption += f" ({missing:,} not estimated, left out)"
    ax.set_title(_wrap(fig, caption, SUBTITLE_POINTS, share=0.8), loc="left")
    ax.legend(loc="upper right")


def _bin_edges(values: list[float], largest_panel: int) -> list[float]:
    """Shared histogram edges: Freedman-Diaconis width over the pooled values, capped."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    low, high = float(data.min()), float(data.max())
    if high - low <= 1e-12 * max(1.0, abs(low)):
        return [float(edge) for edge in np.linspace(low - 0.5, high + 0.5, MIN_BINS * 2 + 1)]
    q75, q25 = np.percentile(data, [75, 25])
    width = 2.0 * float(q75 - q25) / max(largest_panel, 1) ** (1.0 / 3.0)
    count = math.ceil((high - low) / width) if width > 0 else MIN_BINS
    count = min(MAX_BINS, max(MIN_BINS, count))
    return [float(edge) for edge in np.linspace(low, high, count + 1)]


def _draw_share_bars(
    fig: Figure,
    labels: list[str],
    predicted: list[float | None],
    observed: list[float | None] | None,
    title: str,
) -> None:
    """Horizontal grouped bars, largest predicted share at the top."""
    order = sorted(range(len(labels)), key=lambda i: (predicted[i] or 0.0, labels[i]))
    ax = fig.add_subplot()
    positions = list(range(len(order)))
    nan = float("nan")
    guess = [nan if predicted[i] is None else predicted[i] for i in order]
    if observed is None:
        ax.barh(positions, guess, height=0.7, color=ESTIMATE_COLOR, label="predicted")
    else:
        seen = [nan if observed[i] is None else observed[i] for i in order]
        ax.barh([y + 0.2 for y in positions], guess, 0.4, color=ESTIMATE_COLOR, label="predicted")
        ax.barh([y - 0.2 for y in positions], seen, 0.4, color=OBSERVED_COLOR, label="observed")
    font, step = _row_font(fig, len(order))
    ticks = list(range(0, len(order), step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[order[i]] for i in ticks], fontsize=font)
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel("share")
    ax.set_ylabel("alternative")
    ax.set_xlim(left=0.0)
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    subtitle = f"{len(labels):,} alternatives, sorted by predicted share"
    if observed is not None:
        subtitle += _error_note(predicted, observed)
    _titles(fig, ax, title, subtitle, labels)
    ax.legend(loc="lower right")


def _draw_share_scatter(
    fig: Figure,
    labels: list[str],
    predicted: list[float | None],
    observed: list[float | None],
    title: str,
) -> None:
    """Predicted against observed share with the 45-degree line; largest misses labelled."""
    pairs = [
        (label, seen, guess)
        for label, guess, seen in zip(labels, predicted, observed, strict=True)
        if guess is not None and seen is not None
    ]
    ax = fig.add_subplot()
    top = max([max(seen, guess) for _, seen, guess in pairs], default=1.0) * 1.05 or 1.0
    ax.plot([0.0, top], [0.0, top], color="black", linewidth=0.9, linestyle="--", label="45° line")
    ax.plot(
        [seen for _, seen, _ in pairs],
        [guess for _, _, guess in pairs],
        "o",
        color=ESTIMATE_COLOR,
        markersize=3.5,
        alpha=0.7,
        label="alternative",
    )
    misses = sorted(pairs, key=lambda pair: (-abs(pair[2] - pair[1]), pair[0]))[:8]
    for label, seen, guess in misses:
        ax.annotate(label, (seen, guess), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0.0, top)
    ax.set_ylim(0.0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("observed share")
    ax.set_ylabel("predicted share")
    ax.grid(color="#eeeeee", linewidth=0.6)
    subtitle = f"{len(pairs):,} alternatives" + _error_note(predicted, observed)
    _titles(fig, ax, title, subtitle)
    ax.legend(loc="upper left")


def _error_note(predicted: list[float | None], observed: list[float | None]) -> str:
    gaps = [
        abs(guess - seen)
        for guess, seen in zip(predicted, observed, strict=True)
        if guess is not None and seen is not None
    ]
    return f"; mean absolute error {sum(gaps) / len(gaps):.3g}" if gaps else ""


def _draw_segments(
    shares: pl.DataFrame,
    segments: list[str],
    output: Path,
    title: str,
    dpi: int,
    size: tuple[float, float] | None,
) -> Path:
    """One panel per segment value (labelled `column = value`), the same alternatives in the
    same order and the same share axis in every panel."""
    items, panels, segment_count = _segment_panels(shares, segments)
    with_observed = any(observed is not None for _, _, observed in panels)
    hidden = segment_count - len(panels)
    columns = min(3, len(panels)) if len(panels) <= 9 else min(6, math.ceil(len(panels) ** 0.5))
    lines = math.ceil(len(panels) / columns)
    panel_height = 0.9 + ROW_INCHES * len(items) * (1.6 if with_observed else 1.0)
    default = (
        max(7.0, round(3.0 * columns + 1.2, 2)),
        round(min(MAX_HEIGHT, panel_height * lines + 1.8), 2),
    )
    caption = (
        f"{plural(len(items), 'alternative')} in {plural(segment_count, 'segment')} of "
        f"{', '.join(segments)}" + (f" (first {MAX_PANELS} shown)" if hidden else "")
    )

    def grid(fig: Figure) -> None:
        axes = fig.subplots(lines, columns, sharex=True, sharey=True, squeeze=False)
        font, step = _row_font(fig, len(items) * lines)
        for index, ax in enumerate(axes.flat):
            if index >= len(panels):
                ax.set_visible(False)
                continue
            name, predicted, observed = panels[index]
            nan = float("nan")
            guess = [nan if value is None else value for value in predicted]
            positions = list(range(len(items)))
            if observed is None:
                ax.barh(positions, guess, 0.7, color=ESTIMATE_COLOR, label="predicted")
            else:
                seen = [nan if value is None else value for value in observed]
                ax.barh([y + 0.2 for y in positions], guess, 0.4, color=ESTIMATE_COLOR,
                        label="predicted")  # fmt: skip
                ax.barh([y - 0.2 for y in positions], seen, 0.4, color=OBSERVED_COLOR,
                        label="observed")  # fmt: skip
                name += _error_note(predicted, observed).replace(
                    "; mean absolute error", "\nmean absolute error"
                )
            ticks = list(range(0, len(items), step))
            ax.set_yticks(ticks)
            ax.set_yticklabels([items[i] for i in ticks], fontsize=font)
            ax.set_ylim(-0.6, len(items) - 0.4)
            ax.set_xlim(left=0.0)
            ax.grid(axis="x", color="#dddddd", linewidth=0.6)
            ax.set_axisbelow(True)
            ax.set_title(name, loc="left", fontsize=SUBTITLE_POINTS - 0.5)
            ax.tick_params(labelbottom=True)
            if index + columns >= len(panels):  # the lowest panel of its column
                ax.set_xlabel("share of cases")
        _titles(fig, None, title)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, title=caption,
                   title_fontsize=SUBTITLE_POINTS - 1, fontsize=7.5)  # fmt: skip

    return _save(output, size or default, dpi, grid)


def _segment_panels(
    shares: pl.DataFrame, segments: list[str]
) -> tuple[list[str], list[tuple[str, list[float | None], list[float | None] | None]], int]:
    """The alternatives (smallest mean predicted share first: drawn bottom to top); for the
    first MAX_PANELS segment values in sorted order, a label (`column = value`), predicted and
    observed shares; and the number of segments."""
    keys = shares.select(segments).unique(maintain_order=True).sort(segments, nulls_last=True)
    names = [
        ", ".join(f"{column} = {_text(value)}" for column, value in zip(segments, key, strict=True))
        for key in keys.iter_rows()
    ]
    overall = (
        shares.group_by("item")
        .agg(pl.col("predicted_share").mean())
        .sort(["predicted_share", "item"])
    )
    items = [_text(value) for value in overall.get_column("item").to_list()]  # bottom to top
    with_observed = (
        "observed_share" in shares.columns
        and shares.get_column("observed_share").is_not_null().any()
    )
    panels: list[tuple[str, list[float | None], list[float | None] | None]] = []
    for name, key in list(zip(names, keys.iter_rows(), strict=True))[:MAX_PANELS]:
        part = shares.filter(
            pl.all_horizontal([pl.col(c).eq_missing(v) for c, v in zip(segments, key, strict=True)])
        )
        values = {_text(r["item"]): r for r in part.iter_rows(named=True)}
        predicted = [_number(values[i]["predicted_share"]) if i in values else None for i in items]
        observed = (
            [_number(values[i]["observed_share"]) if i in values else None for i in items]
            if with_observed
            else None
        )
        panels.append((name, predicted, observed))
    return items, panels, len(names)
