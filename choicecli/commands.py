"""One function per subcommand: read inputs, call the library, write outputs, render.

Kept apart from cli.py so every command runs (and is tested) without Typer.
"""

from __future__ import annotations

import datetime as dt
import platform
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
    from choicecli.report import fit_summary

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
    from choicecli.io import output_format, write_table
    from choicecli.report import coefficient_renderable
    from choicecli.results import COEFFICIENTS_FILE, load_result

    result = load_result(model)
    table = select_terms(_read_coefficients(model / COEFFICIENTS_FILE, result), term, level)
    if fmt is None and output == "-":
        fmt = "table" if sys.stdout.isatty() else "csv"
    fmt = output_format(output, fmt, "csv")
    if fmt == "table":
        if output != "-":
            raise UsageError("--format table prints to the terminal; use csv, json or parquet")
        Console().print(coefficient_renderable(table))
        return
    if fmt == "parquet" and output == "-":
        import io

        buffer = io.BytesIO()
        table.write_parquet(buffer)
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.flush()
        return
    write_table(table, output, fmt, {"choice.formula": result.spec["formula"]})


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
            f"log-likelihood {report['log_likelihood']:.4f} over {report['n_cases']} cases "
            f"(per case {report['mean_log_likelihood']:.4f}), hit rate {report['hit_rate']:.4f}, "
            f"equal-shares log-likelihood {report['null_log_likelihood']:.4f}",
            highlight=False,
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
    if fmt == "json" and report:
        import json

        document = {"report": report, "rows": table.to_dicts()}
        text = json.dumps(document, indent=2, default=str) + "\n"
        if request.output == "-":
            sys.stdout.write(text)
        else:
            from choicecli.io import atomic_file

            with atomic_file(Path(request.output)) as temp:
                temp.write_text(text)
        return
    if fmt == "parquet" and request.output == "-":
        raise UsageError("parquet cannot go to stdout here; use -o FILE.parquet or --format csv")
    write_table(table, request.output, fmt, metadata)


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
    from choicecli.results import COEFFICIENTS_FILE, load_result

    if dpi < 10 or dpi > 1200:
        raise UsageError(f"--dpi must be between 10 and 1200, not {dpi}")
    if shares is not None:
        frame, _ = read_table(str(shares))
        plot.draw_shares(frame, output, title=title or f"Shares: {shares.name}", dpi=dpi)
        return
    result = load_result(model)
    table = _read_coefficients(model / COEFFICIENTS_FILE, result)
    plot.draw_coefficients(
        table, term, level, output, title=title or result.spec["formula"], dpi=dpi
    )


def _emit(
    frame: pl.DataFrame,
    renderable,
    fmt: str | None,
    output: str,
    metadata: dict[str, str],
) -> None:
    """Write a post-estimation table as coef does: a rich table on a terminal, CSV when piped,
    or the format --format or the -o suffix names (Parquet to stdout too)."""
    from choicecli.io import output_format, write_table

    if fmt is None and output == "-":
        fmt = "table" if sys.stdout.isatty() else "csv"
    fmt = output_format(output, fmt, "csv")
    if fmt == "table":
        if output != "-":
            raise UsageError("--format table prints to the terminal; use csv, json or parquet")
        Console(width=None if sys.stdout.isatty() else 200).print(renderable)
        return
    if fmt == "parquet" and output == "-":
        import io

        buffer = io.BytesIO()
        frame.write_parquet(buffer)
        sys.stdout.buffer.write(buffer.getvalue())
        sys.stdout.flush()
        return
    write_table(frame, output, fmt, metadata)


def _is_table(fmt: str | None, output: str) -> bool:
    from choicecli.io import output_format

    if fmt is None and output == "-":
        return sys.stdout.isatty()
    return output_format(output, fmt, "csv") == "table"


