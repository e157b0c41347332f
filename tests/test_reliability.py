"""Reliability of `choice fit`: errors, warnings, exit codes, interruption, extreme values.

Every data error is one 'Error:' line on stderr naming the first offending case, row or value
and a count, exit code 1, and nothing written. Every warning is printed, recorded in model.json,
and turned into an error by --strict. Interrupted fits (Ctrl-C, SIGTERM, SIGHUP, SIGKILL) leave the
previous model directory byte for byte as it was (or, once the swap has begun, the complete new
one), and the next run leaves no temporaries behind.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch
from reliability_helpers import (
    CHOICE,
    FORMULA,
    PYTHON,
    coefficients,
    error_line,
    fit,
    invoke,
    leftovers,
    listing,
    long_table,
    model_document,
    set_cells,
    snapshot,
    subprocess_env,
    warning_lines,
    write,
)

from choicecli.data import Roles
from choicecli.errors import DataError
from choicecli.models import segment_logsumexp
from choicecli.problem import ModelSpec, build_problem
from choicecli.process import STOP_AT_VARIABLE, STOP_FILE_VARIABLE

BAD_CASES = [5, 9, 14]  # the offending cases; 5 is the first in file order and in sorted order
IN_BAD = pl.col("case").is_in(BAD_CASES)
COUNT = re.compile(r"\b3\b")  # three offending cases (or rows, or pairs)
FIRST = re.compile(r"case '?5'?\b")
# Case 5, item a is data row 13 (1-based, header not counted) and line 14 of the file.
FIRST_ROW = re.compile(r"\b(row 1[34]|line 14|case '?5'?)\b")
ANY_ROW = re.compile(r"\b(row|line) \d+")


def product_bug(reason: str):
    return pytest.mark.xfail(reason=f"product bug: {reason}", strict=True)


# --------------------------------------------------------------------------------------------
# Data errors: exit 1, one line naming the first offender and a count, nothing written.
# --------------------------------------------------------------------------------------------


def _csv_lines(frame: pl.DataFrame) -> list[str]:
    return frame.write_csv().splitlines()


def _edit_lines(frame: pl.DataFrame, edit: Callable[[str], str]) -> bytes:
    """Apply `edit` to the CSV line of item 'a' in each bad case; other lines stay as written."""
    lines = _csv_lines(frame)
    header, body = lines[0], lines[1:]
    for index, row in enumerate(frame.iter_rows(named=True)):
        if row["case"] in BAD_CASES and row["item"] == "a":
            body[index] = edit(body[index])
    return ("\n".join([header, *body]) + "\n").encode()


def _replace_field(position: int, values: list[str]) -> Callable[[str], str]:
    """An edit that puts the next of `values` in field `position` of a line."""
    pending = list(values)

    def edit(line: str) -> str:
        fields = line.split(",")
        fields[position] = pending.pop(0)
        return ",".join(fields)

    return edit


def _replace_price(values: list[str]) -> Callable[[str], str]:
    return _replace_field(3, values)


def _replace_choice(values: list[str]) -> Callable[[str], str]:
    return _replace_field(2, values)


def _good_parquet(tmp_path: Path) -> bytes:
    path = write(long_table(), tmp_path / "good.parquet")
    raw = path.read_bytes()
    path.unlink()
    return raw


def _file(name: str, content: bytes | Callable[[Path], bytes] | None, *args: str):
    """A builder writing `content` to tmp_path/name (None: no file) and the extra fit options."""

    def build(tmp_path: Path) -> tuple[Path, list[str]]:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content(tmp_path) if callable(content) else content)
        return path, list(args)

    return build


def _table(frame: pl.DataFrame, suffix: str = ".csv", *args: str):
    def build(tmp_path: Path) -> tuple[Path, list[str]]:
        return write(frame, tmp_path / f"data{suffix}"), list(args)

    return build


def _with_availability() -> pl.DataFrame:
    frame = long_table().with_columns(avail=pl.lit(1, dtype=pl.Int64))
    return set_cells(frame, "avail", IN_BAD & (pl.col("choice") == 1), 0)


def _duplicated() -> pl.DataFrame:
    frame = long_table()
    extra = frame.filter(IN_BAD & (pl.col("item") == "b")).with_columns(
        choice=pl.lit(0, dtype=pl.Int64)
    )
    return pl.concat([frame, extra]).sort("case", maintain_order=True)


BASE = long_table()
IN_BAD_B = IN_BAD & (pl.col("item") == "b")
IN_BAD_C = IN_BAD & (pl.col("item") == "c")

DATA_ERRORS = [
    pytest.param(_file("absent.csv", None), ["absent.csv", "no such file"], id="missing-file"),
    pytest.param(_file("empty.csv", b""), ["empty.csv", "empty"], id="empty-file"),
    pytest.param(_file("blank.csv", b"  \n\n"), ["empty"], id="blank-file"),
    pytest.param(
        _file("header.csv", b"case,item,choice,price\n"), ["no rows"], id="header-only-csv"
    ),
    pytest.param(
        _file("junk.parquet", b"this is not a parquet file at all"),
        ["junk.parquet", "Parquet"],
        id="unreadable-parquet",
    ),
    pytest.param(
        _file("half.parquet", lambda tmp: _good_parquet(tmp)[: len(_good_parquet(tmp)) // 2]),
        ["half.parquet", "Parquet"],
        id="truncated-parquet",
    ),
    pytest.param(
        _file("footer.parquet", lambda tmp: _good_parquet(tmp)[:-40] + b"PAR1"),
        ["footer.parquet", "Parquet"],
        id="truncated-parquet-with-magic",
    ),
    pytest.param(
        _file("long.csv", _edit_lines(BASE, lambda line: line + ",9")),
        ["long.csv", FIRST_ROW, COUNT],
        id="ragged-csv-extra-field",
    ),
    pytest.param(
        _file("short.csv", _edit_lines(BASE, lambda line: line.rsplit(",", 1)[0])),
        ["short.csv", FIRST_ROW, COUNT, re.compile("field|column|ragged", re.I)],
        id="ragged-csv-missing-field",
    ),
    pytest.param(
        _file("text.csv", _edit_lines(BASE, _replace_price(["cheap", "free", "?"]))),
        ["'price'", "cheap", COUNT, FIRST_ROW],
        id="non-numeric-value",
    ),
    pytest.param(
        _file("flag.csv", _edit_lines(BASE, _replace_choice(["maybe", "yes", "?"]))),
        ["'choice'", "maybe", COUNT],
        id="non-boolean-choice",
    ),
    pytest.param(
        _file("seven.csv", _edit_lines(BASE, _replace_choice(["7", "7", "7"]))),
        ["'choice'", "7", COUNT, FIRST_ROW],
        id="choice-not-0-1",
    ),
    pytest.param(
        _table(set_cells(BASE, "price", IN_BAD_B, None)),
        ["'price'", FIRST, COUNT, "--missing drop"],
        id="null-in-used-column",
    ),
    pytest.param(
        _table(set_cells(BASE, "price", IN_BAD_B, float("nan")), ".parquet"),
        ["'price'", FIRST, COUNT],
        id="nan-parquet",
    ),
    pytest.param(
        _table(set_cells(BASE, "price", IN_BAD_B, float("nan")), ".csv"),
        ["'price'", FIRST, COUNT],
        id="nan-csv",
    ),
    pytest.param(
        _table(set_cells(BASE, "price", IN_BAD_B, float("inf")), ".parquet"),
        ["'price'", FIRST, COUNT, "infinite"],
        id="inf-parquet",
    ),
    pytest.param(
        _table(set_cells(BASE, "price", IN_BAD_B, float("-inf")), ".csv"),
        ["'price'", FIRST, COUNT, "infinite"],
        id="minus-inf-csv",
    ),
    pytest.param(
        _table(set_cells(BASE, "case", IN_BAD_B, None)),
        ["'case'", COUNT, ANY_ROW],
        id="null-case-id",
    ),
    pytest.param(
        _table(set_cells(BASE, "item", IN_BAD_B, None)),
        ["'item'", FIRST, COUNT],
        id="null-item-id",
    ),
    pytest.param(_table(_duplicated()), [FIRST, "'b'", COUNT], id="duplicate-case-item-rows"),
    pytest.param(
        _table(set_cells(BASE, "choice", IN_BAD, 0)),
        ["'choice'", FIRST, COUNT, "no chosen"],
        id="no-chosen-row",
    ),
    pytest.param(
        _table(set_cells(BASE, "choice", IN_BAD, 1)),
        ["'choice'", FIRST, COUNT, "several"],
        id="several-chosen-rows",
    ),
    pytest.param(
        _table(_with_availability(), ".csv", "--available", "avail"),
        ["'avail'", FIRST, COUNT, "unavailable"],
        id="chosen-row-unavailable",
    ),
    pytest.param(
        _table(set_cells(BASE, "user", IN_BAD_C, "zz"), ".csv", "--user", "user"),
        ["'user'", FIRST, COUNT],
        id="user-changes-within-case",
    ),
    pytest.param(
        _table(set_cells(BASE, "session", IN_BAD_C, -1), ".csv", "--session", "session"),
        ["'session'", FIRST, COUNT],
        id="session-changes-within-case",
    ),
    pytest.param(
        _table(BASE, ".csv", "--case", "sid"),
        ["'sid'", "price", "choice", "session"],
        id="missing-role-column-lists-columns",
    ),
]


@pytest.mark.parametrize(("build", "needles"), DATA_ERRORS)
def test_data_error_is_one_line_exit_1_and_writes_nothing(tmp_path, build, needles):
    data, extra = build(tmp_path)
    model = tmp_path / "m"
    before = listing(tmp_path)
    result = fit(data, model, *extra)
    error_line(result, *needles, strip=tmp_path)
    assert not model.exists()
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    ("formula", "needles"),
    [
        pytest.param("(prise|constant)", ["'prise'", "'price'"], id="unknown-column-suggests"),
        pytest.param(
            "(price|constant) + (1|itm)", ["position", "'itm'", "'item'"], id="bad-variation"
        ),
        pytest.param("(price|constant", ["position"], id="unclosed-term"),
        pytest.param(
            "(price|constant) + (price|constant)", ["duplicate", "price[constant]"], id="dup"
        ),
    ],
)
def test_formula_error_is_one_line_exit_1_and_writes_nothing(tmp_path, formula, needles):
    data = write(long_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    result = fit(data, model, formula=formula)
    error_line(result, *needles, strip=tmp_path)
    assert not model.exists()
    assert listing(tmp_path) == ["data.csv"]


def test_missing_drop_drops_null_and_nan_cases_and_says_how_many(tmp_path):
    frame = set_cells(long_table(), "price", IN_BAD_B, None)
    frame = set_cells(frame, "price", (pl.col("case") == 20) & (pl.col("item") == "a"), math.nan)
    data = write(frame, tmp_path / "data.parquet")
    model = tmp_path / "m"
    result = fit(data, model, "--missing", "drop")
    assert result.exit_code == 0, result.stderr
    (warning,) = [line for line in warning_lines(result) if "dropped" in line]
    assert re.search(r"\b4\b", warning), warning  # cases 5, 9, 14 and 20
    document = model_document(model)
    assert document["fit"]["n_cases"] == 20
    assert any("dropped" in text for text in document["warnings"])


def test_missing_drop_also_drops_infinite_values(tmp_path):
    frame = set_cells(long_table(), "price", IN_BAD_B, float("inf"))
    data = write(frame, tmp_path / "data.parquet")
    model = tmp_path / "m"
    result = fit(data, model, "--missing", "drop")
    assert result.exit_code == 0, result.stderr
    assert model_document(model)["fit"]["n_cases"] == 21


# --------------------------------------------------------------------------------------------
# Warnings: printed with what and how many, recorded in model.json, an error under --strict.
# --------------------------------------------------------------------------------------------


def _single_alternative_table() -> pl.DataFrame:
    single = pl.DataFrame(
        {
            "case": [25, 26],
            "item": ["a", "b"],
            "choice": [1, 1],
            "price": [0.5, 0.7],
            "user": ["u0", "u1"],
            "session": [250, 260],
        }
    )
    return pl.concat([long_table(), single])


def _never_chosen_table() -> pl.DataFrame:
    """Alternative 'c' is offered everywhere and never chosen: cases that chose c choose a."""
    frame = long_table()
    chose_c = frame.filter((pl.col("item") == "c") & (pl.col("choice") == 1)).get_column("case")
    moved = pl.col("case").is_in(chose_c.implode())
    frame = set_cells(frame, "choice", moved & (pl.col("item") == "c"), 0)
    return set_cells(frame, "choice", moved & (pl.col("item") == "a"), 1)


def _single_case_user_table() -> pl.DataFrame:
    return set_cells(long_table(), "user", pl.col("case") == 24, "solo")


def test_single_alternative_cases_are_dropped_with_a_warning(tmp_path):
    data = write(_single_alternative_table(), tmp_path / "data.csv")
    reference = write(long_table(), tmp_path / "reference.csv")
    result = fit(data, tmp_path / "m")
    assert result.exit_code == 0, result.stderr
    (warning,) = warning_lines(result)
    assert "single alternative" in warning and re.search(r"\b2\b", warning), warning
    assert "case 25" in warning
    document = model_document(tmp_path / "m")
    assert document["fit"]["n_cases"] == 24 and document["fit"]["converged"]
    assert [w for w in document["warnings"] if "single alternative" in w]
    assert fit(reference, tmp_path / "r").exit_code == 0
    same = coefficients(tmp_path / "m").get_column("estimate")
    assert same.to_list() == pytest.approx(coefficients(tmp_path / "r")["estimate"].to_list())


def test_single_alternative_cases_are_an_error_under_strict(tmp_path):
    data = write(_single_alternative_table(), tmp_path / "data.csv")
    result = fit(data, tmp_path / "m", "--strict")
    error_line(result, "single alternative", re.compile(r"\b2\b"), strip=tmp_path)
    assert not (tmp_path / "m").exists()


def test_never_chosen_alternative_is_not_estimated_with_a_warning(tmp_path):
    data = write(_never_chosen_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    result = fit(data, model)
    assert result.exit_code == 0, result.stderr
    (warning,) = warning_lines(result)
    assert "intercept[item]" in warning and "'c'" in warning and "never chosen" in warning
    assert re.search(r"\b1\b", warning), warning
    table = coefficients(model)
    row_c = table.filter((pl.col("term") == "intercept[item]") & (pl.col("item") == "c"))
    assert row_c["estimate"].to_list() == [None] and row_c["identified"].to_list() == [False]
    rest = table.filter(~((pl.col("term") == "intercept[item]") & (pl.col("item") == "c")))
    assert rest["identified"].all() and rest["estimate"].is_not_null().all()
    document = model_document(model)
    assert document["fit"]["converged"] and math.isfinite(document["fit"]["log_likelihood"])
    assert [w for w in document["warnings"] if "never chosen" in w]


def test_never_chosen_alternative_is_an_error_under_strict(tmp_path):
    data = write(_never_chosen_table(), tmp_path / "data.csv")
    result = fit(data, tmp_path / "m", "--strict")
    error_line(result, "--strict", "'c'", "never chosen", strip=tmp_path)
    assert not (tmp_path / "m").exists()
    assert listing(tmp_path) == ["data.csv"]


def test_user_with_one_case_is_not_estimated_with_a_warning(tmp_path):
    data = write(_single_case_user_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    result = fit(data, model, "--user", "user", formula="(price|user) + (1|item)")
    assert result.exit_code == 0, result.stderr
    (warning,) = warning_lines(result)
    assert "price[user]" in warning and "single case" in warning, warning
    assert re.search(r"\b1\b", warning), warning
    table = coefficients(model).filter(pl.col("term") == "price[user]")
    solo = table.filter(pl.col("user") == "solo")
    assert solo["estimate"].to_list() == [None] and solo["identified"].to_list() == [False]
    others = table.filter(pl.col("user") != "solo")
    assert others.height == 6 and others["identified"].all()
    assert others["estimate"].is_not_null().all()
    assert [w for w in model_document(model)["warnings"] if "single case" in w]


def test_user_with_one_case_is_an_error_under_strict(tmp_path):
    data = write(_single_case_user_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    result = fit(data, model, "--user", "user", "--strict", formula="(price|user) + (1|item)")
    error_line(result, "--strict", "price[user]", "single case", strip=tmp_path)
    assert not model.exists()


# --------------------------------------------------------------------------------------------
# Exit codes: 3 not converged, 2 usage, 130 Ctrl-C, 1 internal errors (one line), --debug.
# --------------------------------------------------------------------------------------------


def test_not_converged_exits_3_and_still_writes_the_model(tmp_path):
    data = write(long_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    result = fit(data, model, "--max-iter", "1")
    assert result.exit_code == 3, result.stderr
    assert "Traceback" not in result.output
    assert [line for line in warning_lines(result) if "converge" in line]
    document = model_document(model)
    assert document["fit"]["converged"] is False
    assert [w for w in document["warnings"] if "converge" in w]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["--max-iter", "0"], id="max-iter-0"),
        pytest.param(["--missing", "maybe"], id="bad-choice-of-missing"),
        pytest.param(["--bogus"], id="unknown-option"),
        pytest.param(["--device", "tpu"], id="bad-device"),
        pytest.param(["--lambda-bounds", "1,0"], id="bad-lambda-bounds"),
        pytest.param(["--input-format", "xls"], id="bad-input-format"),
        pytest.param(["--nest-formula", "(price|constant)"], id="nest-formula-without-nests"),
    ],
)
def test_usage_errors_exit_2_and_write_nothing(tmp_path, extra):
    data = write(long_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    result = fit(data, model, *extra)
    assert result.exit_code == 2, (result.stderr, result.exception)
    assert "Traceback" not in result.output
    assert "Error" in result.stderr
    assert not model.exists()


def test_missing_formula_is_a_usage_error(tmp_path):
    data = write(long_table(), tmp_path / "data.csv")
    result = invoke("fit", data, "--model", tmp_path / "m")
    assert result.exit_code == 2
    assert "--formula" in result.stderr and "Traceback" not in result.output


@pytest.fixture
def previous_model(tmp_path) -> tuple[Path, Path, dict[str, bytes]]:
    """A fitted model directory and its bytes, to check that failed fits leave it alone."""
    data = write(long_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    assert fit(data, model).exit_code == 0
    return data, model, snapshot(model)


def test_ctrl_c_during_a_fit_exits_130_and_keeps_the_previous_model(previous_model, monkeypatch):
    data, model, before = previous_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("choicecli.fit.maximise", interrupted)
    result = fit(data, model, formula="(price|constant)")
    assert result.exit_code == 130
    assert "Traceback" not in result.output
    assert "Interrupted" in result.stderr and len(result.stderr.splitlines()) == 1
    assert snapshot(model) == before
    assert leftovers(model) == []


def test_ctrl_c_while_saving_exits_130_and_keeps_the_previous_model(previous_model, monkeypatch):
    data, model, before = previous_model
    import safetensors.torch

    real_save = safetensors.torch.save

    def save_then_interrupt(tensors, metadata=None):
        real_save(tensors, metadata=metadata)  # model.json is written, the parameters next
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save", save_then_interrupt)
    result = fit(data, model, formula="(price|constant)")
    assert result.exit_code == 130, result.stderr
    assert snapshot(model) == before
    assert leftovers(model) == []


def test_unexpected_exception_is_one_line_exit_1(previous_model, monkeypatch):
    data, model, before = previous_model

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the optimiser")

    monkeypatch.setattr("choicecli.fit.maximise", broken)
    result = fit(data, model)
    error_line(result, "boom in the optimiser", "--debug")
    assert snapshot(model) == before
    assert leftovers(model) == []


@pytest.mark.parametrize("how", ["--debug", "CHOICE_DEBUG=1"])
def test_debug_lets_the_traceback_through(tmp_path, how):
    data = write(set_cells(long_table(), "price", IN_BAD_B, None), tmp_path / "data.csv")
    if how == "--debug":
        result = fit(data, tmp_path / "m", "--debug")
    else:
        result = invoke("fit", data, "-f", FORMULA, "-m", tmp_path / "m", env={"CHOICE_DEBUG": "1"})
    assert isinstance(result.exception, DataError)  # re-raised: Python prints the traceback
    assert result.exit_code == 1
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("frame", "extra", "formula", "code"),
    [
        pytest.param(set_cells(BASE, "choice", IN_BAD, 0), [], FORMULA, 1, id="bad-data"),
        pytest.param(_never_chosen_table(), ["--strict"], FORMULA, 1, id="strict"),
        pytest.param(BASE, [], "(nope|constant)", 1, id="bad-formula"),
        pytest.param(BASE, ["--max-iter", "0"], FORMULA, 2, id="usage"),
    ],
)
def test_failed_fit_leaves_the_previous_model_byte_identical(
    previous_model, frame, extra, formula, code
):
    _, model, before = previous_model
    data = write(frame, model.parent / "other.csv")
    result = fit(data, model, *extra, formula=formula)
    assert result.exit_code == code, result.stderr
    assert snapshot(model) == before
    assert leftovers(model) == []


# --------------------------------------------------------------------------------------------
# Killing a running fit: each command stops at a named stage (after reading, inside the
# optimiser, between the two renames of the model swap), says so through a file and waits;
# the test then sends its signal. No sleeps, no payload sizes.
# --------------------------------------------------------------------------------------------

STAGES = ("read", "optimiser", "swap")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)
NEW_FORMULA = "(price|constant)"  # one parameter: the previous model (FORMULA) has three
STAGE_TIMEOUT = 240  # seconds for a command to start (importing torch) and reach its stage

_DIE_WHILE_SAVING = """
import os, signal, sys
import safetensors.torch
real_save = safetensors.torch.save
def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
safetensors.torch.save = save_then_die
from choicecli.cli import main
sys.argv = ["choice", *sys.argv[1:]]
main()
"""


# Starts a command with the given dispositions for the ending signals, whatever the test run's
# own are (a shell script's background job ignores SIGINT, nohup ignores SIGHUP): the signals
# named in argv[1] are ignored, the others get the default, which exec keeps.
_WITH_SIGNALS = """
import os, signal, sys
ignored = {getattr(signal, name) for name in sys.argv[1].split(",") if name}
for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(number, signal.SIG_IGN if number in ignored else signal.SIG_DFL)
os.execv(sys.argv[2], sys.argv[2:])
"""


@dataclass
class Run:
    """A command started in the background, with a previously fitted model beside it."""

    process: subprocess.Popen
    data: Path
    model: Path
    before: dict[str, bytes]
    folder: Path

    @property
    def stop_file(self) -> Path:
        return self.folder / "stage.txt"

    def wait_for_stage(self, stage: str) -> None:
        """Return once the command says it waits at `stage`; fail if it ends or never does."""
        deadline = time.monotonic() + STAGE_TIMEOUT
        while not (self.stop_file.exists() and self.stop_file.read_text() == stage):
            if self.process.poll() is not None:
                pytest.fail(f"the command ended before {stage!r}: {self.finish()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the command did not reach {stage!r} in {STAGE_TIMEOUT} s")
            time.sleep(0.02)  # polling the file, not timing the signal

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        returncode = self.process.wait(timeout=timeout)
        stdout = (self.folder / "stdout.txt").read_text()
        stderr = (self.folder / "stderr.txt").read_text()
        return returncode, stdout, stderr


def _kill_scenario(stage: str, sig: signal.Signals) -> str:
    return f"{stage}-{sig.name}"


@pytest.fixture(scope="module", autouse=True)
def background(tmp_path_factory) -> dict[str, Run]:
    """Start every subprocess scenario when the module starts.

    Each costs a few seconds of start-up (importing torch), which then overlaps with the
    in-process tests; the killed ones wait at their stage until their test signals them.
    """
    root = tmp_path_factory.mktemp("background")
    runs: dict[str, Run] = {}
    fit_new = [CHOICE, "fit", "{data}", "--formula", NEW_FORMULA]
    scenarios = {
        _kill_scenario(stage, sig): (fit_new, stage, None) for stage in STAGES for sig in SIGNALS
    }
    scenarios["nohup"] = (fit_new, "read", signal.SIGHUP)  # started with SIGHUP ignored
    scenarios["saving"] = ([PYTHON, "-c", _DIE_WHILE_SAVING, "fit", "{data}", "--formula",
                            NEW_FORMULA], None, None)  # fmt: skip
    scenarios["error"] = ([CHOICE, "fit", "{bad}", "--formula", FORMULA], None, None)
    handles = []
    for name, (argv, stage, ignored) in scenarios.items():
        folder = root / name
        folder.mkdir()
        data = write(long_table(), folder / "data.csv")
        bad = write(set_cells(long_table(), "price", IN_BAD_B, None), folder / "bad.csv")
        model = folder / "m"
        if name == "error":
            model = folder / "fresh"  # must never be created
        else:
            assert fit(data, model).exit_code == 0
        ignoring = "" if ignored is None else ignored.name
        command = [PYTHON, "-c", _WITH_SIGNALS, ignoring]
        command += [str(part).format(data=data, bad=bad) for part in argv]
        command += ["--model", str(model), "--device", "cpu"]
        env = subprocess_env()
        if stage is not None:
            env |= {STOP_AT_VARIABLE: stage, STOP_FILE_VARIABLE: str(folder / "stage.txt")}
        stdout = (folder / "stdout.txt").open("wb")
        stderr = (folder / "stderr.txt").open("wb")
        handles += [stdout, stderr]
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
        runs[name] = Run(process, data, model, snapshot(model), folder)
    yield runs
    for run in runs.values():
        if run.process.poll() is None:
            run.process.kill()
            run.process.wait()
    for handle in handles:
        handle.close()


def test_subprocess_data_error_is_one_line_without_traceback(background):
    """The installed console script, as a user runs it."""
    run = background["error"]
    returncode, stdout, stderr = run.finish()
    assert returncode == 1, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("Error: ") and "'price'" in lines[0] and "case 5" in lines[0]
    assert not run.model.exists()
    assert leftovers(run.model) == []


def _csv_terms(text: str) -> list[str]:
    return pl.read_csv(text.encode())["term"].to_list()


def assert_interrupted(returncode: int, stdout: str, stderr: str, sig: signal.Signals) -> None:
    """128 + the signal's number and one line naming it, or, for SIGKILL, nothing at all."""
    if sig == signal.SIGKILL:
        assert (returncode, stdout, stderr) == (-signal.SIGKILL, "", "")
        return
    assert returncode == 128 + sig, (returncode, stderr)
    assert stdout == ""
    assert stderr.splitlines() == [f"Interrupted by {sig.name}; no half-written file was left."], (
        stderr
    )


