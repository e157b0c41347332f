"""One function per subcommand: read inputs, call the library, write outputs, render.

Kept apart from cli.py so every command runs (and is tested) without Typer.
"""

from __future__ import annotations

import datetime as dt
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from rich.console import Console

from choicecli import __version__
from choicecli.errors import FormulaError, UsageError

EXIT_NOT_CONVERGED = 3


@dataclass(frozen=True)
class FitRequest:
    data: str
    formula: str
    nests: str | None
    nest_formula: str
    shared_lambda: bool
    lambda_init: float
    lambda_fixed: bool
    lambda_bounds: str | None
    roles: dict
    base: str | None
    missing: str
    input_format: str | None
    model: Path
    device: str
    method: str
    max_iter: int
    tol: float
    l2: float
    strict: bool
    argv: list[str]
    threads: int | None = None


def versions() -> dict[str, str]:
    import pyarrow
    import torch

    return {
        "choice": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "polars": pl.__version__,
        "pyarrow": pyarrow.__version__,
    }


def _bounds(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--lambda-bounds must be LOW,HIGH (e.g. 0.01,1), not {text!r}") from None
    if not 0 < low < high:
        raise UsageError(f"--lambda-bounds needs 0 < LOW < HIGH, got {text!r}")
    return low, high


def run_fit(request: FitRequest, console: Console) -> int:
    """Fit, report, save; returns the exit code (0, or 3 when not converged)."""
    from choicecli.data import Roles
    from choicecli.estimate import EstimateOptions
    from choicecli.fit import FitOptions, fit_model
    from choicecli.io import clean_stale_temporaries, read_table
    from choicecli.problem import ModelSpec, table_columns
    from choicecli.report import estimate_warnings, fit_summary

    if request.max_iter < 1 or request.tol <= 0 or request.l2 < 0:
        raise UsageError("--max-iter must be >= 1, --tol > 0 and --l2 >= 0")
    if request.lambda_init <= 0:
        raise UsageError(f"--lambda-init must be positive, not {request.lambda_init}")
    clean_stale_temporaries(request.model)
    spec = ModelSpec(
        formula=request.formula,
        roles=Roles(**request.roles),
        nest_formula=request.nest_formula,
        nests=request.nests,
        shared_lambda=request.shared_lambda,
        lambda_init=request.lambda_init,
        lambda_fixed=request.lambda_fixed,
        lambda_bounds=_bounds(request.lambda_bounds),
        base=request.base,
        missing=request.missing,
    )
    # only the columns the model reads; fit_model takes the frame over (the data is held once)
    frame, digest = read_table(
        request.data, request.input_format, select=lambda columns: table_columns(spec, columns)
    )
    options = FitOptions(
        estimate=EstimateOptions(
            method=request.method,
            max_iterations=request.max_iter,
            tolerance=request.tol,
            l2_penalty=request.l2,
        ),
        device=request.device,
        strict=request.strict,
    )
    where = "<stdin>" if request.data == "-" else request.data
    if request.threads is not None:
        import torch

        if request.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {request.threads}")
        torch.set_num_threads(request.threads)
    if console.is_terminal and not console.quiet:
        with console.status("fitting ...") as status:

            def progress(iteration: int, value: float, norm: float) -> None:
                status.update(f"iteration {iteration}: log-likelihood {value:.6f}")

            result, _ = fit_model(
                frame, spec, options, where=where, progress=progress, consume=True
            )
    else:
        result, _ = fit_model(frame, spec, options, where=where, consume=True)
    result.provenance = {
        "input": str(Path(request.data).resolve()) if request.data != "-" else "-",
        "input_sha256": digest,
        "versions": versions(),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(request.argv),  # runnable as is
    }
    table = result.coefficient_table()
    result.warnings.extend(estimate_warnings(table, result.spec))
    result.save(request.model)
    for warning in result.warnings:
        console.print(
            f"Warning: {warning}", markup=False, highlight=False, style="yellow", soft_wrap=True
        )
    print_lines(console, fit_summary(result, console_width(console), table))
    console.print(f"model written to {request.model}/", highlight=False, soft_wrap=True)
    return 0 if result.fit["converged"] else EXIT_NOT_CONVERGED


def print_lines(console: Console, lines: list) -> None:
    """Print laid-out lines as they are: no wrapping, no padding, no highlighting."""
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False, markup=False)


