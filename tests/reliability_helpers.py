"""Shared builders and assertions for the reliability, artifact and property tests.

Everything here is small and deterministic: long tables of tens of cases built from integer
arithmetic (no random generator), the real CLI run in-process through Typer's CliRunner (stderr
kept apart from stdout), and helpers that snapshot a directory byte for byte.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import polars as pl
from typer.testing import CliRunner, Result

from choicecli.cli import app

PYTHON = Path(sys.executable)
CHOICE = PYTHON.parent / "choice"
FORMULA = "(price|constant) + (1|item)"
ITEMS = ("a", "b", "c")
# The environment every in-process and subprocess run starts from: no colour, no debug switch,
# no default model directory leaking in from the caller's shell.
CLEAN_ENV = {"NO_COLOR": "1", "CHOICE_DEBUG": None, "CHOICE_MODEL": None, "COLUMNS": "120"}


def long_table(n_cases: int = 24, items: tuple = ITEMS, n_users: int = 6) -> pl.DataFrame:
    """One row per (case, item), sorted by case then item; cases 1..n_cases.

    price varies across the alternatives of a case and is informative but not a perfect
    predictor; every alternative is chosen at least once; users u0..u{n_users-1} have several
    cases each; session = case * 10 (constant within case).
    """
    n_items = len(items)
    case = np.repeat(np.arange(1, n_cases + 1), n_items)
    position = np.tile(np.arange(n_items), n_cases)
    price = ((case * 37 + position * 11) % 17) / 4.0 + position * 0.5  # (R,)
    chosen_position = (np.arange(1, n_cases + 1) * 5 + np.arange(1, n_cases + 1) // 4) % n_items
    choice = (position == np.repeat(chosen_position, n_items)).astype(np.int64)
    user = np.array([f"u{(c - 1) % n_users}" for c in case])
    return pl.DataFrame(
        {
            "case": case.astype(np.int64),
            "item": np.array(items)[position],
            "choice": choice,
            "price": price,
            "user": user,
            "session": (case * 10).astype(np.int64),
        }
    )


def set_cells(frame: pl.DataFrame, column: str, where: pl.Expr, value) -> pl.DataFrame:
    """Replace `column` by `value` on the rows matching `where` (value may be None)."""
    return frame.with_columns(
        pl.when(where).then(pl.lit(value)).otherwise(pl.col(column)).alias(column)
    )


def write(frame: pl.DataFrame, path: Path) -> Path:
    """Write a frame as CSV or Parquet according to the suffix."""
    if path.suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path)
    return path


def invoke(*args, env: dict | None = None, input: bytes | str | None = None) -> Result:
    """Run the real Typer app in-process; result.stdout and result.stderr are separate."""
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], env={**CLEAN_ENV, **(env or {})}, input=input)


def fit(data: Path, model: Path, *extra, formula: str = FORMULA) -> Result:
    return invoke("fit", data, "--formula", formula, "--model", model, "--device", "cpu", *extra)


def error_line(result: Result, *needles, code: int = 1, strip: str | Path | None = None) -> str:
    """Assert a clean failure: the exit code, exactly one 'Error:' line on stderr holding every
    needle (str: substring, re.Pattern: search), nothing on stdout, no traceback anywhere."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{result.stderr}"
    line = lines[0]
    assert line.startswith("Error: "), line
    # Paths under pytest's tmp dir hold digits (pytest-7/...): keep them out of count checks.
    shown = line.replace(str(strip), "<tmp>") if strip is not None else line
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(shown), f"{needle.pattern!r} not in {shown!r}"
        else:
            assert needle in shown, f"{needle!r} not in {shown!r}"
    return line


def warning_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> bytes); {} when it does not exist."""
    directory = Path(directory)
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def listing(directory: Path) -> list[str]:
    return sorted(path.name for path in Path(directory).iterdir())


def leftovers(model: Path) -> list[str]:
    """Temporaries a write of `model` leaves beside it: .NAME.*.tmp and .NAME.*.old."""
    model = Path(model)
    if not model.parent.exists():
        return []
    found = list(model.parent.glob(f".{model.name}.*.tmp"))
    found += list(model.parent.glob(f".{model.name}.*.old"))
    return sorted(path.name for path in found)


def model_document(model: Path) -> dict:
    return json.loads((Path(model) / "model.json").read_text())


def coefficients(model: Path) -> pl.DataFrame:
    return pl.read_parquet(Path(model) / "coefficients.parquet")


def subprocess_env() -> dict[str, str]:
    """The caller's environment without the choice switches, and without colour."""
    env = {k: v for k, v in os.environ.items() if k not in ("CHOICE_DEBUG", "CHOICE_MODEL")}
    env["NO_COLOR"] = "1"
    return env