@pytest.mark.parametrize("sig", SIGNALS, ids=[sig.name for sig in SIGNALS])
@pytest.mark.parametrize("stage", ["read", "optimiser"])
def test_killed_fit_keeps_the_previous_model_and_next_run_leaves_no_temporaries(
    background, stage, sig
):
    run = background[_kill_scenario(stage, sig)]
    run.wait_for_stage(stage)
    run.process.send_signal(sig)
    assert_interrupted(*run.finish(), sig)
    assert snapshot(run.model) == run.before
    assert leftovers(run.model) == []  # nothing had been written yet

    assert_next_fit_replaces_the_model(run)


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_kill_during_the_swap_waits_for_it_and_leaves_the_complete_new_model(background, sig):
    """A signal between the two renames is held until the new model is in place; the command
    then stops as interrupted, and what is on disk is the complete new model, nothing else."""
    run = background[_kill_scenario("swap", sig)]
    run.wait_for_stage("swap")
    run.process.send_signal(sig)
    assert_interrupted(*run.finish(), sig)
    assert leftovers(run.model) == []
    assert listing(run.model) == ["coefficients.parquet", "model.json", "params.safetensors"]
    assert model_document(run.model)["spec"]["formula"] == NEW_FORMULA
    assert coefficients(run.model)["term"].to_list() == ["price[constant]"]
    shown = invoke("coef", "--model", run.model, "--format", "csv")  # all three files agree
    assert shown.exit_code == 0, shown.stderr
    assert _csv_terms(shown.stdout) == ["price[constant]"]