def console_width(console: Console) -> int | None:
    from choicecli.report import text_width

    return text_width(console.is_terminal, console.width)


def plain_console(stream=None) -> Console:
    """A console for stdout (or `stream`): styles only on a terminal without NO_COLOR."""
    import os

    colour = None if os.environ.get("NO_COLOR") else "auto"
    return Console(file=stream, color_system=colour, highlight=False)


def warn_if_unreliable(result, console: Console | None) -> None:
    """One stderr line when a model did not converge or was fitted with warnings."""
    from choicecli.report import loaded_model_warning

    line = loaded_model_warning(result)
    if line and console is not None:
        console.print(line, style="yellow", soft_wrap=True, highlight=False, markup=False)


def select_terms(table: pl.DataFrame, term: str | None, level: str | None) -> pl.DataFrame:
    """Rows of one term at a level, or every term at a level, or all rows (level None).

    A term without a level is looked up at the item level, then the nest level. An unknown term
    or level says what the model has at each level.
    """
    from choicecli.report import unknown_term_message

    nested = (table.get_column("term") == "lambda").any()
    if level == "nest" and not nested and not (table.get_column("level") == "nest").any():
        asked = f"term {term!r} at level nest" if term else "--level nest"
        raise FormulaError(f"{asked}: {unknown_term_message(table, None, 'nest')}")
    if term is None:
        return table if level is None else table.filter(pl.col("level") == level)
    if term == "lambda":
        chosen = table.filter(pl.col("term") == "lambda")
    else:
        levels = [level] if level else ["item", "nest"]
        chosen = table.filter(pl.col("term") == term)
        for candidate in levels:
            at_level = chosen.filter(pl.col("level") == candidate)
            if at_level.height:
                chosen = at_level
                break
        else:
            chosen = chosen.clear()
    if chosen.height == 0:
        raise FormulaError(unknown_term_message(table, term, level or "item"))
    return chosen


def run_coef(
    term: str | None,
    level: str | None,
    model: Path,
    fmt: str | None,
    output: str,
    console: Console | None = None,
) -> None:
    from choicecli.io import atomic_file, output_format, write_table
    from choicecli.report import coefficient_lines
    from choicecli.results import COEFFICIENTS_FILE, load_result

    result = load_result(model)
    warn_if_unreliable(result, console)
    table = select_terms(_read_coefficients(model / COEFFICIENTS_FILE, result), term, level)
    if fmt is None and output == "-":
        fmt = "table" if sys.stdout.isatty() else "csv"
    fmt = output_format(output, fmt, "csv")
    if fmt == "table":
        if output == "-":
            screen = plain_console()
            print_lines(screen, coefficient_lines(table, console_width(screen)))
            return
        text = "\n".join(line.plain for line in coefficient_lines(table)) + "\n"
        with atomic_file(Path(output)) as temp:  # a file: plain text, no width limit
            temp.write_text(text)
        return
    if fmt == "json":
        import json

        document = {**_model_state(result), "coefficients": table.to_dicts()}
        _write_text(json.dumps(document, indent=2, default=str) + "\n", output)
        return
    if fmt == "parquet" and output == "-":
        import io

        buffer = io.BytesIO()
        table.write_parquet(buffer)
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.flush()
        return
    write_table(table, output, fmt, {"choice.formula": result.spec["formula"]})


def _model_state(result) -> dict:
    """What JSON outputs say about the model they came from."""
    return {"converged": bool(result.fit.get("converged")), "warnings": list(result.warnings)}


def _write_text(text: str, output: str) -> None:
    from choicecli.io import atomic_file

    if output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    with atomic_file(Path(output)) as temp:
        temp.write_text(text)


