"""One function per subcommand: read inputs, call the library, write outputs, render.

Kept apart from cli.py so every command runs (and is tested) without Typer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl
from rich.console import Console

from choicecli import __version__, process
from choicecli.errors import FormulaError, UsageError

if TYPE_CHECKING:
    from choicecli.estimate import Iteration

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
    verbose: bool = False  # one line per iteration on stderr, terminal or not
    # mixed logit: --random TERM=DISTRIBUTION (repeatable) and how to draw
    random: tuple[str, ...] = ()
    draws: int | None = None
    draw_kind: str | None = None
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
    _errors_choice(request)
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
    drawing = {  # (--seed seeds the bootstrap too)
        "--draws": request.draws, "--draw-kind": request.draw_kind,
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
    from choicecli.report import estimate_warnings, fit_summary

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
    process.reached("read")
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
        draw_batch=request.draw_batch,
    )
    where = "<stdin>" if request.data == "-" else request.data
    if request.threads is not None:
        import torch

        torch.set_num_threads(request.threads)
    with contextlib.ExitStack() as stack:
        status = None
        if console.is_terminal and not console.quiet:
            status = stack.enter_context(console.status("fitting ..."))

        def progress(iteration: Iteration) -> None:
            process.reached("optimiser")
            if status is not None:
                status.update(
                    f"{iteration.method} iteration {iteration.number}: log-likelihood "
                    f"{iteration.log_likelihood:.6f} ({iteration.seconds:.1f} s)"
                )
            if request.verbose:
                _say_iteration(console, iteration)

        result, _ = fit_model(frame, spec, options, where=where, progress=progress, consume=True)
    result.provenance = {
        "input": str(Path(request.data).resolve()) if request.data != "-" else "-",
        "input_sha256": digest,
        "versions": versions(),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(request.argv),  # runnable as is
    }
    table = result.coefficient_table()
    result.warnings.extend(estimate_warnings(table, result.spec))
    result.save(request.model, table)
    for warning in result.warnings:
        console.print(
            f"Warning: {warning}", markup=False, highlight=False, style="yellow", soft_wrap=True
        )
    print_lines(console, fit_summary(result, console_width(console), table))
    console.print(f"model written to {request.model}/", highlight=False, soft_wrap=True)
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
    vcov: bool = False,
) -> None:
    from choicecli.loader import load_result
    from choicecli.output import check_destination, write_table, write_text
    from choicecli.report import coefficient_lines

    fmt = rows_format(fmt, output)
    check_destination(output)
    result = load_result(model)
    table = select_terms(result.coefficient_table(), term, level)
    if vcov:
        table = covariance_table(result, table)
    if fmt == "table" and vcov:
        _write_renderable(_matrix_renderable(table), output)
    elif fmt == "table" and output == "-":
        screen = plain_console()
        print_lines(screen, coefficient_lines(table, console_width(screen)))
    elif fmt == "table":  # a file: plain text, no width limit
        write_text(output, "\n".join(line.plain for line in coefficient_lines(table)) + "\n")
    elif fmt == "json":
        import json

        key = "covariance" if vcov else "coefficients"
        document = {**_model_state(result), key: table.to_dicts()}
        write_text(output, json.dumps(document, indent=2, default=str) + "\n")
    else:
        write_table(table, output, fmt, {"choice.formula": result.spec["formula"]})
    warn_if_unreliable(result, console)  # after the output: an error stays one line


def _model_state(result) -> dict:
    """What JSON outputs say about the model they came from."""
    return {"converged": bool(result.fit.get("converged")), "warnings": list(result.warnings)}


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


def rows_format(fmt: str | None, output: str) -> str:
    """A command's rows: a table on a terminal, CSV when piped, else what --format or the -o
    suffix names."""
    from choicecli.output import output_format

    if fmt is None and output == "-":
        fmt = "table" if sys.stdout is not None and sys.stdout.isatty() else "csv"
    return output_format(output, fmt, "csv")


def _write_renderable(renderable, output: str) -> None:
    """A rich table as text: on stdout as laid out for it, in a file plain and at full width."""
    import io

    from choicecli.output import write_text

    if output == "-":
        screen = plain_console()
        if not screen.is_terminal:  # piped: no width limit, as in a file
            screen.width = 100_000
        screen.print(renderable)
        return
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, color_system=None).print(renderable)
    write_text(output, "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n")


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
            f"log-likelihood {report['log_likelihood']:.4f} over {report['n_cases']:,} cases "
            f"(per case {report['mean_log_likelihood']:.4f}), hit rate {report['hit_rate']:.4f}, "
            f"equal-shares log-likelihood {report['null_log_likelihood']:.4f}",
            highlight=False,
            soft_wrap=True,
        )
    table = share_table(scored, result, request.by) if request.shares else scored
    metadata = {
        "choice.model": str(request.model),
        "choice.formula": result.spec["formula"],
        "choice.input_sha256": digest,
        "choice.versions": str(versions()),
    }
    if fmt == "json":
        import json

        document = {**_model_state(result), "report": report or None, "rows": table.to_dicts()}
        write_text(request.output, json.dumps(document, indent=2, default=str) + "\n")
    else:
        write_table(table, request.output, fmt, metadata)
    warn_if_unreliable(result, console)  # after the output: an error stays one line


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
    from choicecli.loader import load_result
    from choicecli.output import chart_format, check_destination

    if dpi < 10 or dpi > 1200:
        raise UsageError(f"--dpi must be between 10 and 1200, not {dpi}")
    chart_format(output)  # png, svg or pdf by the suffix; anything else is a usage error
    check_destination(output)
    if shares is not None:
        frame, _ = read_table(str(shares))
        plot.draw_shares(
            frame, output, title=f"Shares: {shares.name}" if title is None else title, dpi=dpi
        )
        return
    result = load_result(model)
    table = result.coefficient_table()
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
    warn_if_unreliable(result, console)  # after the output: an error stays one line


def _emit(
    frame: pl.DataFrame,
    renderable,
    fmt: str | None,
    output: str,
    metadata: dict[str, str],
) -> None:
    """Write a post-estimation table: a table on a terminal, CSV when piped, or the format
    --format or the -o suffix names."""
    from choicecli.output import check_destination, write_table

    fmt = rows_format(fmt, output)
    if fmt == "table" and output != "-":
        raise UsageError("--format table prints to the terminal; use csv, json or parquet")
    check_destination(output)
    if fmt == "table":
        _write_renderable(renderable, output)
    else:
        write_table(frame, output, fmt, metadata)


def run_compare(
    models: list[Path], tests_only: bool, fmt: str | None, output: str, console: Console
) -> None:
    """Fit statistics of several saved models side by side, with LR tests of nested pairs."""
    import json

    from choicecli.compare import compare_models, comparison_renderable
    from choicecli.loader import load_result

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
    if rows_format(fmt, output) != "table":
        for note in notes:
            console.print(f"Note: {note}", markup=False, highlight=False, soft_wrap=True)


def run_summary(model: Path, fmt: str | None, output: str) -> None:
    """The fit summary again, from the saved model: what `fit` printed (warnings first), or one
    row of statistics in csv, json or parquet."""
    from rich.text import Text

    from choicecli.describe import fit_statistics_frame
    from choicecli.loader import load_result
    from choicecli.output import check_destination, write_text
    from choicecli.report import fit_summary

    check_destination(output)
    result = load_result(model)
    if rows_format(fmt, output) != "table":
        metadata = {"choice.formula": result.spec["formula"]}
        _emit(fit_statistics_frame(result), None, fmt, output, metadata)
        return
    warnings = [Text(f"Warning: {warning}", style="yellow") for warning in result.warnings]
    if output == "-":
        screen = plain_console()
        print_lines(screen, warnings + fit_summary(result, console_width(screen)))
        return
    lines = warnings + fit_summary(result)  # a file: plain text, no width limit
    write_text(output, "\n".join(line.plain for line in lines) + "\n")


def run_describe(term: str | None, level: str, model: Path, fmt: str | None, output: str) -> None:
    """`coef TERM --describe`: the spread of a user-varying term's coefficients over users."""
    from choicecli.describe import describe_user_terms, description_renderable
    from choicecli.loader import load_result

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
    from choicecli.loader import load_result
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
    from choicecli.loader import load_result

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
