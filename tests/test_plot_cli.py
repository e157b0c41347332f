"""choice plot through the CLI: every chart kind from real fits, byte-identical, clear errors."""

from __future__ import annotations

import struct

import pytest
from typer.testing import CliRunner

from choicecli.cli import app
from conftest import HC_FORMULA, SAMPLE_DATA, reference_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def invoke(*arguments: str):
    return CliRunner().invoke(app, list(arguments))


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    transport = root / "transport"
    fitted = invoke(
        "fit", str(SAMPLE_DATA / "transport.parquet"),
        "--formula", "(time|constant) + (1|item) + (income|item) + (cost|user)",
        "--case", "case_id", "--item", "mode", "--choice", "chosen", "--user", "user_id",
        "-m", str(transport),
    )  # fmt: skip
    assert fitted.exit_code == 0, fitted.stderr
    nested = root / "nested"
    fitted = invoke(
        "fit", str(reference_file("HC.csv")), "--formula", HC_FORMULA, "--case", "idx.id1",
        "--item", "idx.id2", "--choice", "depvar", "--nests",
        "cooling=gcc,ecc,erc,hpc;other=gc,ec,er", "-m", str(nested),
    )  # fmt: skip
    assert fitted.exit_code == 0, fitted.stderr
    shares = root / "shares.parquet"
    predicted = invoke("predict", str(SAMPLE_DATA / "transport.parquet"), "-m", str(transport),
                       "--shares", "-o", str(shares))  # fmt: skip
    assert predicted.exit_code == 0, predicted.stderr
    return transport, nested, shares


@pytest.mark.parametrize(
    ("which", "arguments"),
    [
        ("transport", []),  # forest plot of every non-user coefficient
        ("transport", ["income[item]"]),  # per alternative, base marked
        ("transport", ["cost[user]"]),  # histogram of user estimates
        ("nested", ["lambda"]),
        ("shares", []),
    ],
)
def test_every_chart_kind_is_a_deterministic_png(models, tmp_path, which, arguments):
    transport, nested, shares = models
    source = {"transport": ["-m", str(transport)], "nested": ["-m", str(nested)],
              "shares": ["--shares", str(shares)]}[which]  # fmt: skip
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    for out in (first, second):
        result = invoke("plot", *arguments, *source, "-o", str(out), "--dpi", "80")
        assert result.exit_code == 0, result.stderr
    width, height = png_size(first)
    assert width > 200 and height > 150
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.png", "second.png"]


def test_unknown_term_is_exit_1_with_one_line(models, tmp_path):
    transport, _, _ = models
    result = invoke("plot", "tme[constant]", "-m", str(transport), "-o", str(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "tme[constant]" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_bad_dpi_is_a_usage_error(models, tmp_path):
    transport, _, _ = models
    result = invoke("plot", "-m", str(transport), "-o", str(tmp_path / "x.png"), "--dpi", "0")
    assert result.exit_code == 2 and "--dpi" in result.stderr


def test_shares_by_segment_draw_one_panel_per_value(models, tmp_path):
    """`predict --shares --by` then `plot --shares`: a panel per segment, not 3x the bars."""
    import polars as pl

    from choicecli.plot import _segment_panels

    transport, _, _ = models
    data, segmented = tmp_path / "regions.parquet", tmp_path / "by.csv"
    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet")
    frame.with_columns(region=pl.col("case_id") % 3).write_parquet(data)
    predicted = invoke("predict", str(data), "-m", str(transport), "--shares", "--by", "region",
                       "-o", str(segmented), "-q")  # fmt: skip
    assert predicted.exit_code == 0, predicted.stderr
    items, panels, count = _segment_panels(pl.read_csv(segmented), ["region"])
    assert count == 3 and len(items) == 5
    assert [name for name, _, _ in panels] == ["region = 0", "region = 1", "region = 2"]
    out = tmp_path / "by.png"
    drawn = invoke("plot", "--shares", str(segmented), "-o", str(out), "--dpi", "40")
    assert drawn.exit_code == 0, drawn.stderr
    single = tmp_path / "one.png"
    assert (
        invoke("plot", "--shares", str(models[2]), "-o", str(single), "--dpi", "40").exit_code == 0
    )
    assert png_size(out)[1] > png_size(single)[1]  # panels, taller than one bar chart


def test_empty_title_and_quiet(models, tmp_path):
    transport, _, _ = models
    titled, untitled = tmp_path / "a.png", tmp_path / "b.png"
    assert invoke("plot", "-m", str(transport), "-o", str(titled), "-q").exit_code == 0
    done = invoke("plot", "-m", str(transport), "-o", str(untitled), "--title", "", "-q")
    assert done.exit_code == 0 and done.stderr == ""
    assert titled.read_bytes() != untitled.read_bytes()


def test_level_without_a_term_draws_that_level_only(models, tmp_path):
    transport, nested, _ = models
    out = tmp_path / "nest.png"
    done = invoke("plot", "--level", "nest", "-m", str(nested), "-o", str(out), "-q")
    assert done.exit_code == 0, done.stderr
    every = tmp_path / "every.png"
    assert invoke("plot", "-m", str(nested), "-o", str(every), "-q").exit_code == 0
    assert png_size(out)[1] < png_size(every)[1]  # the lambdas alone
    refused = invoke("plot", "--level", "nest", "-m", str(transport), "-o", str(tmp_path / "x.png"))
    assert refused.exit_code == 1
    assert "this model is a conditional logit: it has no nest level" in refused.stderr
    assert not (tmp_path / "x.png").exists()