def run_compare(
    models: list[Path], tests_only: bool, fmt: str | None, output: str, console: Console
) -> None:
    """Fit statistics of several saved models side by side, with LR tests of nested pairs."""
    import json

    from choicecli.compare import compare_models, comparison_renderable
    from choicecli.results import load_result

    if len(models) < 2:
        raise UsageError("compare needs two or more model directories, e.g. choice compare m1 m2")
    results = [load_result(model) for model in models]
    comparison = compare_models(results, [str(model) for model in models])
    frame = comparison.tests if tests_only else comparison.models
    renderable = comparison_renderable(comparison, tests_only)
    metadata = {"choice.models": json.dumps(comparison.models["model"].to_list())}
    _emit(frame, renderable, fmt, output, metadata)
    _say_notes(comparison.notes, fmt, output, console)


def _say_notes(notes: list[str], fmt: str | None, output: str, console: Console) -> None:
    """Notes on stderr once the output is written; a table on the terminal carries them."""
    if not _is_table(fmt, output):
        for note in notes:
            console.print(f"Note: {note}", markup=False, highlight=False, soft_wrap=True)


def run_summary(model: Path, fmt: str | None, output: str) -> None:
    """The fit summary again, from the saved model: what `fit` printed, or one row of
    statistics in csv, json or parquet."""
    from rich.console import Group
    from rich.text import Text

    from choicecli.describe import fit_statistics_frame
    from choicecli.report import fit_summary
    from choicecli.results import load_result

    result = load_result(model)
    warnings = [Text(f"Warning: {warning}", style="yellow") for warning in result.warnings]
    renderable = Group(*warnings, fit_summary(result))
    metadata = {"choice.formula": result.spec["formula"]}
    _emit(fit_statistics_frame(result), renderable, fmt, output, metadata)


def run_describe(term: str | None, level: str, model: Path, fmt: str | None, output: str) -> None:
    """`coef TERM --describe`: the spread of a user-varying term's coefficients over users."""
    from choicecli.describe import describe_user_terms, description_renderable
    from choicecli.results import load_result

    result = load_result(model)
    table = select_terms(result.coefficient_table(), term, level)
    described = describe_user_terms(table, term)
    metadata = {"choice.formula": result.spec["formula"]}
    _emit(described, description_renderable(described), fmt, output, metadata)


def run_wtp(
    price: str,
    level: str,
    model: Path,
    describe: bool,
    fmt: str | None,
    output: str,
    console: Console,
) -> None:
    """Willingness to pay: every coefficient over minus the price coefficient, with errors."""
    from choicecli.results import load_result
    from choicecli.wtp import describe_users, willingness_to_pay, wtp_renderable

    result = load_result(model)
    answer = willingness_to_pay(result, price, level)
    frame = describe_users(answer.table) if describe else answer.table
    metadata = {"choice.formula": result.spec["formula"], "choice.price": price}
    _emit(frame, wtp_renderable(answer, price), fmt, output, metadata)
    _say_notes(answer.notes, fmt, output, console)


@dataclass(frozen=True)
class EffectsRequest:
    data: str
    variable: str
    kind: str
    model: Path
    roles: dict
    input_format: str | None
    format: str | None
    output: str
    std_errors: bool | None = None  # None: while the delta method's passes stay within budget
    by: str | None = None


def run_effects(request: EffectsRequest, console: Console) -> None:
    """Elasticities, semi-elasticities or marginal effects of one column, J x J, averaged."""
    from choicecli.effects import compute_effects, effects_renderable
    from choicecli.io import read_table
    from choicecli.results import load_result

    result = load_result(request.model)
    frame, digest = read_table(request.data, request.input_format)
    where = "<stdin>" if request.data == "-" else request.data
    overrides = {k: v for k, v in request.roles.items() if v is not None}
    effects = compute_effects(
        result, frame, request.variable, request.kind, where=where, roles=overrides,
        std_errors=request.std_errors, by=request.by,
    )  # fmt: skip
    metadata = {
        "choice.formula": result.spec["formula"],
        "choice.input_sha256": digest,
        "choice.variable": request.variable,
    }
    renderable = effects_renderable(effects, request.by)
    _emit(effects.table, renderable, request.format, request.output, metadata)
    _say_notes(effects.notes, request.format, request.output, console)
