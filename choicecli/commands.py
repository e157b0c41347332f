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
    se: str | None = None  # None: classic, or robust with sampling weights
    seed: int = 0
    weights_kind: str = "frequency"


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
    _errors_choice(request)
    csv_separator(request.separator)


def _errors_choice(request: FitRequest):
    """--se, --weights-kind and the columns they name, checked before the data is read."""
    from choicecli.inference import ErrorsChoice, parse_se

    if request.weights_kind not in ("frequency", "sampling"):
        raise UsageError(
            f"--weights-kind must be frequency or sampling, not {request.weights_kind!r}"
        )
    sampling = request.weights_kind == "sampling"
    if sampling and not request.roles.get("weights"):
        raise UsageError("--weights-kind sampling needs --weights COL, the weight column")
    if request.se is None:
        return ErrorsChoice("robust" if sampling else "classic")
    choice = parse_se(request.se)
    if sampling and choice.kind == "classic":
        raise UsageError(
            "--se classic does not apply to sampling weights; use robust, cluster or bootstrap:N"
        )
    if choice.clustered:
        column = choice.cluster or request.roles.get("user")
        if column is None:
            raise UsageError(
                "--se cluster clusters by the user column: give --user, or cluster:COL"
            )
        if column not in (request.roles.get("user"), request.roles.get("case")):
            raise UsageError(
                f"--se cluster:{column}: clusters are the user column (--user) or the case "
                "column (one case per cluster)"
            )
    return choice


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
        errors=_errors_choice(request),
        seed=request.seed,
        weights_kind=request.weights_kind,
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


def run_coef(
    term: str | None, level: str, model: Path, fmt: str | None, output: str, vcov: bool = False
) -> None:
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
    if vcov:
        table = covariance_table(result, table)
        if fmt == "table":
            Console().print(_matrix_renderable(table))
            return
    if fmt == "table":
        Console().print(coefficient_renderable(table))
        return
    write_table(table, output, fmt, {"choice.formula": result.spec["formula"]})


def covariance_table(result, chosen: pl.DataFrame) -> pl.DataFrame:
    """The covariance of the estimated coefficients among `chosen` (rows of the coefficient
    table): a `coefficient` label column, then one column per coefficient, same labels."""
    import torch

    labels = [_label(row) for row in result.coefficient_table().iter_rows(named=True)]
    keep = set(_label(row) for row in chosen.iter_rows(named=True))
    estimated = result.estimated_index.tolist()  # layout position of each covariance row
    picked = [k for k, position in enumerate(estimated) if labels[position] in keep]
    if not result.covariance.numel():
        raise UsageError("this model has no covariance matrix (fitted with --se none, or too "
                         "many parameters for one); refit to get it")  # fmt: skip
    index = torch.tensor(picked, dtype=torch.long)
    matrix = result.covariance.double()[index][:, index].numpy()  # (k, k)
    names = [labels[estimated[k]] for k in picked]
    columns = {"coefficient": names} | {name: matrix[:, j] for j, name in enumerate(names)}
    return pl.DataFrame(columns)


def _matrix_renderable(table: pl.DataFrame):
    """The covariance table as a rich table (labels as text, not markup)."""
    from rich.table import Table
    from rich.text import Text

    view = Table(show_edge=False, header_style="bold")
    for name in table.columns:
        view.add_column(Text(name), justify="left" if name == "coefficient" else "right")
    for row in table.iter_rows():
        view.add_row(Text(row[0]), *(f"{value:.4g}" for value in row[1:]))
    return view


def _label(row: dict) -> str:
    """A coefficient's label: term[feature] (item, user), as `choice coef` shows it."""
    name = row["term"]
    if row["feature"] not in (None, "intercept", row["variable"]):
        name = f"{name} {row['feature']}"
    where = [row["level"]] if row["level"] != "item" else []
    where += [str(row[part]) for part in ("item", "user") if row[part] is not None]
    return name + (f" ({', '.join(where)})" if where else "")


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