def test_sigkill_during_the_swap_keeps_both_models_whole_and_the_next_run_repairs(background):
    run = background[_kill_scenario("swap", signal.SIGKILL)]
    run.wait_for_stage("swap")
    run.process.send_signal(signal.SIGKILL)
    assert_interrupted(*run.finish(), signal.SIGKILL)
    # the previous model moved aside whole, the new one complete beside it, nothing mixed
    aside = [run.model.parent / name for name in leftovers(run.model) if name.endswith(".old")]
    fresh = [run.model.parent / name for name in leftovers(run.model) if name.endswith(".tmp")]
    assert len(aside) == 1 and len(fresh) == 1, leftovers(run.model)
    assert snapshot(aside[0] / "previous") == run.before
    assert model_document(fresh[0])["spec"]["formula"] == NEW_FORMULA

    previous_terms = coefficients(aside[0] / "previous")["term"].to_list()
    shown = invoke("coef", "--model", run.model, "--format", "csv")  # readers see the previous
    assert shown.exit_code == 0, shown.stderr
    assert _csv_terms(shown.stdout) == previous_terms

    failed = fit(run.data, run.model, formula="(nope|constant)")  # even a failing run repairs
    assert failed.exit_code == 1
    assert snapshot(run.model) == run.before
    assert leftovers(run.model) == []

    assert_next_fit_replaces_the_model(run)


