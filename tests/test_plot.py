"""Charts: valid PNGs of the requested pixel size, not blank, byte-identical across runs."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from choicecli.errors import FormulaError
from choicecli.plot import draw_coefficients, draw_shares, shorten
from choicecli.results import COEFFICIENT_COLUMNS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCHEMA = COEFFICIENT_COLUMNS  # the columns of coefficients.parquet
ITEMS = ["bus", "car", "train", "walk"]


def row(
    term: str,
    estimate: float | None,
    *,
    level: str = "item",
    variation: str = "constant",
    variable: str | None = None,
    feature: str | None = None,
    item: str | None = None,
    user: str | None = None,
    fixed: bool = False,
) -> dict[str, Any]:
    """One coefficient row; the interval is estimate +- 1.96 * 0.1 when estimated."""
    name = variable or term.split("[")[0]
    known = estimate is not None and not fixed
    return {
        "level": level,
        "term": term,
        "variable": name,
        "variation": variation,
        "feature": feature if feature is not None else (None if name == "lambda" else name),
        "item": item,
        "user": user,
        "estimate": estimate,
        "std_error": 0.1 if known else None,
        "z_value": estimate / 0.1 if known else None,
        "p_value": 0.05 if known else None,
        "ci_low": estimate - 0.196 if known else None,
        "ci_high": estimate + 0.196 if known else None,
        "fixed": fixed,
        "identified": estimate is not None or fixed,
    }


def table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=SCHEMA)


def item_rows(term: str = "income[item]", count: int = 4, level: str = "item") -> list[dict]:
    """An item-varying term with the first alternative as the fixed base."""
    labels = ITEMS if count <= len(ITEMS) else [f"alt{i:04d}" for i in range(count)]
    rows = [row(term, 0.0, level=level, variation="item", item=labels[0], fixed=True)]
    for index, label in enumerate(labels[1:count], start=1):
        value = ((index * 37) % 11 - 5) / 4.0
        rows.append(row(term, value, level=level, variation="item", item=label))
    return rows


def user_rows(term: str, users: int, items: list[str | None]) -> list[dict]:
    """A user-varying term: deterministic pseudo-normal estimates per user (and alternative)."""
    variation = "user" if items == [None] else "user-item"
    rows = []
    for position, label in enumerate(items):
        for index in range(users):
            value = ((index * 7919 + position * 104729) % 1000) / 250.0 - 2.0 + position
            rows.append(row(term, value, variation=variation, item=label, user=f"u{index}"))
    return rows


def model() -> pl.DataFrame:
    """A small nested model: constant, item, user and user-item terms plus lambdas."""
    rows = [
        row("intercept[item]", 0.0, variation="item", variable="intercept", item="bus", fixed=True),
        row("intercept[item]", 0.4, variation="item", variable="intercept", item="car"),
        row("intercept[item]", -0.3, variation="item", variable="intercept", item="train"),
        row("price[constant]", -1.2),
        *item_rows(),
        row("user_obs_*[item]", 0.3, variation="item", feature="user_obs_1", item="car"),
        row("user_obs_*[item]", -0.2, variation="item", feature="user_obs_2", item="car"),
        row("income[item]", 0.5, level="nest", variation="item", item="transit"),
        row("lambda", 0.7, level="nest", variation="item", item="transit"),
        row("lambda", 0.9, level="nest", variation="item", item="private"),
        *user_rows("intercept[user]", 40, [None]),
        *user_rows("price[user-item]", 30, ["car", "train", "walk"]),
    ]
    return table(rows)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def check_png(path: Path, size: tuple[float, float], dpi: int) -> None:
    import matplotlib.image

    assert png_size(path) == (round(size[0] * dpi), round(size[1] * dpi))
    pixels = matplotlib.image.imread(path)
    assert pixels[..., :3].std() > 0.02, "the chart looks blank"


def draw_twice(tmp_path: Path, draw: Any, size: tuple[float, float], dpi: int = 50) -> Path:
    first = draw(tmp_path / "a" / "chart.png", size, dpi)
    second = draw(tmp_path / "b" / "chart.png", size, dpi)
    assert first == tmp_path / "a" / "chart.png"
    check_png(first, size, dpi)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in first.parent.iterdir()) == ["chart.png"]  # no temporaries
    return first


@pytest.mark.parametrize(
    ("term", "level"),
    [
        ("intercept[user]", "item"),  # one histogram
        ("price[user-item]", "item"),  # small multiples
        ("income[item]", "item"),  # intervals with a fixed base
        ("income[item]", "nest"),  # nest level
        ("user_obs_*[item]", "item"),  # glob term, several features
        ("price[constant]", "item"),  # a single constant
        ("lambda", "item"),  # level ignored for lambda
        (None, "item"),  # forest plot
    ],
)
def test_coefficient_charts(tmp_path: Path, term: str | None, level: str) -> None:
    coefficients = model()

    def draw(output: Path, size: tuple[float, float], dpi: int) -> Path:
        return draw_coefficients(
            coefficients, term, level, output, title="choice ~ price + income", dpi=dpi, size=size
        )

    draw_twice(tmp_path, draw, (6.0, 4.0))


def test_three_hundred_alternatives(tmp_path: Path) -> None:
    many = table(item_rows(count=300))
    large = draw_coefficients(many, "income[item]", "item", tmp_path / "l.png", title="t", dpi=20)
    width, height = png_size(large)
    assert 20 * 20 < height <= 40 * 20  # taller than a small chart by default, but capped
    check_png(large, (width / 20, height / 20), 20)


def test_five_thousand_users(tmp_path: Path) -> None:
    many = table(user_rows("intercept[user]", 5000, [None]))
    out = draw_coefficients(many, "intercept[user]", "item", tmp_path / "u.png", title="t", dpi=30)
    assert png_size(out) == (8 * 30, 5 * 30)


def test_pixel_size_is_rounded_not_truncated(tmp_path: Path) -> None:
    out = draw_coefficients(
        model(), "lambda", "nest", tmp_path / "x.png", title="t", dpi=72, size=(6.7, 4.29)
    )
    assert png_size(out) == (482, 309)  # 6.7 * 72 = 482.4, 4.29 * 72 = 308.88


def test_unknown_term(tmp_path: Path) -> None:
    with pytest.raises(FormulaError, match=r"unknown term 'pric\[constant\]' at level item") as err:
        draw_coefficients(model(), "pric[constant]", "item", tmp_path / "x.png", title="t")
    assert "price[constant]" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.png").exists()


def test_term_at_the_wrong_level(tmp_path: Path) -> None:
    with pytest.raises(
        FormulaError, match=r"'price\[constant\]'.*\(it is a term at --level item\)"
    ):
        draw_coefficients(model(), "price[constant]", "nest", tmp_path / "x.png", title="t")


@pytest.mark.parametrize("users", [False, True])
def test_term_never_estimated(tmp_path: Path, users: bool) -> None:
    if users:
        rows = [row("age[user]", None, variation="user", user=f"u{i}") for i in range(5)]
    else:
        rows = [row("age[item]", None, variation="item", item=label) for label in ITEMS[1:]]
        rows.insert(0, row("age[item]", 0.0, variation="item", item="bus", fixed=True))
    coefficients = table([*rows, row("price[constant]", -1.0)])
    with pytest.raises(FormulaError, match=r"'age\[\w+\]' .*not estimated"):
        draw_coefficients(coefficients, rows[0]["term"], "item", tmp_path / "x.png", title="t")
    assert not (tmp_path / "x.png").exists()


def test_some_users_not_estimated(tmp_path: Path) -> None:
    rows = user_rows("intercept[user]", 50, [None])
    rows += [row("intercept[user]", None, variation="user", user=f"v{i}") for i in range(5)]
    out = draw_coefficients(table(rows), "intercept[user]", "item", tmp_path / "u.png", title="t")
    check_png(out, (8.0, 5.0), 100)


@pytest.mark.parametrize("observed", ["present", "absent", "null", "many"])
def test_shares(tmp_path: Path, observed: str) -> None:
    count = 60 if observed == "many" else 5
    items = [f"alt{i}" for i in range(count)]
    predicted = [(i + 1) / sum(range(1, count + 1)) for i in range(count)]
    frame = pl.DataFrame({"item": items, "predicted_share": predicted})
    if observed in ("present", "many"):
        seen = [share * (1.2 if i % 2 else 0.8) for i, share in enumerate(predicted)]
        frame = frame.with_columns(pl.Series("observed_share", seen))
    elif observed == "null":
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float64).alias("observed_share"))

    def draw(output: Path, size: tuple[float, float], dpi: int) -> Path:
        return draw_shares(frame, output, title="shares", dpi=dpi, size=size)

    draw_twice(tmp_path, draw, (5.0, 4.0))


def test_long_title_is_shortened() -> None:
    """A long formula is cut between terms, never inside one; short ones are kept whole."""
    text = "choice ~ " + " + ".join(f"(x{i}|item)" for i in range(40))
    short = shorten(text, 80)
    assert len(short) <= 80 and short.endswith(" + \u2026")
    assert short == "choice ~ " + " + ".join(f"(x{i}|item)" for i in range(5)) + " + \u2026"
    assert shorten("a  b") == "a b"
    assert shorten("(a|item) + (b|item)", 80) == "(a|item) + (b|item)"


def test_importing_is_cheap() -> None:
    import os
    import subprocess
    import sys

    code = "import sys, choicecli.plot; print('matplotlib' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "False"


def test_forest_panels_group_by_term_and_by_scale() -> None:
    """Single coefficients share a panel while within a factor of 10; every term with several
    coefficients gets its own panel (its own axis); lambda is drawn against 1."""
    from choicecli.plot import _forest_panels, _forest_rows

    rows = [
        row("cost[constant]", -0.03), row("freq[constant]", 0.09), row("ovt[constant]", -0.04),
        *item_rows("income[item]"),
        row("big[constant]", -6.0),
        row("lambda", 0.6, level="nest", variation="item", item="transit"),
        row("lambda", 0.9, level="nest", variation="item", item="private"),
    ]  # fmt: skip
    panels = _forest_panels(_forest_rows(table(rows)))
    assert [[r.label for r in panel.rows] for panel in panels] == [
        ["cost[constant]", "freq[constant]", "ovt[constant]"],
        ["bus", "car", "train", "walk"],
        ["big[constant]"],
        ["transit", "private"],
    ]
    assert [panel.title for panel in panels] == [
        "",
        "income[item], one per alternative (bus: base, fixed at 0)",
        "",
        "lambda, one per nest (1 = no nesting)",
    ]
    assert [panel.reference for panel in panels] == [0.0, 0.0, 0.0, 1.0]
    assert [r.significant for r in panels[0].rows] == [False, False, False]  # p = 0.05


def test_empty_title_draws_no_title_and_marks_show_significance_and_bounds(tmp_path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from choicecli.plot import _draw_forest, _forest_panels, _forest_rows

    rows = [row("cost[constant]", -0.5), row("lambda", 1.0, level="nest", item="a")]
    rows[0]["p_value"] = 1e-6
    rows[1]["at_bound"] = True
    panels = _forest_panels(_forest_rows(table(rows)))
    assert panels[0].rows[0].significant and panels[1].rows[0].at_bound
    figure = Figure()
    FigureCanvasAgg(figure)
    _draw_forest(figure, panels, "")
    assert figure._suptitle is None
    labels = [text.get_text() for text in figure.legends[0].get_texts()]
    assert labels == ["differs from 0 (1 for lambda) at p < 0.05", "95% confidence interval",
                      "on a bound: interval does not hold"]  # fmt: skip
    out = draw_coefficients(table(rows), None, "item", tmp_path / "f.png", title="")
    check_png(out, (7.0, 3.5), 100)


def test_one_coefficient_chart_is_compact(tmp_path) -> None:
    out = draw_coefficients(model(), "price[constant]", "item", tmp_path / "p.png", title="t")
    assert png_size(out) == (700, 260)  # 7 x 2.6 inches, not the 3.5 of a longer chart


def test_shares_by_segment_get_a_panel_per_value() -> None:
    from choicecli.plot import _segment_panels

    frame = pl.DataFrame({
        "urban": [1, 1, 0, 0, 0],
        "item": ["car", "air", "car", "air", "bus"],
        "predicted_share": [0.7, 0.3, 0.2, 0.5, 0.3],
        "observed_share": [0.6, 0.4, 0.3, 0.4, 0.3],
    })  # fmt: skip
    items, panels, count = _segment_panels(frame, ["urban"])
    assert items == ["bus", "air", "car"]  # mean predicted share 0.3, 0.4, 0.45
    assert count == 2
    assert [name for name, _, _ in panels] == ["urban = 0", "urban = 1"]
    assert panels[1][1] == [None, 0.3, 0.7] and panels[1][2] == [None, 0.4, 0.6]


def test_shares_by_many_segments_are_capped_and_counted(tmp_path) -> None:
    from choicecli.plot import MAX_PANELS, _segment_panels

    frame = pl.DataFrame({"segment": list(range(60)) * 2, "item": ["a"] * 60 + ["b"] * 60,
                          "predicted_share": [0.4] * 60 + [0.6] * 60})  # fmt: skip
    items, panels, count = _segment_panels(frame, ["segment"])
    assert (items, count, len(panels)) == (["a", "b"], 60, MAX_PANELS)
    assert panels[-1] == (f"segment = {MAX_PANELS - 1}", [0.4, 0.6], None)
