"""The `choice` command line: parse options, call the library, render. Nothing else."""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from choicecli import process
from choicecli.errors import ChoiceError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Fit conditional and nested logit models to long-format tables (Parquet or CSV).",
)
DEFAULT_MODEL = "choice_model"


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
    """Diagnostics go to stderr; styles only on a terminal and without NO_COLOR (no codes at all
    then: rich's no_color keeps bold and dim)."""
    colour = None if os.environ.get("NO_COLOR") else "auto"
    return Console(stderr=True, quiet=quiet, color_system=colour)


def show_version(value: bool) -> None:
    if value:
        from choicecli import __version__

        typer.echo(f"choice {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Fit conditional and nested logit models to long-format tables (Parquet or CSV)."""


def say_error(message: str) -> None:
    """One unwrapped line on stderr."""
    stderr_console().print(f"Error: {message}", markup=False, highlight=False, soft_wrap=True)


def say_usage_error(error: typer.TyperException) -> int:
    """A usage error as one line naming the command's help (Typer prints four); `choice` or a
    command run bare prints its help, as before. Returns the exit code (2)."""
    if type(error).__name__ == "NoArgsIsHelpError":  # its message is the help text
        typer.echo(error.format_message(), err=True)
        return error.exit_code
    context = getattr(error, "ctx", None)
    hint = f" (see '{context.command_path} -h')" if context is not None else ""
    say_error(f"{error.format_message()}{hint}")
    return error.exit_code


def say_interrupted(number: int) -> int:
    """The one line of an interrupted command; returns its exit code, 128 + the signal."""
    stderr_console().print(process.interruption_message(number), markup=False, highlight=False)
    return 128 + number


def handles_errors(command: Callable) -> Callable:
    """Turn library errors into one stderr line and an exit code; a signal into 128 + its
    number (Ctrl-C 130, SIGTERM 143, SIGHUP 129) once the cleanup on the way out has run."""

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
        except process.Interrupted as stop:
            raise typer.Exit(say_interrupted(stop.number)) from None
        except KeyboardInterrupt:  # SIGINT where our handler is not installed (in-process)
            raise typer.Exit(say_interrupted(signal.SIGINT)) from None
        except BrokenPipeError:  # the reader of stdout went away (`| head`): stop quietly
            process.silence_stdout()  # later flushes must not fail again
            raise typer.Exit(process.EXIT_BROKEN_PIPE) from None
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
    weights_kind: Annotated[
        str, typer.Option(help="frequency, or sampling (rescaled to N; robust errors).")
    ] = "frequency",
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
    se: Annotated[
        str | None,
        typer.Option(
            help="Standard errors: classic, robust, cluster[:COL], bootstrap:N or none "
            "(default classic; robust with sampling weights)."
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the bootstrap resamples and of a mixed logit's draws.")
    ] = 0,
    threads: Annotated[
        int | None, typer.Option(envvar="CHOICE_THREADS", help="CPU threads (default: torch's).")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="One line per iteration on stderr.")
    ] = False,
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
    correlated: Annotated[
        bool, typer.Option(help="Mixed logit: a full Cholesky factor among the normal ones.")
    ] = False,
    draw_batch: Annotated[
        int | None, typer.Option(help="Draws per batch (default: from a memory budget).")
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Fit a model and write the model directory; the summary goes to stderr.

    A formula is a sum of terms (VARIABLE|VARIATION), VARIABLE a column, a glob (x_*) or 1
    (an intercept); the variation says what the coefficient varies by:

    \b
      constant        one coefficient, the same for every alternative and user
      item            one per alternative, the base alternative fixed at 0
      item-full       one per alternative, none fixed (the variable must vary within cases)
      user            one per decision maker (needs --user)
      user-item       one per user and alternative, the base fixed at 0 for every user
      user-item-full  one per user and alternative, none fixed

    Exit status: 0 done, 1 bad data, formula or model, 2 usage, 3 did not converge (written).

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
            se=se,
            seed=seed,
            weights_kind=weights_kind,
            threads=threads,
            verbose=verbose,
            argv=sys.argv,
            separator=separator,
            random=tuple(random or ()),
            draws=draws,
            draw_kind=draw_kind,
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
    level: Annotated[
        Level | None,
        typer.Option(
            help="Only terms at this level: item or nest (default: every level; a TERM is "
            "looked up at item level first)."
        ),
    ] = None,
    model: ModelDir = Path(DEFAULT_MODEL),
    format: Annotated[
        CoefFormat | None,
        typer.Option(
            "--format",
            help="table, csv, json or parquet (default: table on a terminal, CSV when "
            "piped, or the -o suffix). A table is plain text when piped or written to a file.",
        ),  # fmt: skip
    ] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="File, or - for stdout.")] = "-",
    describe: Annotated[bool, typer.Option(help="Summarise user terms over users.")] = False,
    quiet: Quiet = False,
    vcov: Annotated[
        bool, typer.Option("--vcov", help="The covariance matrix, rows and columns labelled.")
    ] = False,
    debug: Debug = False,
) -> None:
    """Show coefficients from a fitted model: estimate, std. error, z, p, 95% interval.

    Example: choice coef 'income[item]' --format csv
    """
    from choicecli import commands

    if describe:
        return commands.run_describe(
            term, level.value if level else "item", model, format and format.value, output
        )
    commands.run_coef(
        term,
        level and level.value,
        model,
        format and format.value,
        output,
        stderr_console(quiet),
        vcov=vcov,
    )