def test_kill_with_sighup_ignored_by_the_parent_keeps_it_ignored(background):
    """`nohup choice fit ...`: a SIGHUP the parent ignores does not stop the command."""
    run = background["nohup"]
    run.wait_for_stage("read")
    run.process.send_signal(signal.SIGHUP)  # ignored: discarded as it is sent
    run.process.send_signal(signal.SIGTERM)
    assert_interrupted(*run.finish(), signal.SIGTERM)
    assert snapshot(run.model) == run.before


def test_sigkill_while_writing_the_model_keeps_the_previous_one(background):
    run = background["saving"]
    returncode, _, stderr = run.finish()
    assert returncode == -signal.SIGKILL, stderr
    assert snapshot(run.model) == run.before
    assert [name for name in leftovers(run.model) if name.endswith(".tmp")], "no half-written dir"

    assert_next_fit_replaces_the_model(run)


def assert_next_fit_replaces_the_model(run) -> None:
    """The next fit succeeds, leaves no temporary behind and writes its own model."""
    result = fit(run.data, run.model, formula=NEW_FORMULA)
    assert result.exit_code == 0, result.stderr
    assert leftovers(run.model) == []
    assert model_document(run.model)["spec"]["formula"] == NEW_FORMULA


DEAD_PID = 4_194_305  # above Linux's largest pid (2**22): temporaries of a process that is gone