def _read_coefficients(path: Path, result) -> pl.DataFrame:
    """coefficients.parquet, checked against the model's parameter list."""
    from choicecli.errors import ArtifactError

    try:
        table = pl.read_parquet(path)
    except Exception as exc:
        raise ArtifactError(f"{path}: missing or damaged ({exc}); refit the model") from exc
    if table.height != len(result.parameters):
        raise ArtifactError(f"{path}: does not match model.json; refit the model")
    return table


@dataclass(frozen=True)
class PredictRequest:
    data: str
    model: Path
    output: str
    format: str | None
    shares: bool
    by: str | None
    unseen: str
    roles: dict
    input_format: str | None
    batch_cases: int


def run_predict(request: PredictRequest, console: Console) -> None:
    from choicecli.io import output_format, read_table, scan_table, write_table
    from choicecli.predict import predict_frame, share_table
    from choicecli.results import load_result

    if request.unseen not in ("error", "zero"):
        raise UsageError(f"--unseen must be error or zero, not {request.unseen!r}")
    if request.batch_cases < 1:
        raise UsageError("--batch-cases must be at least 1")
    result = load_result(request.model)
    warn_if_unreliable(result, console)
    frame, digest = scan_table(request.data, request.input_format)  # Parquet: read in batches
    if frame is None:
        frame, digest = read_table(request.data, request.input_format)
    where = "<stdin>" if request.data == "-" else request.data
    overrides = {k: v for k, v in request.roles.items() if v is not None}
    scored, report = predict_frame(
        result, frame, where=where, roles=overrides, unseen=request.unseen,
        batch_cases=request.batch_cases,
        extra_columns=(request.by,) if request.by else (),
    )  # fmt: skip
    if report:
        console.print(
            f"log-likelihood {report['log_likelihood']:.4f} over {report['n_cases']:,} cases "
            f"(per case {report['mean_log_likelihood']:.4f}), hit rate {report['hit_rate']:.4f}, "
            f"equal-shares log-likelihood {report['null_log_likelihood']:.4f}",
            highlight=False,
            soft_wrap=True,
        )
    table = share_table(scored, result, request.by) if request.shares else scored
    fmt = output_format(
        request.output, request.format, "csv" if request.output == "-" else "parquet"
    )
    metadata = {
        "choice.model": str(request.model),
        "choice.formula": result.spec["formula"],
        "choice.input_sha256": digest,
        "choice.versions": str(versions()),
    }
    if fmt == "json":
        import json

        document = {**_model_state(result), "report": report or None, "rows": table.to_dicts()}
        _write_text(json.dumps(document, indent=2, default=str) + "\n", request.output)
        return
    if fmt == "parquet" and request.output == "-":
        raise UsageError("parquet cannot go to stdout here; use -o FILE.parquet or --format csv")
    write_table(table, request.output, fmt, metadata)


def run_plot(
    term: str | None,
    level: str | None,
    model: Path,
    output: Path,
    shares: Path | None,
    dpi: int,
    title: str | None,
    console: Console | None = None,
) -> None:
    from choicecli import plot
    from choicecli.io import read_table
    from choicecli.results import COEFFICIENTS_FILE, load_result

    if dpi < 10 or dpi > 1200:
        raise UsageError(f"--dpi must be between 10 and 1200, not {dpi}")
    if shares is not None:
        frame, _ = read_table(str(shares))
        plot.draw_shares(
            frame, output, title=f"Shares: {shares.name}" if title is None else title, dpi=dpi
        )
        return
    result = load_result(model)
    warn_if_unreliable(result, console)
    table = _read_coefficients(model / COEFFICIENTS_FILE, result)
    if term is None and level is not None:  # a forest plot of one level
        table = select_terms(table, None, level)
    plot.draw_coefficients(
        table,
        term,
        level or "item",
        output,
        title=result.spec["formula"] if title is None else title,
        dpi=dpi,
    )
