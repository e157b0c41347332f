"""The `choice` command line: parse options, call the library, render. Nothing else."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from choicecli.errors import ChoiceError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    help="Fit conditional and nested logit models to long-format tables (Parquet or CSV).",
)
DEFAULT_MODEL = "choice_model"
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command the signal stopped
# polars' allocator (jemalloc) hands the pages it frees back to the system only after 0.5 s,
# and then lazily (they count as resident until the system runs short): its background thread
# hands them back within 0.1 s and for good, at no cost to the command's own thread
ALLOCATOR_VARIABLE = "_RJEM_MALLOC_CONF"
ALLOCATOR_SETTINGS = "background_thread:true,dirty_decay_ms:100,muzzy_decay_ms:0"
# polars, when imported, writes its defaults before the variable's value and leaves them in the
# environment: a parent process that imported polars (a Python pipeline) passes them on, and
# after ours they would win. Seen at the start of an inherited value, they are polars', not
# the user's. At 10M rows they added about 100 MB to the peak.
POLARS_ALLOCATOR_DEFAULTS = "dirty_decay_ms:500,muzzy_decay_ms:1000"


class Missing(StrEnum):
    error = "error"
    drop = "drop"


class Level(StrEnum):
    item = "item"
    nest = "nest"


class CoefFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


class TableFormat(StrEnum):
    parquet = "parquet"
    csv = "csv"
    json = "json"


class Method(StrEnum):
    auto = "auto"
    newton = "newton"
    lbfgs = "lbfgs"


ModelDir = Annotated[
    Path,
    typer.Option(
        "--model", "-m", envvar="CHOICE_MODEL", help="Model directory (default choice_model/)."
    ),
]
Separator = typer.Option(
    help="CSV field separator: one character, e.g. ';' or '\\t' (default: tab for .tsv, else ',')."
)
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]


def stderr_console(quiet: bool = False) -> Console:
    """Diagnostics go to stderr; colour only on a terminal and without NO_COLOR."""
    width = None if sys.stderr.isatty() else 120
    return Console(stderr=True, quiet=quiet, no_color="NO_COLOR" in os.environ, width=width)


def say_error(message: str) -> None:
    """One unwrapped line on stderr."""
    stderr_console().print(f"Error: {message}", markup=False, highlight=False, soft_wrap=True)


def handles_errors(command: Callable) -> Callable:
    """Turn library errors into one stderr line and an exit code; Ctrl-C into 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False) or os.environ.get("CHOICE_DEBUG") == "1"
        try:
            return command(*args, **kwargs)
        except ChoiceError as error:
            if debug:
                raise
            say_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            stderr_console().print("Interrupted; nothing was written.", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
            with contextlib.suppress(OSError):  # later flushes must not fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as error:  # a bug: say so in one line, never a traceback
            if debug:
                raise
            say_error(
                f"internal error ({type(error).__name__}: {error}); "
                "rerun with --debug and report it"
            )
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@handles_errors
def fit(
    data: Annotated[
        str, typer.Argument(help="Parquet or CSV file in long format, or - for stdin.")
    ],
    formula: Annotated[
        str, typer.Option("--formula", "-f", help="e.g. '(cost|constant) + (1|item)'.")
    ],
    nests: Annotated[
        str | None,
        typer.Option(help="Nests: 'a=x,y;b=z', a JSON file, or col:NAME. Fits a nested logit."),
    ] = None,
    nest_formula: Annotated[str, typer.Option(help="Nest-level formula (item = nest).")] = "",
    shared_lambda: Annotated[bool, typer.Option(help="One lambda for all nests.")] = False,
    lambda_init: Annotated[float, typer.Option(help="Starting lambda.")] = 1.0,
    lambda_fixed: Annotated[bool, typer.Option(help="Hold lambda at --lambda-init.")] = False,
    lambda_bounds: Annotated[
        str | None, typer.Option(help="Bounds for lambda as LOW,HIGH, e.g. 0.01,1.")
    ] = None,
    case: Annotated[str, typer.Option(help="Choice-situation id column.")] = "case",
    item: Annotated[str, typer.Option(help="Alternative id column.")] = "item",
    choice: Annotated[str, typer.Option(help="Chosen indicator column (0/1, true/false).")] = (
        "choice"
    ),
    user: Annotated[str | None, typer.Option(help="Decision-maker id column.")] = None,
    session: Annotated[str | None, typer.Option(help="Session id column.")] = None,
    available: Annotated[str | None, typer.Option(help="0/1 availability column.")] = None,
    weights: Annotated[str | None, typer.Option(help="Case weight column.")] = None,
    base: Annotated[str | None, typer.Option(help="Base alternative for item terms.")] = None,
    missing: Annotated[Missing, typer.Option(help="Nulls in used columns: error or drop.")] = (
        Missing.error
    ),
    input_format: Annotated[str | None, typer.Option(help="parquet or csv (default: suffix).")] = (
        None
    ),
    separator: Annotated[str | None, Separator] = None,
    model: ModelDir = Path(DEFAULT_MODEL),
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    method: Annotated[Method, typer.Option(help="Optimiser: auto, newton or lbfgs.")] = (
        Method.auto
    ),
    max_iter: Annotated[int, typer.Option(help="Iteration cap.")] = 200,
    tol: Annotated[float, typer.Option(help="Tolerance on the (Newton-scaled) gradient norm.")] = (
        1e-7
    ),
    l2: Annotated[float, typer.Option(help="L2 penalty (l2/2)*sum(beta^2); not on lambda.")] = 0.0,
    strict: Annotated[bool, typer.Option(help="Unidentified terms are an error.")] = False,
    threads: Annotated[
        int | None, typer.Option(envvar="CHOICE_THREADS", help="CPU threads (default: torch's).")
    ] = None,
    random: Annotated[
        list[str] | None,
        typer.Option(
            help="Mixed logit: TERM=DISTRIBUTION, e.g. 'price[constant]=normal' (repeatable; "
            "normal, lognormal, uniform, triangular, truncated_normal)."
        ),
    ] = None,
    draws: Annotated[int | None, typer.Option(help="Draws per user or case (default 500).")] = (
        None
    ),
    draw_kind: Annotated[
        str | None, typer.Option(help="halton (default), sobol, mlhs or pseudo.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the draws (default 0).")] = None,
    correlated: Annotated[
        bool, typer.Option(help="Mixed logit: a full Cholesky factor among the normal ones.")
    ] = False,
    draw_batch: Annotated[
        int | None, typer.Option(help="Draws per batch (default: from a memory budget).")
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fit a model and write the model directory.

    Example: choice fit mc.parquet --formula '(cost|constant) + (1|item)' --case case --item alt
    """
    from choicecli import commands

    code = commands.run_fit(
        commands.FitRequest(
            data=data,
            formula=formula,
            nests=nests,
            nest_formula=nest_formula,
            shared_lambda=shared_lambda,
            lambda_init=lambda_init,
            lambda_fixed=lambda_fixed,
            lambda_bounds=lambda_bounds,
            roles=dict(
                case=case,
                item=item,
                choice=choice,
                user=user,
                session=session,
                available=available,
                weights=weights,
            ),  # fmt: skip
            base=base,
            missing=missing.value,
            input_format=input_format,
            model=model,
            device=device,
            method=method.value,
            max_iter=max_iter,
            tol=tol,
            l2=l2,
            strict=strict,
            threads=threads,
            argv=sys.argv,
            separator=separator,
            random=tuple(random or ()),
            draws=draws,
            draw_kind=draw_kind,
            seed=seed,
            correlated=correlated,
            draw_batch=draw_batch,
        ),
        stderr_console(quiet),
    )
    if code:
        raise typer.Exit(code)


@app.command()
@handles_errors
def coef(
    term: Annotated[
        str | None, typer.Argument(help="e.g. 'intercept[user]'; all when omitted.")
    ] = (None),
    level: Annotated[Level, typer.Option(help="item or nest.")] = Level.item,
    model: ModelDir = Path(DEFAULT_MODEL),
    format: Annotated[
        CoefFormat | None,
        typer.Option(
            "--format",
            help="table, csv, json or parquet (default: table on a "
            "terminal, CSV when piped, or the -o suffix).",
        ),  # fmt: skip
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="File, or - for stdout.")] = "-",
    debug: Debug = False,
) -> None:
    """Show coefficients from a fitted model.

    Example: choice coef 'income[item]' --format csv
    """
    from choicecli import commands

    commands.run_coef(term, level.value, model, format and format.value, output)


@app.command()
@handles_errors
def predict(
    data: Annotated[str, typer.Argument(help="Parquet or CSV file in long format, or -.")],
    model: ModelDir = Path(DEFAULT_MODEL),
    output: Annotated[str, typer.Option("--output", "-o", help="File, or - for stdout.")] = "-",
    format: Annotated[TableFormat | None, typer.Option("--format")] = None,
    shares: Annotated[bool, typer.Option(help="Predicted (and observed) shares instead.")] = False,
    by: Annotated[str | None, typer.Option(help="Segment column for --shares.")] = None,
    unseen: Annotated[
        str, typer.Option(help="Unseen users: error, or zero (user coefficients set to 0).")
    ] = "error",
    case: Annotated[str | None, typer.Option(help="Override the fitted case column.")] = None,
    item: Annotated[str | None, typer.Option(help="Override the fitted item column.")] = None,
    choice: Annotated[str | None, typer.Option(help="Override the fitted choice column.")] = None,
    user: Annotated[str | None, typer.Option(help="Override the fitted user column.")] = None,
    input_format: Annotated[str | None, typer.Option(help="parquet or csv.")] = None,
    separator: Annotated[str | None, Separator] = None,
    batch_cases: Annotated[int, typer.Option(help="Cases scored per batch.")] = 200_000,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Score new data with a fitted model: utility, probability, predicted.

    Example: choice predict next_month.parquet -o scores.parquet
    """
    from choicecli import commands

    commands.run_predict(
        commands.PredictRequest(
            data=data,
            model=model,
            output=output,
            format=format and format.value,
            shares=shares,
            by=by,
            unseen=unseen,
            roles={"case": case, "item": item, "choice": choice, "user": user},
            input_format=input_format,
            batch_cases=batch_cases,
            separator=separator,
        ),
        stderr_console(quiet),
    )


@app.command()
@handles_errors
def plot(
    term: Annotated[
        str | None, typer.Argument(help="Term to draw; all coefficients if omitted.")
    ] = (None),
    output: Annotated[Path, typer.Option("--output", "-o", help=".png, .svg or .pdf file.")] = Path(
        "coefficients.png"
    ),
    level: Annotated[Level, typer.Option(help="item or nest.")] = Level.item,
    model: ModelDir = Path(DEFAULT_MODEL),
    shares: Annotated[
        Path | None, typer.Option(help="Draw shares from a 'choice predict --shares' file.")
    ] = None,
    dpi: Annotated[int, typer.Option(help="Dots per inch.")] = 100,
    title: Annotated[str | None, typer.Option(help="Chart title (default: the formula).")] = None,
    debug: Debug = False,
) -> None:
    """Draw a PNG chart of coefficients, user distributions, lambdas or shares.

    Example: choice plot 'intercept[user]' -o users.png
    """
    from choicecli import commands

    commands.run_plot(term, level.value, model, output, shares, dpi, title)


def allocator_settings(inherited: str | None) -> str:
    """Our settings for polars' allocator followed by the user's own, which win where they
    overlap (the last value of an option counts); polars' defaults that a parent process left
    at the start of the inherited value are dropped."""
    own = inherited or ""
    while own == POLARS_ALLOCATOR_DEFAULTS or own.startswith(POLARS_ALLOCATOR_DEFAULTS + ","):
        own = own[len(POLARS_ALLOCATOR_DEFAULTS) + 1 :]  # one copy per parent that imported it
    return ",".join(part for part in (ALLOCATOR_SETTINGS, own) if part)


def configure_allocator() -> None:
    """Set polars' allocator to hand freed memory back; only before polars loads (it reads
    the settings then), so a command that imports polars later gets them."""
    if "polars" not in sys.modules:
        os.environ[ALLOCATOR_VARIABLE] = allocator_settings(os.environ.get(ALLOCATOR_VARIABLE))


def main() -> NoReturn:
    """Console-script entry point (also `python -m choicecli`)."""
    configure_allocator()
    try:
        app()  # standalone: it ends in SystemExit with the command's code
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


def exit_now(code: int | str | None) -> NoReturn:
    """End the process as `sys.exit(code)` would, without the interpreter's teardown.

    With torch loaded, tearing the interpreter down (freeing every module and tensor, running
    libraries' destructors) took 0.4 to 0.9 s here, about as long as a 100k-case fit; the
    system frees it all at once anyway. Every output file is closed by now (written to a temporary
    file, then renamed); atexit handlers run and the standard streams are flushed here.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): the message, then status 1
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except OSError:  # the reader went away (`| head`): as a command killed by SIGPIPE
        code = code or EXIT_BROKEN_PIPE
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