def _crash_between_renames(model: Path) -> None:
    """The state a SIGKILL between atomic_directory's two renames leaves (see the test above)."""
    aside = model.parent / f".{model.name}.{DEAD_PID}.k1ll3d00.old"
    aside.mkdir()
    os.replace(model, aside / "previous")
    fresh = model.parent / f".{model.name}.{DEAD_PID}.n3wn3w00.tmp"
    shutil.copytree(aside / "previous", fresh)


def test_model_stays_readable_after_a_crash_between_renames(previous_model):
    _, model, before = previous_model
    _crash_between_renames(model)
    result = invoke("coef", "--model", model, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert "price[constant]" in result.stdout


def test_cleaning_one_model_leaves_a_sibling_models_temporaries_alone(previous_model):
    data, model, before = previous_model
    sibling = model.parent / f"{model.name}.v2"
    shutil.copytree(model, sibling)
    _crash_between_renames(sibling)  # m.v2 crashed mid-swap: its model waits in .m.v2.*.old
    assert fit(data, model, formula="(price|constant)").exit_code == 0
    moved_aside = model.parent / f".{sibling.name}.{DEAD_PID}.k1ll3d00.old" / "previous"
    assert snapshot(moved_aside) == before


# --------------------------------------------------------------------------------------------
# Extreme magnitudes: log-sum-exp everywhere, the likelihood stays finite.
# --------------------------------------------------------------------------------------------


def test_segment_logsumexp_is_finite_at_extremes():
    values = torch.tensor(
        [1e308, 1e308, -1e308, 0.0, -math.inf, 5.0, -1e308, -1e308], dtype=torch.float64
    )
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    result = segment_logsumexp(values, segment, 4)
    assert torch.isfinite(result).all(), result
    assert result[0] == pytest.approx(1e308 + math.log(2.0))
    assert result[1] == 0.0 and result[2] == 5.0
    assert result[3] == pytest.approx(-1e308 + math.log(2.0))


def _problem(frame: pl.DataFrame, formula: str, **spec):
    roles = Roles(case="case", item="item", choice="choice")
    return build_problem(frame, ModelSpec(formula=formula, roles=roles, **spec), "table")


def _layout_table(layout: str) -> pl.DataFrame:
    """full: every case offers every alternative; padded: nearly all do (a few rows missing);
    ragged: each case offers 3 of 8 alternatives (the chosen one among them)."""
    if layout == "full":
        return long_table()
    if layout == "padded":
        missing = (pl.col("case") % 3 == 0) & (pl.col("choice") == 0) & (pl.col("item") == "c")
        return long_table().filter(~missing)
    frame = long_table(items=tuple("abcdefgh"))
    rank = pl.col("choice").rank("ordinal", descending=True).over("case")
    offered = (rank == 1) | (
        (pl.col("case") + pl.col("price").rank("ordinal").over("case")) % 4 == 0
    )
    return frame.filter(offered).filter(pl.len().over("case") >= 2)


@pytest.mark.parametrize(
    ("layout", "slope"),
    [
        pytest.param(layout, slope, id=f"{layout}-{slope:g}")
        for layout in ("full", "padded", "ragged")
        for slope in (1e4, -1e6, 1e12)
    ],
)  # fmt: skip
def test_conditional_logit_likelihood_is_finite_at_extreme_parameters(layout, slope):
    problem = _problem(_layout_table(layout), "(price|constant) + (1|item)")
    model = problem.model(torch.device("cpu"))
    theta = torch.zeros(len(problem.parameters), dtype=torch.float64)
    theta[0] = slope  # utilities of order slope * price
    theta[2] = 1e5  # intercept of b
    theta[3] = -1e5  # intercept of c
    value, gradient = model.value_and_gradient(theta)
    assert math.isfinite(float(value)) and float(value) <= 0.0
    assert torch.isfinite(gradient).all(), gradient
    assert torch.isfinite(model.hessian(theta)).all()


@pytest.mark.parametrize("lambda_value", [1e-3, 1.0, 50.0])
def test_nested_logit_likelihood_is_finite_at_extreme_parameters(lambda_value):
    frame = long_table(items=("a", "b", "c", "d"))
    problem = _problem(frame, FORMULA, nests="x=a,b;y=c,d")
    model = problem.model(torch.device("cpu"))
    theta = problem.start.clone()
    theta[0] = 1e4  # price slope: utilities of order 1e5
    theta[2:5] = torch.tensor([3e5, -3e5, 1e3], dtype=torch.float64)
    theta[problem.lambda_index] = lambda_value
    value, gradient = model.value_and_gradient(theta)
    assert math.isfinite(float(value)) and float(value) <= 0.0
    assert torch.isfinite(gradient).all()


@pytest.mark.parametrize("scale", [1e90])  # beyond 1e100 a column is refused: tests/test_inputs.py
def test_fit_with_huge_column_values_keeps_the_likelihood_finite(tmp_path, scale):
    frame = long_table().with_columns(pl.col("price") * scale)
    data = write(frame, tmp_path / "data.parquet")
    model = tmp_path / "m"
    result = fit(data, model)
    assert result.exit_code in (0, 3), result.stderr
    assert "Traceback" not in result.output
    statistics = model_document(model)["fit"]
    assert math.isfinite(statistics["log_likelihood"]) and statistics["log_likelihood"] <= 0.0
    assert statistics["log_likelihood"] >= statistics["null_log_likelihood"] - 1e-9


def test_rescaling_a_column_rescales_its_coefficient_only(tmp_path):
    reference = write(long_table(), tmp_path / "units.csv")
    scaled = write(long_table().with_columns(pl.col("price") * 1e6), tmp_path / "millions.csv")
    assert fit(reference, tmp_path / "units").exit_code == 0
    result = fit(scaled, tmp_path / "millions")
    assert result.exit_code == 0, result.stderr
    assert warning_lines(result) == []
    units = model_document(tmp_path / "units")["fit"]["log_likelihood"]
    millions = model_document(tmp_path / "millions")["fit"]["log_likelihood"]
    assert millions == pytest.approx(units, rel=1e-8)
    slope = coefficients(tmp_path / "millions")["estimate"][0]
    assert slope * 1e6 == pytest.approx(coefficients(tmp_path / "units")["estimate"][0], rel=1e-5)


def _perfectly_predicted() -> pl.DataFrame:
    """The chosen alternative always has the highest price: the slope runs off to +inf."""
    frame = long_table()
    return frame.with_columns(
        pl.when(pl.col("choice") == 1).then(pl.col("price") + 10.0).otherwise(pl.col("price"))
    )


def test_perfect_prediction_keeps_the_likelihood_finite(tmp_path):
    data = write(_perfectly_predicted(), tmp_path / "data.csv")
    result = fit(data, tmp_path / "m", formula="(price|constant)")
    assert result.exit_code in (0, 3), result.stderr
    value = model_document(tmp_path / "m")["fit"]["log_likelihood"]
    assert math.isfinite(value) and value <= 0.0


def test_perfect_prediction_is_flagged_and_strict_refuses_it(tmp_path):
    data = write(_perfectly_predicted(), tmp_path / "data.csv")
    result = fit(data, tmp_path / "m", formula="(price|constant)")
    assert [line for line in warning_lines(result) if "price[constant]" in line]
    strict = fit(data, tmp_path / "s", "--strict", formula="(price|constant)")
    error_line(strict, "price[constant]", strip=tmp_path)