@app.command()
@handles_errors
def predict(
    data: Annotated[str, typer.Argument(help="Parquet or CSV file in long format, or -.")],
    model: ModelDir = Path(DEFAULT_MODEL),
    output: Annotated[str, typer.Option("--output", "-o", help="File, or - for stdout.")] = "-",
    format: Annotated[
        TableFormat | None,
        typer.Option(
            "--format", help="parquet, csv or json (default: the -o suffix; CSV on stdout)."
        ),
    ] = None,
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
    level: Annotated[
        Level | None,
        typer.Option(
            help="item or nest: the level of TERM (default item), or without TERM the only "
            "level drawn (default: every level)."
        ),
    ] = None,
    model: ModelDir = Path(DEFAULT_MODEL),
    shares: Annotated[
        Path | None, typer.Option(help="Draw shares from a 'choice predict --shares' file.")
    ] = None,
    dpi: Annotated[int, typer.Option(help="Dots per inch.")] = 100,
    title: Annotated[
        str | None, typer.Option(help="Chart title (default: the formula; '' for none).")
    ] = None,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Draw a PNG chart of coefficients, user distributions, lambdas or shares.

    Example: choice plot 'intercept[user]' -o users.png
    """
    from choicecli import commands

    commands.run_plot(
        term, level and level.value, model, output, shares, dpi, title, stderr_console(quiet)
    )


OutputFormat = Annotated[
    CoefFormat | None,
    typer.Option(
        "--format",
        help="table, csv, json or parquet (default: table on a terminal, CSV when piped, "
        "or the -o suffix).",
    ),
]
Output = Annotated[str, typer.Option("--output", "-o", help="File, or - for stdout.")]


@app.command()
@handles_errors
def compare(
    models: Annotated[list[Path], typer.Argument(help="Two or more model directories.")],
    tests: Annotated[
        bool, typer.Option("--tests", help="Write the likelihood-ratio tests, not the models.")
    ] = False,
    format: OutputFormat = None,
    output: Output = "-",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Compare fitted models: log-likelihood, parameters, AIC, BIC, adjusted rho-squared, and
    likelihood-ratio tests where one model nests another on the same data.

    Example: choice compare small_model big_model
    """
    from choicecli import commands

    commands.run_compare(models, tests, format and format.value, output, stderr_console(quiet))


@app.command()
@handles_errors
def summary(
    model: ModelDir = Path(DEFAULT_MODEL),
    format: OutputFormat = None,
    output: Output = "-",
    debug: Debug = False,
) -> None:
    """Show the fit summary of a saved model again (what fit printed), or its statistics.

    Example: choice summary -m choice_model --format json
    """
    from choicecli import commands

    commands.run_summary(model, format and format.value, output)


@app.command()
@handles_errors
def wtp(
    price: Annotated[str, typer.Option("--price", help="The price term, e.g. 'cost[constant]'.")],
    level: Annotated[Level, typer.Option(help="Level of the price term: item or nest.")] = (
        Level.item
    ),
    model: ModelDir = Path(DEFAULT_MODEL),
    describe: Annotated[
        bool, typer.Option(help="Summarise per-user willingness to pay over users.")
    ] = False,
    format: OutputFormat = None,
    output: Output = "-",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Willingness to pay: every coefficient divided by minus the price coefficient, with
    delta-method standard errors, 95% intervals and Fieller intervals.

    Example: choice wtp --price 'cost[constant]' --format csv
    """
    from choicecli import commands

    commands.run_wtp(
        price, level.value, model, describe, format and format.value, output, stderr_console(quiet)
    )


class EffectKind(StrEnum):
    elasticity = "elasticity"
    semi_elasticity = "semi-elasticity"
    marginal = "marginal"


@app.command()
@handles_errors
def effects(
    data: Annotated[str, typer.Argument(help="Parquet or CSV file in long format, or -.")],
    variable: Annotated[str, typer.Option("--variable", help="The column that changes.")],
    kind: Annotated[
        EffectKind, typer.Option(help="elasticity, semi-elasticity or marginal.")
    ] = EffectKind.elasticity,
    model: ModelDir = Path(DEFAULT_MODEL),
    case: Annotated[str | None, typer.Option(help="Override the fitted case column.")] = None,
    item: Annotated[str | None, typer.Option(help="Override the fitted item column.")] = None,
    user: Annotated[str | None, typer.Option(help="Override the fitted user column.")] = None,
    input_format: Annotated[str | None, typer.Option(help="parquet or csv.")] = None,
    by: Annotated[
        str | None, typer.Option(help="Segment column (constant within cases): a table each.")
    ] = None,
    std_errors: Annotated[
        bool | None,
        typer.Option(
            "--std-errors/--no-std-errors",
            help="Delta-method errors (default: unless they would take long on large data).",
        ),
    ] = None,
    format: OutputFormat = None,
    output: Output = "-",
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    """Own and cross effects of one column on the choice probabilities (J x J), averaged over
    cases two ways, with delta-method standard errors.

    Example: choice effects mc.parquet --variable cost --kind elasticity --format table
    """
    from choicecli import commands

    commands.run_effects(
        commands.EffectsRequest(
            data=data,
            variable=variable,
            kind=kind.value,
            model=model,
            roles={"case": case, "item": item, "user": user},
            input_format=input_format,
            format=format and format.value,
            output=output,
            std_errors=std_errors,
            by=by,
        ),
        stderr_console(quiet),
    )


def main() -> NoReturn:
    """Console-script entry point (also `python -m choicecli`)."""
    process.configure_allocator()
    process.repair_streams()
    process.install_signal_handlers()
    code: int | str | None = 1
    try:
        try:
            returned = app(standalone_mode=False)  # a command's typer.Exit comes back as its code
            code = returned if isinstance(returned, int) else 0
        except SystemExit as done:
            code = done.code
        except typer.Abort:
            code = 1
            say_error("aborted")
        except typer.TyperException as error:  # a usage error: bad option, missing argument
            code = say_usage_error(error)
        except process.Interrupted as stop:  # outside a command (parsing, after it returned)
            code = 128 + stop.number
            say_interrupted(stop.number)
        except ChoiceError as error:  # outside a command: help text to a closed stdout
            if "--debug" in sys.argv or os.environ.get("CHOICE_DEBUG") == "1":
                raise  # a command's error re-raised for its traceback
            code = error.exit_code
            say_error(str(error))
    except process.Interrupted:  # the first signal, while a line above was printed
        pass
    process.exit_now(code)


if __name__ == "__main__":
    main()
