"""One function per subcommand: read inputs, call the library, write outputs, render.

Kept apart from cli.py so every command runs (and is tested) without Typer.
"""

from __future__ import annotations

import datetime as dt
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from rich.console import Console

from choicecli import __version__
from choicecli.errors import FormulaError, UsageError

EXIT_NOT_CONVERGED = 3
MAX_ITERATIONS = 1_000_000


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
    separator: str | None = None
    # mixed logit: --random TERM=DISTRIBUTION (repeatable) and how to draw
    random: tuple[str, ...] = ()
    draws: int | None = None
    draw_kind: str | None = None
    seed: int | None = None
    correlated: bool = False
    draw_batch: int | None = None


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
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low < high):
        raise UsageError(f"--lambda-bounds needs finite numbers 0 < LOW < HIGH, got {text!r}")
    return low, high


def check_fit_options(request: FitRequest) -> None:
    """Option values no data can make right: a usage error (exit 2) before the data is read."""
    from choicecli.data import Roles
    from choicecli.io import csv_separator

    if not 1 <= request.max_iter <= MAX_ITERATIONS:
        raise UsageError(
            f"--max-iter must be between 1 and {MAX_ITERATIONS:,}, not {request.max_iter:.6g}"
        )
    if not (math.isfinite(request.tol) and request.tol > 0):
        raise UsageError(f"--tol must be a positive number, not {request.tol:.6g}")
    if not (math.isfinite(request.l2) and request.l2 >= 0):
        raise UsageError(f"--l2 must be 0 or a positive number, not {request.l2:.6g}")
    if not (math.isfinite(request.lambda_init) and request.lambda_init > 0):
        raise UsageError(f"--lambda-init must be a positive number, not {request.lambda_init:.6g}")
    if request.threads is not None and request.threads < 1:
        raise UsageError(f"--threads must be at least 1, not {request.threads:.6g}")
    _bounds(request.lambda_bounds)
    Roles(**request.roles).check_distinct()
    csv_separator(request.separator)
    random_terms(request)


def random_terms(request: FitRequest) -> tuple[tuple[str, str], ...]:
    """--random TERM=DISTRIBUTION pairs, checked with the draw options (a usage error)."""
    from choicecli.draws import DISTRIBUTIONS, DRAW_KINDS

    pairs = []
    for text in request.random:
        term, _, distribution = text.rpartition("=")
        if not term.strip() or not distribution.strip():
            raise UsageError(
                f"--random must be TERM=DISTRIBUTION (e.g. 'price[constant]=normal'), not {text!r}"
            )
        if distribution.strip() not in DISTRIBUTIONS:
            raise UsageError(
                f"--random {text}: unknown distribution {distribution.strip()!r}; use one of "
                f"{', '.join(DISTRIBUTIONS)}"
            )
        pairs.append((term.strip(), distribution.strip()))
    terms = [term for term, _ in pairs]
    repeated = [term for term in terms if terms.count(term) > 1]
    if repeated:
        raise UsageError(f"--random names {repeated[0]} twice; give each term once")
    drawing = {
        "--draws": request.draws, "--draw-kind": request.draw_kind, "--seed": request.seed,
        "--correlated": request.correlated or None, "--draw-batch": request.draw_batch,
    }  # fmt: skip
    given = [name for name, value in drawing.items() if value is not None]
    if given and not pairs:
        raise UsageError(f"{given[0]} applies to a mixed logit; add --random TERM=DISTRIBUTION")
    if pairs and request.l2:
        raise UsageError("--l2 is not supported by the mixed logit yet; drop --l2 or --random")
    if pairs and request.method != "auto":
        raise UsageError(
            f"--method {request.method} does not apply to the mixed logit (it takes L-BFGS, "
            "then Newton steps with the exact Hessian); drop --method"
        )
    if request.draws is not None and request.draws < 1:
        raise UsageError(f"--draws must be at least 1, not {request.draws}")
    if request.draw_batch is not None and request.draw_batch < 1:
        raise UsageError(f"--draw-batch must be at least 1, not {request.draw_batch}")
    if request.seed is not None and request.seed < 0:
        raise UsageError(f"--seed must be 0 or more, not {request.seed}")
    if request.draw_kind is not None and request.draw_kind not in DRAW_KINDS:
        raise UsageError(
            f"--draw-kind must be one of {', '.join(DRAW_KINDS)}, not {request.draw_kind!r}"
        )
    return tuple(pairs)


def run_fit(request: FitRequest, console: Console) -> int:
    """Fit, report, save; returns the exit code (0, or 3 when not converged)."""
    from choicecli.data import Roles
    from choicecli.estimate import EstimateOptions
    from choicecli.fit import FitOptions, fit_model
    from choicecli.io import read_table
    from choicecli.modeldir import prepare_fit
    from choicecli.problem import ModelSpec, table_columns
    from choicecli.report import fit_summary

    check_fit_options(request)
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
        **_mixed_fields(request),
    )
    # only the columns the model reads; fit_model takes the frame over (the data is held once)
    frame, digest = read_table(
        request.data,
        request.input_format,
        select=lambda columns: table_columns(spec, columns),
        separator=request.separator,
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
        draw_batch=request.draw_batch,
    )
    where = "<stdin>" if request.data == "-" else request.data
    if request.threads is not None:
        import torch

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


def _mixed_fields(request: FitRequest) -> dict:
    """The ModelSpec fields of a mixed logit (none without --random)."""
    from choicecli.draws import DEFAULT_DRAWS

    random = random_terms(request)
    if not random:
        return {}
    return {
        "random": random,
        "correlated": request.correlated,
        "draws": request.draws or DEFAULT_DRAWS,
        "draw_kind": request.draw_kind or "halton",
        "seed": request.seed or 0,
    }


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
    separator: str | None = None


def run_predict(request: PredictRequest, console: Console) -> None:
    from choicecli.io import csv_separator, read_table, scan_table
    from choicecli.loader import load_result
    from choicecli.output import check_destination, output_format, write_table, write_text
    from choicecli.predict import predict_frame, share_table

    if request.unseen not in ("error", "zero"):
        raise UsageError(f"--unseen must be error or zero, not {request.unseen!r}")
    if request.batch_cases < 1:
        raise UsageError(f"--batch-cases must be at least 1, not {request.batch_cases:.6g}")
    csv_separator(request.separator)
    fmt = output_format(
        request.output, request.format, "csv" if request.output == "-" else "parquet"
    )
    if fmt == "parquet" and request.output == "-":
        raise UsageError("parquet cannot go to stdout here; use -o FILE.parquet or --format csv")
    check_destination(request.output)
    result = load_result(request.model)
    frame, digest = scan_table(request.data, request.input_format)  # Parquet: read in batches
    if frame is None:
        frame, digest = read_table(request.data, request.input_format, separator=request.separator)
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
