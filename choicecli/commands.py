"""One function per subcommand: read inputs, call the library, write outputs, render.

Kept apart from cli.py so every command runs (and is tested) without Typer.
"""

from __future__ import annotations

import datetime as dt
import functools
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from rich.console import Console

from choicecli import __version__
from choicecli.errors import FormulaError, UsageError

if TYPE_CHECKING:
    from choicecli.estimate import Iteration

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
    verbose: bool = False  # one line per iteration on stderr, terminal or not


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
    from choicecli.io import read_table
    from choicecli.modeldir import prepare_fit
    from choicecli.problem import ModelSpec, table_columns
    from choicecli.report import fit_summary

    if request.max_iter < 1 or request.tol <= 0 or request.l2 < 0:
        raise UsageError("--max-iter must be >= 1, --tol > 0 and --l2 >= 0")
    if request.lambda_init <= 0:
        raise UsageError(f"--lambda-init must be positive, not {request.lambda_init}")
    prepare_fit(request.model, inputs=[request.data])  # the model directory is ours to replace
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

            def progress(iteration: Iteration) -> None:
                status.update(
                    f"{iteration.method} iteration {iteration.number}: log-likelihood "
                    f"{iteration.log_likelihood:.6f} ({iteration.seconds:.1f} s)"
                )
                if request.verbose:
                    _say_iteration(console, iteration)

            result, _ = fit_model(
                frame, spec, options, where=where, progress=progress, consume=True
            )
    else:
        verbose = None
        if request.verbose:
            verbose = functools.partial(_say_iteration, console)
        result, _ = fit_model(frame, spec, options, where=where, progress=verbose, consume=True)
    result.provenance = {
        "input": str(Path(request.data).resolve()) if request.data != "-" else "-",
        "input_sha256": digest,
        "versions": versions(),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(request.argv),
    }
    result.save(request.model)
    for warning in result.warnings:
        console.print(
            f"Warning: {warning}", markup=False, highlight=False, style="yellow", soft_wrap=True
        )
    console.print(fit_summary(result))
    console.print(f"model written to {request.model}/", highlight=False)
    return 0 if result.fit["converged"] else EXIT_NOT_CONVERGED


def _say_iteration(console: Console, iteration: Iteration) -> None:
    """--verbose: one line per iteration (Newton: decrement; L-BFGS: largest |gradient|)."""
    measure = "decrement" if iteration.method.startswith("newton") else "gradient"
    console.print(
        f"{iteration.method} iteration {iteration.number}: log-likelihood "
        f"{iteration.log_likelihood:.6f}  {measure} {iteration.decrement:.3e}  step "
        f"{iteration.step:.3g}  {iteration.seconds:.2f} s",
        markup=False, highlight=False, soft_wrap=True,
    )  # fmt: skip


def select_terms(table: pl.DataFrame, term: str | None, level: str) -> pl.DataFrame:
    """Rows of one term (at a level), or all rows; an unknown term lists the known ones."""
    if term is None:
        return table
    if term == "lambda":
        chosen = table.filter(pl.col("term") == "lambda")
    else:
        chosen = table.filter((pl.col("term") == term) & (pl.col("level") == level))
    if chosen.height == 0:
        known = (
            table.filter(pl.col("level") == level).get_column("term").unique(maintain_order=True)
        )
        other = "nest" if level == "item" else "item"
        elsewhere = table.filter((pl.col("term") == term) & (pl.col("level") == other)).height
        hint = f" (it exists at --level {other})" if elsewhere else ""
        raise FormulaError(
            f"unknown term {term!r} at level {level}{hint}; the model's terms are: "
            f"{', '.join(known.to_list())}"
        )
    return chosen


def run_coef(term: str | None, level: str, model: Path, fmt: str | None, output: str) -> None:
    from choicecli.loader import load_result
    from choicecli.output import check_destination, output_format, write_table
    from choicecli.report import coefficient_renderable

    if fmt is None and output == "-":
        fmt = "table" if sys.stdout is not None and sys.stdout.isatty() else "csv"
    fmt = output_format(output, fmt, "csv")
    if fmt == "table" and output != "-":
        raise UsageError("--format table prints to the terminal; use csv, json or parquet")
    check_destination(output)
    result = load_result(model)
    table = select_terms(result.coefficient_table(), term, level)
    if fmt == "table":
        Console().print(coefficient_renderable(table))
        return
    write_table(table, output, fmt, {"choice.formula": result.spec["formula"]})


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
    from choicecli.io import read_table, scan_table
    from choicecli.loader import load_result
    from choicecli.output import check_destination, output_format, write_table, write_text
    from choicecli.predict import predict_frame, share_table

    if request.unseen not in ("error", "zero"):
        raise UsageError(f"--unseen must be error or zero, not {request.unseen!r}")
    if request.batch_cases < 1:
        raise UsageError("--batch-cases must be at least 1")
    fmt = output_format(
        request.output, request.format, "csv" if request.output == "-" else "parquet"
    )
    if fmt == "parquet" and request.output == "-":
        raise UsageError("parquet cannot go to stdout here; use -o FILE.parquet or --format csv")
    check_destination(request.output)
    result = load_result(request.model)
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
    _check_scores(scored, request.model)
    if report:
        console.print(
            f"log-likelihood {report['log_likelihood']:.4f} over {report['n_cases']} cases "
            f"(per case {report['mean_log_likelihood']:.4f}), hit rate {report['hit_rate']:.4f}, "
            f"equal-shares log-likelihood {report['null_log_likelihood']:.4f}",
            highlight=False,
        )
    table = share_table(scored, result, request.by) if request.shares else scored
    metadata = {
        "choice.model": str(request.model),
        "choice.formula": result.spec["formula"],
        "choice.input_sha256": digest,
        "choice.versions": str(versions()),
    }
    if fmt == "json" and report:
        import json

        document = {"report": report, "rows": table.to_dicts()}
        text = json.dumps(document, indent=2, default=str) + "\n"
        write_text(request.output, text)
        return
    write_table(table, request.output, fmt, metadata)


def _check_scores(scored: pl.DataFrame, model: Path) -> None:
    """Every probability a number: a model whose estimates overflow on this data says so."""
    from choicecli.errors import DataError

    bad = scored.get_column("probability").is_nan() | scored.get_column("utility").is_infinite()
    if bool(bad.any()):
        raise DataError(
            f"the model in {model} gives no finite utility for {int(bad.sum())} rows of this "
            "data (its estimates times these values overflow); check the data's scale"
        )


def run_plot(
    term: str | None,
    level: str,
    model: Path,
    output: Path,
    shares: Path | None,
    dpi: int,
    title: str | None,
) -> None:
    from choicecli import plot
    from choicecli.io import read_table
    from choicecli.loader import load_result
    from choicecli.output import chart_format, check_destination

    if dpi < 10 or dpi > 1200:
        raise UsageError(f"--dpi must be between 10 and 1200, not {dpi}")
    chart_format(output)  # png, svg or pdf by the suffix; anything else is a usage error
    check_destination(output)
    if shares is not None:
        frame, _ = read_table(str(shares))
        plot.draw_shares(frame, output, title=title or f"Shares: {shares.name}", dpi=dpi)
        return
    result = load_result(model)
    plot.draw_coefficients(
        result.coefficient_table(), term, level, output, title=title or result.spec["formula"],
        dpi=dpi,
    )  # fmt: skip
