"""Bad inputs answered with one clear line (issue 16, items 6 to 10): option values refused
before the data is read, data values refused with the row or case, files that are no table,
CSV dialects, scaling, and what predict says. Through the CLI in-process (CliRunner) and as a
subprocess of the installed `choice` on real files: the exit code, the one stderr line, and
what is (not) written.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import polars as pl
import pytest
from reliability_helpers import (
    CHOICE,
    error_line,
    fit,
    invoke,
    long_table,
    model_document,
    subprocess_env,
    write,
)

from choicecli import io as choice_io
from choicecli.design import resolve_features
from choicecli.errors import DataError, FormulaError
from choicecli.formula import parse_formula


@pytest.fixture
def table(tmp_path) -> Path:
    return write(long_table(), tmp_path / "data.csv")


def log_likelihood(model: Path) -> float:
    return model_document(model)["fit"]["log_likelihood"]


# --------------------------------------------------------------------------------------------
# Item 7: option values no data can make right, refused before the data is read (exit 2)
# --------------------------------------------------------------------------------------------

BAD_OPTIONS = [
    (["--tol", "nan"], "--tol must be a positive number, not nan"),
    (["--tol", "inf"], "--tol must be a positive number, not inf"),
    (["--tol", "0"], "--tol must be a positive number, not 0"),
    (["--l2", "nan"], "--l2 must be 0 or a positive number, not nan"),
    (["--l2", "inf"], "--l2 must be 0 or a positive number, not inf"),
    (["--l2", "-1"], "--l2 must be 0 or a positive number, not -1"),
    (["--lambda-init", "nan"], "--lambda-init must be a positive number, not nan"),
    (["--lambda-init", "inf"], "--lambda-init must be a positive number, not inf"),
    (["--lambda-init", "0"], "--lambda-init must be a positive number, not 0"),
    (["--lambda-bounds", "nan,1"], "--lambda-bounds needs finite numbers 0 < LOW < HIGH"),
    (["--lambda-bounds", "0.1,inf"], "--lambda-bounds needs finite numbers 0 < LOW < HIGH"),
    (["--lambda-bounds", "1,0.5"], "--lambda-bounds needs finite numbers 0 < LOW < HIGH"),
    (["--max-iter", "0"], "--max-iter must be between 1 and 1,000,000, not 0"),
    (["--max-iter", str(10**20)], "--max-iter must be between 1 and 1,000,000, not 1e+20"),
    (["--threads", "0"], "--threads must be at least 1, not 0"),
    (["--weights", "choice"], "--weights and --choice both name column 'choice'"),
    (["--available", "choice"], "--available and --choice both name column 'choice'"),
    (["--weights", "case"], "--weights and --case both name column 'case'"),
    (["--available", "item"], "--available and --item both name column 'item'"),
    (["--separator", ";;"], "--separator must be one character"),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_OPTIONS)
def test_bad_option_values_are_usage_errors_before_the_data_is_read(tmp_path, extra, expected):
    # the data file does not exist: an error about it would mean the data was read first
    result = fit(tmp_path / "absent.csv", tmp_path / "m", *extra)
    line = error_line(result, expected, code=2)
    assert len(line) < 200  # no 300-digit figures
    assert not (tmp_path / "m").exists()


def test_huge_batch_cases_scores_in_one_batch_as_the_default_does(table, tmp_path):
    assert fit(table, tmp_path / "m").exit_code == 0
    default = invoke("predict", table, "-m", tmp_path / "m", "-o", "-")
    huge = invoke("predict", table, "-m", tmp_path / "m", "-o", "-", "--batch-cases", 10**30)
    assert default.exit_code == huge.exit_code == 0, huge.stderr
    assert huge.stdout == default.stdout and huge.stdout.count("\n") == 73
    error_line(
        invoke("predict", table, "-m", tmp_path / "m", "--batch-cases", -(10**300)),
        "--batch-cases must be at least 1, not -1e+300",
        code=2,
    )


# --------------------------------------------------------------------------------------------
# Items 6 and 7: data values refused (exit 1) with the row or case, or read as they are meant
# --------------------------------------------------------------------------------------------


def test_a_float_choice_column_of_0_and_1_fits_as_integers_do(tmp_path):
    frame = long_table()
    write(frame, tmp_path / "int.parquet")
    write(frame.with_columns(pl.col("choice").cast(pl.Float64)), tmp_path / "float.parquet")
    assert fit(tmp_path / "int.parquet", tmp_path / "a").exit_code == 0
    result = fit(tmp_path / "float.parquet", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    assert log_likelihood(tmp_path / "b") == log_likelihood(tmp_path / "a")


@pytest.mark.parametrize("value", [0.5, float("nan"), 2.0])
def test_a_choice_value_other_than_0_or_1_is_refused_with_its_row(tmp_path, value):
    frame = long_table().with_columns(pl.col("choice").cast(pl.Float64))
    frame = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 4).then(value).otherwise(pl.col("choice")).alias("choice")
    )
    result = fit(write(frame, tmp_path / "d.parquet"), tmp_path / "m")
    shown = f"{value:.6g}"
    error_line(result, f"choice column 'choice' has values other than 0/1 (1 rows, first {shown} "
                       "at row 5)", strip=tmp_path)  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_decimal_columns_are_fitted_as_float64(tmp_path):
    frame = long_table()
    write(frame, tmp_path / "float.parquet")
    as_decimal = frame.with_columns(
        pl.col("price").cast(pl.Decimal(12, 2)),
        pl.col("choice").cast(pl.Decimal(3, 0)),
    )
    assert as_decimal.schema["price"] == pl.Decimal(12, 2)  # prices are quarters: exact
    write(as_decimal, tmp_path / "decimal.parquet")
    assert fit(tmp_path / "float.parquet", tmp_path / "a").exit_code == 0
    result = fit(tmp_path / "decimal.parquet", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    assert log_likelihood(tmp_path / "b") == pytest.approx(log_likelihood(tmp_path / "a"), 1e-12)


def test_negative_weights_are_refused_naming_the_case_and_row(tmp_path):
    frame = long_table().with_columns(weight=pl.when(pl.col("case") == 3).then(-2.0).otherwise(1.0))
    result = fit(write(frame, tmp_path / "d.csv"), tmp_path / "m", "--weights", "weight")
    error_line(result, "weight column 'weight' has 3 negative values (first: -2 in case 3, row 7)"
                       "; weights must be 0 or more", strip=tmp_path)  # fmt: skip


def test_all_zero_weights_are_refused(tmp_path):
    frame = long_table().with_columns(weight=pl.lit(0.0))
    result = fit(write(frame, tmp_path / "d.csv"), tmp_path / "m", "--weights", "weight")
    error_line(result, "every weight in column 'weight' is 0, so no case counts", strip=tmp_path)


@pytest.mark.parametrize(("value", "shown"), [(2.0, "2"), (float("nan"), "nan"), (0.5, "0.5")])
def test_availability_other_than_0_or_1_is_refused_with_its_row(tmp_path, value, shown):
    frame = long_table().with_columns(
        available=pl.when(pl.int_range(pl.len()) == 7).then(value).otherwise(1.0)
    )
    result = fit(write(frame, tmp_path / "d.parquet"), tmp_path / "m", "--available", "available")
    error_line(result, f"availability column 'available' has 1 values that are not 0/1 (first "
                       f"{shown} at row 8)", strip=tmp_path)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Item 10: values far from 1 are a scaling problem, named as one
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scale", "problem", "fix"),
    [
        (1e150, "has values as large as 5e+150", "divide it by 1e+151"),
        (1e300, "has values as large as 5e+300", "divide it by 1e+301"),
        (1e-300, "has no value larger than 5e-300 in magnitude", "multiply it by 1e+299"),
        (1e-150, "has no value larger than 5e-150 in magnitude", "multiply it by 1e+149"),
    ],
)
def test_a_column_far_from_1_is_named_as_a_scaling_problem(tmp_path, scale, problem, fix):
    frame = long_table().with_columns(pl.col("price") * scale)
    result = fit(write(frame, tmp_path / "d.parquet"), tmp_path / "m")
    line = error_line(result, f"column 'price' {problem}", f"rescale the column ({fix})",
                      strip=tmp_path)  # fmt: skip
    assert "collinear" not in line and "does not vary" not in line
    assert not (tmp_path / "m").exists()


def test_a_column_rescaled_within_the_bounds_fits_with_its_coefficient_rescaled(tmp_path):
    frame = long_table()
    write(frame, tmp_path / "one.parquet")
    write(frame.with_columns(pl.col("price") * 1e-90), tmp_path / "tiny.parquet")
    assert fit(tmp_path / "one.parquet", tmp_path / "a").exit_code == 0
    result = fit(tmp_path / "tiny.parquet", tmp_path / "b")
    assert result.exit_code == 0 and "Warning" not in result.stderr, result.stderr
    assert log_likelihood(tmp_path / "b") == pytest.approx(log_likelihood(tmp_path / "a"), 1e-9)


# --------------------------------------------------------------------------------------------
# Item 9: predict names only what it has; no internal columns; unseen users of another type
# --------------------------------------------------------------------------------------------


@pytest.fixture
def model(table, tmp_path) -> Path:
    assert fit(table, tmp_path / "m", "--user", "user", formula="(price|constant) + (1|user)")
    return tmp_path / "m"


def test_predict_refuses_missing_values_without_suggesting_an_option_it_lacks(model, tmp_path):
    frame = long_table().with_columns(
        pl.when(pl.col("case") == 2).then(None).otherwise(pl.col("price")).alias("price")
    )
    result = invoke("predict", write(frame, tmp_path / "holes.csv"), "-m", model)
    line = error_line(result, "column 'price' has null or NaN values in 1 cases (first: case 2); "
                              "fill them in", strip=tmp_path)  # fmt: skip
    assert line.endswith("fill them in") and "--missing" not in line
    fitted = fit(tmp_path / "holes.csv", tmp_path / "again")
    error_line(fitted, "fill them in, or pass --missing drop to drop those cases", strip=tmp_path)


def test_predict_lists_the_input_columns_only(model, tmp_path, table):
    result = invoke("predict", table, "-m", model, "--case", "cas")
    line = error_line(result, "no column 'cas' (the model's --case column)",
                      "pass --case NAME; did you mean 'case'? (columns: case, item, "
                      "choice, price, user, session)", strip=tmp_path)  # fmt: skip
    assert "__" not in line


def test_predict_with_users_of_another_type_says_so_and_zero_scores_them(tmp_path):
    frame = long_table().with_columns(pl.col("user").str.slice(1).cast(pl.Int64))
    data = write(frame, tmp_path / "int_users.parquet")
    assert fit(data, tmp_path / "m", "--user", "user", formula="(price|user)").exit_code == 0
    text_users = write(long_table(), tmp_path / "text_users.parquet")
    result = invoke("predict", text_users, "-m", tmp_path / "m")
    error_line(result, "user 'u0' in column 'user' was not seen when the model was fitted (72 "
                       "rows); known: 0, 1, 2, 3, 4, 5; the model's user labels are Int64 and "
                       "this column is String; --unseen zero scores unseen users",
               strip=tmp_path)  # fmt: skip
    zero = invoke("predict", text_users, "-m", tmp_path / "m", "--unseen", "zero", "-o", "-")
    assert zero.exit_code == 0, zero.stderr
    scores = pl.read_csv(zero.stdout.encode())
    assert scores.height == 72
    sizes = scores.group_by("case").agg(pl.col("probability").sum())
    # every user's price slope is 0: equal shares within each case
    assert scores.get_column("probability").to_list() == pytest.approx([1 / 3] * 72)
    assert sizes.get_column("probability").to_list() == pytest.approx([1.0] * 24)


# --------------------------------------------------------------------------------------------
# Item 9: CSV dialects (separators, line ends, encodings) and names in backticks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("separator", "written"), [(";", "';'"), ("\t", "'\\t' (tab)"),
                                                    ("|", "'|'")])  # fmt: skip
def test_a_one_column_csv_says_which_separator_to_pass(tmp_path, separator, written):
    path = tmp_path / "d.csv"
    long_table().write_csv(path, separator=separator)
    header = separator.join(long_table().columns)
    line = error_line(fit(path, tmp_path / "m")).replace(str(tmp_path), "<tmp>")
    assert line == (
        f"Error: <tmp>/d.csv: the file reads as one column named {header!r}, whose header holds "
        f"{written}; pass --separator {written.split()[0]} to split it there"
    )
    given = "\\t" if separator == "\t" else separator
    assert fit(path, tmp_path / "m", "--separator", given).exit_code == 0
    scored = invoke("predict", path, "-m", tmp_path / "m", "--separator", given, "-o", "-")
    assert scored.exit_code == 0 and scored.stdout.count("\n") == 73, scored.stderr


def test_a_tsv_file_is_read_with_tabs(tmp_path):
    long_table().write_csv(tmp_path / "d.tsv", separator="\t")
    write(long_table(), tmp_path / "d.csv")
    assert fit(tmp_path / "d.tsv", tmp_path / "a").exit_code == 0
    assert fit(tmp_path / "d.csv", tmp_path / "b").exit_code == 0
    assert log_likelihood(tmp_path / "a") == log_likelihood(tmp_path / "b")


@pytest.mark.parametrize("variant", ["cr", "bom", "crlf"])
def test_cr_only_line_ends_and_a_byte_order_mark_read_as_plain_csv(tmp_path, variant):
    raw = long_table().write_csv().encode()
    changed = {
        "cr": raw.replace(b"\n", b"\r"),
        "bom": b"\xef\xbb\xbf" + raw,
        "crlf": raw.replace(b"\n", b"\r\n"),
    }[variant]
    (tmp_path / "plain.csv").write_bytes(raw)
    (tmp_path / "other.csv").write_bytes(changed)
    assert fit(tmp_path / "plain.csv", tmp_path / "a").exit_code == 0
    result = fit(tmp_path / "other.csv", tmp_path / "b")
    assert result.exit_code == 0, result.stderr
    assert log_likelihood(tmp_path / "b") == log_likelihood(tmp_path / "a")


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    lines = long_table().write_csv().encode().split(b"\n")
    assert lines[4].startswith(b"2,a,")
    lines[4] = b"2,\xe9a," + lines[4][4:]  # latin-1 e-acute in the item of line 5
    (tmp_path / "d.csv").write_bytes(b"\n".join(lines))
    line = error_line(fit(tmp_path / "d.csv", tmp_path / "m")).replace(str(tmp_path), "<tmp>")
    assert line == (
        "Error: <tmp>/d.csv: line 5 is not UTF-8 text (byte 0xe9 at column 3); save the file "
        "as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE)"
    )


def test_the_line_is_found_across_read_chunks(monkeypatch):
    monkeypatch.setattr(choice_io, "READ_CHUNK_BYTES", 4)
    raw = "a\nxé,1\nz,".encode() + b"\xe9\n"  # the first chunk ends inside the two bytes of é
    error = choice_io._encoding_error(raw, "t.csv")
    assert isinstance(error, DataError)
    assert str(error).startswith("t.csv: line 3 is not UTF-8 text (byte 0xe9 at column 3)")
    split = choice_io._encoding_error(b"a\nx\xc3,1\n", "t.csv")  # a character cut short
    assert str(split).startswith("t.csv: line 2 is not UTF-8 text (byte 0xc3 at column 2)")
    assert choice_io._encoding_error("a,é\n".encode() * 5, "t.csv") is None


def test_names_in_backticks_are_literal_and_a_bare_exact_name_is_found(tmp_path):
    frame = (
        long_table()
        .rename({"price": "travel time [min]"})
        .with_columns(x1=pl.col("session") % 7, **{"x[1]": pl.col("session") % 5})
    )
    path = write(frame, tmp_path / "d.csv")
    result = fit(path, tmp_path / "m", formula="(`travel time [min]`|constant) + (1|item)")
    assert result.exit_code == 0, result.stderr
    assert "travel time [min][constant]" in result.stderr
    predicted = invoke("predict", path, "-m", tmp_path / "m", "-o", "-")
    assert predicted.exit_code == 0, predicted.stderr
    terms = parse_formula("(`x[1]`|item) + (x[1]|constant) + (`x_*`|user)")
    assert [(t.literal, t.is_glob) for t in terms] == [(True, False), (False, True), (True, False)]
    columns, roles = frame.columns, ["case", "item", "choice"]
    assert resolve_features(terms[0], columns, roles, "t") == ["x[1]"]
    assert resolve_features(terms[1], columns, roles, "t") == ["x1"]  # a glob that matches
    bare = parse_formula("(`travel time [min]`|item)")[0]
    assert resolve_features(bare, columns, roles, "t") == ["travel time [min]"]
    with pytest.raises(FormulaError, match="unknown column 'x_\\*' in term x_\\*\\[user\\]"):
        resolve_features(terms[2], columns, roles, "t")


# --------------------------------------------------------------------------------------------
# Item 8: files that are no table, devices, FIFOs and endless streams
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x1f\x8b\x08\x00rest", "is a gzip-compressed file, not a CSV or Parquet table; "
                                  "decompress it first (zcat FILE | choice ... -)"),
        (b"PK\x03\x04rest", "is a zip archive (or an Excel workbook)"),
        (b"\xff\xfec\x00a\x00", "is UTF-16 text, not a CSV or Parquet table; save it as UTF-8"),
        (b"case,item\x00\x01\x02", "holds NUL bytes, so it is a binary file"),
    ],
)  # fmt: skip
def test_a_file_that_is_no_table_says_what_it_is(tmp_path, raw, expected):
    (tmp_path / "d.csv").write_bytes(raw)
    error_line(fit(tmp_path / "d.csv", tmp_path / "m"), expected, strip=tmp_path)


def test_a_device_is_refused_at_once():
    result = fit(Path("/dev/zero"), Path("/nonexistent/m"), "--input-format", "csv")
    line = error_line(result)
    assert line == (
        "Error: /dev/zero: is a device (a terminal, /dev/zero, ...), not a Parquet or CSV file; "
        "give a file, or - to read standard input"
    )


def _feed(path: Path, payload: bytes | None, endless: bool = False) -> threading.Thread:
    """Open the FIFO for writing in a thread and write `payload` (or blocks for ever)."""

    def write_all() -> None:
        try:
            with path.open("wb") as handle:
                while True:
                    handle.write(payload)
                    if not endless:
                        return
        except BrokenPipeError:  # the reader stopped: as it should
            return

    thread = threading.Thread(target=write_all, daemon=True)
    thread.start()
    return thread


def test_a_fifo_is_read_to_its_end_and_one_nobody_writes_to_is_given_up(tmp_path, monkeypatch):
    fifo = tmp_path / "d.csv"
    os.mkfifo(fifo)
    writer = _feed(fifo, long_table().write_csv().encode())
    frame, _ = choice_io.read_table(str(fifo))
    writer.join(5)
    assert frame.height == 72 and frame.columns == long_table().columns
    monkeypatch.setattr(choice_io, "FIFO_WAIT_SECONDS", 0.2)
    with pytest.raises(DataError, match="no program wrote to this FIFO within 0.2 s"):
        choice_io.read_table(str(fifo))


def test_an_endless_stream_is_stopped_at_the_limit(tmp_path, monkeypatch):
    fifo = tmp_path / "d.csv"
    os.mkfifo(fifo)
    monkeypatch.setattr(choice_io, "STREAM_LIMIT_BYTES", 1 << 20)
    writer = _feed(fifo, b"1,2,3\n" * 1000, endless=True)
    with pytest.raises(DataError, match="more than 0.000977 GiB came in without an end"):
        choice_io.read_table(str(fifo))
    writer.join(5)


def test_subprocess_reads_a_fifo_and_names_a_device_and_a_separator(tmp_path):
    """The installed command on real files: exit codes and the one stderr line."""
    fifo = tmp_path / "d.csv"
    os.mkfifo(fifo)
    writer = _feed(fifo, long_table().write_csv().encode())
    common = ["--formula", "(price|constant) + (1|item)", "--device", "cpu", "-q"]
    done = subprocess.run([CHOICE, "fit", fifo, "-m", tmp_path / "m", *common],
                          capture_output=True, env=subprocess_env(), timeout=120)  # fmt: skip
    writer.join(5)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "m" / "model.json").read_text())["fit"]["n_cases"] == 24
    device = subprocess.run([CHOICE, "fit", "/dev/zero", "--input-format", "csv", "-m",
                             tmp_path / "z", *common], capture_output=True,
                            env=subprocess_env(), timeout=120)  # fmt: skip
    assert device.returncode == 1 and not (tmp_path / "z").exists()
    assert device.stderr.decode().splitlines() == [
        "Error: /dev/zero: is a device (a terminal, /dev/zero, ...), not a Parquet or CSV file; "
        "give a file, or - to read standard input"
    ]
    long_table().write_csv(tmp_path / "semi.csv", separator=";")
    semi = subprocess.run([CHOICE, "fit", "semi.csv", "-m", "s", *common], cwd=tmp_path,
                          capture_output=True, env=subprocess_env(), timeout=120)  # fmt: skip
    assert semi.returncode == 1 and not (tmp_path / "s").exists()
    assert semi.stderr.decode().splitlines() == [
        "Error: semi.csv: the file reads as one column named "
        "'case;item;choice;price;user;session', whose header holds ';'; pass --separator ';' "
        "to split it there"
    ]
    bad = subprocess.run([CHOICE, "fit", "semi.csv", "-m", "s", "--tol", "nan", *common],
                         cwd=tmp_path, capture_output=True, env=subprocess_env(),
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.decode().splitlines() == ["Error: --tol must be a positive number, not nan"]


def test_predict_outputs_a_column_in_two_roles_once(table, tmp_path):
    """Found by the property test: --user case made predict select the column twice."""
    assert fit(table, tmp_path / "m", "--user", "case").exit_code == 0
    result = invoke("predict", table, "-m", tmp_path / "m", "-o", "-")
    assert result.exit_code == 0, result.stderr
    header = result.stdout.splitlines()[0]
    assert header == "case,item,choice,utility,probability,predicted"


def test_a_parquet_file_named_csv_and_a_csv_named_parquet_say_which_format_to_pass(tmp_path):
    long_table().write_parquet(tmp_path / "d.csv")
    error_line(fit(tmp_path / "d.csv", tmp_path / "m"), "d.csv: holds Parquet, not CSV; pass "
               "--input-format parquet, or name it .parquet", strip=tmp_path)  # fmt: skip
    assert fit(tmp_path / "d.csv", tmp_path / "m", "--input-format", "parquet").exit_code == 0
    long_table().write_csv(tmp_path / "e.parquet")
    error_line(fit(tmp_path / "e.parquet", tmp_path / "n"), "e.parquet: is text, not a Parquet "
               "file; pass --input-format csv, or name it .csv", strip=tmp_path)  # fmt: skip
    assert fit(tmp_path / "e.parquet", tmp_path / "n", "--input-format", "csv").exit_code == 0
