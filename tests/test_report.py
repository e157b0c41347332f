"""What a reader sees: tables that never cut a number, the fit summary, p-values, marks and
warnings about the estimates, and the messages of issue 17, through the library and the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from choicecli.cli import app
from choicecli.design import Parameter
from choicecli.loader import load_result
from choicecli.report import (
    coefficient_lines,
    estimate_warnings,
    fit_summary,
    format_p,
    plural,
    text_width,
)
from choicecli.results import FitResult
from conftest import CHOICE_EXECUTABLE, HC_FORMULA, MODE_CANADA_FORMULA, SAMPLE_DATA, reference_file

MODE_CANADA = ["--case", "case", "--item", "alt", "--choice", "choice"]
HC = ["--case", "idx.id1", "--item", "idx.id2", "--choice", "depvar"]
HC_NESTS = "cooling=gcc,ecc,erc,hpc;other=gc,ec,er"
ESCAPE = "\x1b["


def invoke(*arguments: str, env: dict | None = None):
    return CliRunner().invoke(app, list(arguments), env=env)


def run(*arguments: str, env: dict | None = None, **options) -> subprocess.CompletedProcess:
    """The installed `choice` in a subprocess, stdout and stderr pipes (not terminals)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "NO_COLOR")}
    environment.update(env or {})
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **options}
    return subprocess.run(
        [str(CHOICE_EXECUTABLE), *arguments], text=True, env=environment, check=False, **options
    )


@pytest.fixture(scope="module")
def mode_canada(mode_canada_parquet, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("report") / "mc"
    fitted = invoke("fit", str(mode_canada_parquet), "-f", MODE_CANADA_FORMULA, *MODE_CANADA,
                    "-m", str(model))  # fmt: skip
    assert fitted.exit_code == 0, fitted.stderr
    return model


@pytest.fixture(scope="module")
def hc_at_bound(tmp_path_factory) -> tuple[Path, str]:
    """HC's shared lambda (0.586 free) held under an upper bound of 0.5: it sits there."""
    model = tmp_path_factory.mktemp("report") / "hc"
    data = str(reference_file("HC.csv"))
    fitted = invoke("fit", data, "-f", HC_FORMULA, *HC, "--nests", HC_NESTS,
                    "--shared-lambda", "--lambda-bounds", "0.01,0.5", "-m", str(model),
                    env={"COLUMNS": "200"})  # fmt: skip
    assert fitted.exit_code == 0, fitted.stderr
    return model, fitted.stderr


# ---------------------------------------------------------------------------------------------
# Exact tables: ModeCanada (noalt == 4), mlogit's estimates, at 60, 80, 200 columns and a file

TABLE_200 = """\
term             item      estimate  std. error       z         p  sig    95% low   95% high  note
cost[constant]           -0.0333389    0.007096  -4.699  2.62e-06  ***   -0.04725   -0.01943
freq[constant]            0.0925297    0.005098   18.15  1.24e-73  ***    0.08254     0.1025
ovt[constant]            -0.0430036    0.003225  -13.34  1.44e-40  ***   -0.04932   -0.03668
income[item]     air              0                                                           fixed
income[item]     bus     -0.0890869     0.01835  -4.856   1.2e-06  ***     -0.125   -0.05313
income[item]     car      -0.027993    0.003873  -7.229  4.88e-13  ***   -0.03558    -0.0204
income[item]     train   -0.0381466    0.004083  -9.343   9.4e-21  ***   -0.04615   -0.03014
ivt[item-full]   air      0.0595097     0.01007   5.908  3.46e-09  ***    0.03977    0.07925
ivt[item-full]   bus    -0.00678372    0.004433   -1.53     0.126        -0.01547   0.001906
ivt[item-full]   car    -0.00646033    0.001898  -3.403  0.000667  ***   -0.01018  -0.002739
ivt[item-full]   train  -0.00145036    0.001187  -1.221     0.222       -0.003778  0.0008771
intercept[item]  air              0                                                           fixed
intercept[item]  bus       0.698374        1.28  0.5455     0.585          -1.811      3.208
intercept[item]  car        1.84411      0.7085   2.603   0.00925  **      0.4555      3.233
intercept[item]  train       3.2742      0.6244   5.244  1.57e-07  ***       2.05      4.498
sig: *** p < 0.001, ** p < 0.01, * p < 0.05
"""

TABLE_80 = """\
term             item      estimate  std. error       z         p  sig  note
cost[constant]           -0.0333389    0.007096  -4.699  2.62e-06  ***
freq[constant]            0.0925297    0.005098   18.15  1.24e-73  ***
ovt[constant]            -0.0430036    0.003225  -13.34  1.44e-40  ***
income[item]     air              0                                     fixed
income[item]     bus     -0.0890869     0.01835  -4.856   1.2e-06  ***
income[item]     car      -0.027993    0.003873  -7.229  4.88e-13  ***
income[item]     train   -0.0381466    0.004083  -9.343   9.4e-21  ***
ivt[item-full]   air      0.0595097     0.01007   5.908  3.46e-09  ***
ivt[item-full]   bus    -0.00678372    0.004433   -1.53     0.126
ivt[item-full]   car    -0.00646033    0.001898  -3.403  0.000667  ***
ivt[item-full]   train  -0.00145036    0.001187  -1.221     0.222
intercept[item]  air              0                                     fixed
intercept[item]  bus       0.698374        1.28  0.5455     0.585
intercept[item]  car        1.84411      0.7085   2.603   0.00925  **
intercept[item]  train       3.2742      0.6244   5.244  1.57e-07  ***
sig: *** p < 0.001, ** p < 0.01, * p < 0.05
"""

TABLE_60 = """\
term  item
       estimate  std. error         p  sig  note
cost[constant]
     -0.0333389    0.007096  2.62e-06  ***
freq[constant]
      0.0925297    0.005098  1.24e-73  ***
ovt[constant]
     -0.0430036    0.003225  1.44e-40  ***
income[item]  air
              0                             fixed
income[item]  bus
     -0.0890869     0.01835   1.2e-06  ***
income[item]  car
      -0.027993    0.003873  4.88e-13  ***
income[item]  train
     -0.0381466    0.004083   9.4e-21  ***
ivt[item-full]  air
      0.0595097     0.01007  3.46e-09  ***
ivt[item-full]  bus
    -0.00678372    0.004433     0.126
ivt[item-full]  car
    -0.00646033    0.001898  0.000667  ***
ivt[item-full]  train
    -0.00145036    0.001187     0.222
intercept[item]  air
              0                             fixed
intercept[item]  bus
       0.698374        1.28     0.585
intercept[item]  car
        1.84411      0.7085   0.00925  **
intercept[item]  train
         3.2742      0.6244  1.57e-07  ***
sig: *** p < 0.001, ** p < 0.01, * p < 0.05
"""


def assert_every_estimate_printed(text: str, table: pl.DataFrame) -> None:
    """Each coefficient's row (or its two lines) holds its estimate to six significant digits."""
    lines = text.splitlines()
    for record in table.filter(pl.col("identified")).iter_rows(named=True):
        printed = f"{record['estimate']:.6g}"
        label = re.escape(record["term"])
        if record["item"]:
            label += r"\s+" + re.escape(record["item"])
        found = [i for i, line in enumerate(lines) if re.match(label + r"(\s|$)", line)]
        assert found, f"no row for {label}"
        block = " ".join(lines[found[0] : found[0] + 2]).split()
        assert printed in block, f"{label}: {printed} not printed in full"


@pytest.mark.parametrize(("columns", "expected"), [(60, TABLE_60), (80, TABLE_80),
                                                   (200, TABLE_200)])  # fmt: skip
def test_coef_table_is_exact_and_never_cuts_a_number(mode_canada, columns, expected):
    result = invoke("coef", "-m", str(mode_canada), "--format", "table",
                    env={"COLUMNS": str(columns)})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected
    assert max(len(line) for line in result.stdout.splitlines()) <= columns
    assert_every_estimate_printed(
        result.stdout, pl.read_parquet(mode_canada / "coefficients.parquet")
    )


def test_coef_table_to_a_file_is_plain_unlimited_text(mode_canada, tmp_path):
    """Redirected (not a terminal, no COLUMNS): every column, no escape codes, no padding."""
    with (tmp_path / "t.txt").open("w") as stdout:
        done = run("coef", "-m", str(mode_canada), "--format", "table", stdout=stdout)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.txt").read_text() == TABLE_200
    written = run("coef", "-m", str(mode_canada), "--format", "table",
                  "-o", str(tmp_path / "o.txt"), env={"COLUMNS": "60"})  # fmt: skip
    assert written.returncode == 0 and (tmp_path / "o.txt").read_text() == TABLE_200


SUMMARY_80 = """\
model            conditional logit: (cost|constant) + (freq|constant) +
                 (ovt|constant) + (income|item) + (ivt|item-full) + (1|item)
data             11,116 rows, 2,779 cases, 4 alternatives
observed shares  air 0.374, bus 0.004, car 0.456, train 0.167
optimiser        newton, 10 iterations, converged (gradient norm below
                 tolerance), 0.25 s on cpu
log-likelihood   -1874.3427 (equal shares -3852.5120)
goodness of fit  rho-squared 0.5135, adjusted 0.5101, against market shares
                 0.35443, AIC 3774.69, BIC 3851.77, 13 parameters
tests            LR chi2 3956.3 (df 13, p < 1e-300) against equal shares; LR
                 chi2 2058.1 (df 10, p < 1e-300) against market shares; gradient
                 norm 1e-09; Hessian condition number 6.07e+07; standard errors:
                 classic

"""


@pytest.mark.parametrize("columns", [60, 80, 200, None])
def test_fit_summary_is_exact_and_holds_every_estimate(mode_canada, columns):
    result = load_result(mode_canada)
    result.fit["seconds"] = 0.25  # facts that change from run to run (and with the BLAS)
    result.fit["gradient_norm"] = 1e-9
    lines = [line.plain for line in fit_summary(result, columns)]
    text = "\n".join(lines) + "\n"
    table = {60: TABLE_60, 80: TABLE_80, 200: TABLE_200, None: TABLE_200}[columns]
    if columns == 80:
        assert text == SUMMARY_80 + table
    assert text.endswith("\n\n" + table)  # constant terms first, then blocks in formula order
    assert all(line == line.rstrip() for line in lines)
    if columns:
        assert max(len(line) for line in lines) <= columns
    else:
        assert "against market shares 0.35443, AIC 3774.69" in text  # one line, no limit


@pytest.mark.parametrize("columns", ["60", "80", "200", None])
def test_fit_summary_through_the_cli_is_plain_and_complete(mode_canada_parquet, tmp_path, columns):
    """stderr a pipe: no escape codes, no padding, no line past COLUMNS, every estimate."""
    model = tmp_path / "m"
    env = {"COLUMNS": columns} if columns else {}
    done = run("fit", str(mode_canada_parquet), "-f", MODE_CANADA_FORMULA, *MODE_CANADA,
               "-m", str(model), env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert ESCAPE not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert [line for line in lines if line != line.rstrip()] == []
    assert lines[-1] == f"model written to {model}/"  # a path: long, never broken
    assert max(len(line) for line in lines[:-1]) <= int(columns or 10_000)
    assert_every_estimate_printed(done.stderr, pl.read_parquet(model / "coefficients.parquet"))
    assert "sig: *** p < 0.001, ** p < 0.01, * p < 0.05" in done.stderr


def test_text_width_prefers_columns_then_the_terminal_else_no_limit():
    assert text_width(False, 80, {}) is None
    assert text_width(True, 132, {}) == 132
    assert text_width(False, 80, {"COLUMNS": "60"}) == 60
    assert text_width(True, 132, {"COLUMNS": "abc"}) == 132


# ---------------------------------------------------------------------------------------------
# The summary's order, collapsed blocks and the warnings list (built from known parameters)


def make_result(parameters: list[Parameter], estimates: list[float], errors: list[float],
                **spec) -> FitResult:  # fmt: skip
    count = len(parameters)
    estimate = torch.tensor(estimates, dtype=torch.float64)
    return FitResult(
        spec={"formula": "f", "nests": spec.pop("nests", None), **spec},
        labels={"items": ["a", "b"]},
        parameters=parameters,
        estimate=estimate,
        std_error=torch.tensor(errors, dtype=torch.float64),
        identified=~estimate.isnan(),
        covariance=torch.zeros(0, 0, dtype=torch.float64),
        estimated_index=torch.arange(count),
        fit={
            "n_rows": 10,
            "n_cases": 1,
            "n_alternatives": 2,
            "method": "newton",
            "iterations": 1,
            "converged": True,
            "message": "gradient norm below tolerance",
            "seconds": 0.1,
            "device": "cpu",
            "log_likelihood": -1.0,
            "null_log_likelihood": -2.0,
            "rho_squared": 0.5,
            "adjusted_rho_squared": 0.4,
            "aic": 4.0,
            "bic": 5.0,
            "n_parameters": count,
        },  # fmt: skip
    )


def parameter(term: str, item: str | None = None, *, level: str = "item", fixed: bool = False,
              user: str | None = None, variation: str = "constant") -> Parameter:  # fmt: skip
    variable = term.split("[")[0]
    return Parameter(level, term, variable, variation, variable, item, user, fixed)


def long_model() -> FitResult:
    """30 alternative intercepts, a user term of 5 users, a constant, two lambdas."""
    parameters = [parameter("intercept[item]", f"alt{i:02d}", variation="item", fixed=i == 0)
                  for i in range(30)]  # fmt: skip
    parameters += [parameter("cost[user]", user=f"u{i}", variation="user") for i in range(5)]
    parameters += [parameter("price[constant]")]
    parameters += [parameter("lambda", nest, level="nest", variation="item") for nest in "xy"]
    estimates = [0.0] + [i / 10 for i in range(1, 30)] + [math.nan] * 5 + [-1.5, 0.6, 0.8]
    errors = [math.nan] + [0.1] * 29 + [math.nan] * 5 + [0.2, 0.1, 0.05]
    result = make_result(parameters, estimates, errors, nests={"x": ["a"], "y": ["b"]})
    result.warnings = ["cost[user]: 5 coefficients not estimated", "second warning"]
    return result


def test_summary_shows_singles_and_lambdas_first_and_collapses_long_blocks():
    lines = [line.plain for line in fit_summary(long_model(), 100)]
    start = next(i for i, line in enumerate(lines) if line.startswith("term"))
    rows = lines[start + 1 :]
    assert rows[0].startswith("price[constant]") and "-1.5" in rows[0]
    assert rows[1].startswith("lambda") and "0.6" in rows[1]
    assert rows[2].startswith("lambda") and "0.8" in rows[2]
    assert rows[3] == (
        "intercept[item]        30 coefficients by alternative: 29 estimated, from 0.1 to 2.9, "
        "1 fixed; see"
    )
    assert "choice coef 'intercept[item]'" in rows[4]
    assert rows[5].startswith("cost[user]") and "5 coefficients by user: none estimated" in rows[5]
    assert "choice coef 'cost[user]'" in rows[5] + rows[6]
    assert lines[-3:] == [
        "2 warnings:",
        "  - cost[user]: 5 coefficients not estimated",
        "  - second warning",
    ]


def test_grammar_of_counts():
    assert plural(1, "case") == "1 case" and plural(2, "case") == "2 cases"
    assert plural(1_000, "row") == "1,000 rows"


# ---------------------------------------------------------------------------------------------
# p-values, bounds and runaway estimates


def test_p_values_are_exact_to_the_float_limit_then_below_1e_300():
    z_values = [0.0, 1.959963984540054, 10.0, 30.0, 37.0, 37.5, 40.0]
    count = len(z_values)
    result = make_result(
        [parameter(f"x{i}[constant]") for i in range(count)], z_values, [1.0] * count
    )
    p = result.coefficient_table().get_column("p_value").to_list()
    for z, value in zip(z_values, p, strict=True):
        expected = math.erfc(z / math.sqrt(2.0))  # Python's erfc: exact far into the tail
        assert value == pytest.approx(expected, rel=1e-9, abs=0.0)
    assert p[1] == pytest.approx(0.05, rel=1e-12)
    assert p[3] == pytest.approx(9.813427854297528e-198, rel=1e-9)
    assert format_p(p[3]) == "9.81e-198"
    assert format_p(p[4]) == "1.15e-299"  # still exact just above the limit
    assert 0 < p[5] < 1e-300 and format_p(p[5]) == "< 1e-300"  # 9.2e-308: past the limit
    assert p[6] == 0.0 and format_p(p[6]) == "< 1e-300"  # past the smallest float
    assert format_p(None) == ""


def test_estimates_on_a_bound_are_marked():
    lambdas = [parameter("lambda", nest, level="nest", variation="item") for nest in "xyz"]
    bounded = make_result(lambdas, [1.0, 0.5, 0.01], [0.16, 0.1, 0.1], lambda_bounds=[0.01, 1.0])
    assert bounded.coefficient_table().get_column("at_bound").to_list() == [True, False, True]
    floor = make_result(lambdas, [0.001, 2.0, 0.5], [0.1] * 3)  # lambda's default floor
    assert floor.coefficient_table().get_column("at_bound").to_list() == [True, False, False]
    held = make_result(lambdas, [1.0] * 3, [math.nan] * 3, lambda_fixed=True,
                       lambda_bounds=[0.01, 1.0])  # fmt: skip
    assert not held.coefficient_table().get_column("at_bound").any()
    messages = estimate_warnings(bounded.coefficient_table(), bounded.spec)
    assert len(messages) == 2
    assert messages[0].startswith(
        "lambda of nest 'x' = 1 sits on its bound (--lambda-bounds 0.01,1)"
    )
    text = "\n".join(line.plain for line in coefficient_lines(bounded.coefficient_table(), None))
    assert text.count("at bound") == 3  # two rows and the legend


def test_runaway_estimates_are_called_a_likely_non_identified_model():
    parameters = [parameter("cost[constant]"), parameter("lambda", "a", level="nest"),
                  parameter("intercept[item]", "b", variation="item")]  # fmt: skip
    result = make_result(parameters, [-0.09, 380_041.0, -1.5e6], [0.004, 0.198, 0.04],
                         nests={"a": ["a"], "b": ["b"]})  # fmt: skip
    table = result.coefficient_table()
    messages = estimate_warnings(table, result.spec)
    assert len(messages) == 2
    assert messages[0].startswith("lambda of nest 'a' = 380041 (std. error 0.198): a likely "
                                  "non-identified or runaway model")  # fmt: skip
    assert "--lambda-bounds 0.01,1" in messages[0]
    assert messages[1].startswith("intercept[item] for 'b' = -1.5e+06")
    result.warnings = messages
    summary = "\n".join(line.plain for line in fit_summary(result, None))
    assert "converged by the optimiser's test" in summary and "runaway" in summary
    assert "converged (gradient" not in summary
    rows = [line for line in summary.splitlines() if line.startswith(("lambda", "intercept"))]
    assert all(row.endswith("runaway?") for row in rows)


def test_at_bound_through_the_cli(hc_at_bound, tmp_path):
    model, stderr = hc_at_bound
    table = pl.read_parquet(model / "coefficients.parquet")
    assert table.filter(pl.col("at_bound")).get_column("term").to_list() == ["lambda"]
    assert "Warning: lambda = 0.5 sits on its bound (--lambda-bounds 0.01,0.5)" in stderr
    row = next(line for line in stderr.splitlines() if line.startswith("lambda "))
    assert row.endswith("at bound")
    document = json.loads((model / "model.json").read_text())
    assert any("sits on its bound" in warning for warning in document["warnings"])
    coef = invoke("coef", "lambda", "-m", str(model), "--format", "json")
    assert json.loads(coef.stdout)["coefficients"][0]["at_bound"] is True


def test_lambda_outside_the_unit_interval_suggests_bounds(tmp_path):
    """The warning for a lambda outside (0, 1] explains it and names the remedy."""
    from choicecli.fit import _lambda_warnings

    class Spec:
        lambda_fixed = False

    class Problem:
        lambda_index = torch.tensor([0])
        parameters = [parameter("lambda", "a", level="nest")]
        spec = Spec()

    (message,) = _lambda_warnings(Problem(), torch.tensor([3.75], dtype=torch.float64))
    assert "outside (0, 1]" in message and "random utility maximisation" in message
    assert message.endswith("refit with --lambda-bounds 0.01,1")


# ---------------------------------------------------------------------------------------------
# Models that did not converge or have warnings, JSON, colour, options, messages


@pytest.fixture(scope="module")
def unconverged(tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("report") / "stopped"
    fitted = invoke("fit", str(SAMPLE_DATA / "transport.parquet"), "--formula",
                    "(time|constant) + (1|item)", "--case", "case_id", "--item", "mode",
                    "--choice", "chosen", "--max-iter", "1", "-m", str(model))  # fmt: skip
    assert fitted.exit_code == 3
    return model


def test_using_a_model_that_did_not_converge_warns_once(unconverged, tmp_path):
    data = str(SAMPLE_DATA / "transport.parquet")
    for arguments in (
        ["coef"],
        ["predict", data, "-o", str(tmp_path / "p.csv")],
        ["plot", "-o", str(tmp_path / "c.png")],
    ):
        done = invoke(*arguments, "-m", str(unconverged))
        assert done.exit_code == 0, done.stderr
        lines = done.stderr.splitlines()
        warned = [line for line in lines if line.startswith("warning:")]
        assert len(warned) == 1 and "this model did not converge" in warned[0], arguments
        quiet = invoke(*arguments, "-m", str(unconverged), "-q")
        assert quiet.exit_code == 0 and quiet.stderr == ""
    coef = json.loads(invoke("coef", "-m", str(unconverged), "--format", "json").stdout)
    assert coef["converged"] is False
    assert any("did not converge" in warning for warning in coef["warnings"])
    predicted = invoke("predict", data, "-m", str(unconverged), "--format", "json")
    document = json.loads(predicted.stdout)
    assert document["converged"] is False and document["report"]["n_cases"] > 0


def test_a_model_with_warnings_says_so_on_use(hc_at_bound):
    model, _ = hc_at_bound
    done = invoke("coef", "-m", str(model))
    assert done.stderr.startswith("warning: this model was fitted with 1 warning (the first: ")
    assert len(done.stderr.splitlines()) == 1


def test_no_color_means_no_escape_codes_even_on_a_terminal(hc_at_bound):
    """FORCE_COLOR makes rich treat the pipes as terminals; NO_COLOR must still win."""
    model, _ = hc_at_bound
    arguments = ("coef", "-m", str(model), "--format", "table")
    coloured = run(*arguments, env={"FORCE_COLOR": "1"})
    assert ESCAPE in coloured.stdout and ESCAPE in coloured.stderr  # the test can see codes
    plain = run(*arguments, env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.returncode == 0
    assert ESCAPE not in plain.stdout and ESCAPE not in plain.stderr
    assert "at bound" in plain.stdout


def test_model_json_command_line_is_shell_quoted(mode_canada_parquet, tmp_path):
    model = tmp_path / "quoted model"
    done = run("fit", str(mode_canada_parquet), "-f", "(cost|constant) + (1|item)", *MODE_CANADA,
               "-m", str(model), "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    command = json.loads((model / "model.json").read_text())["provenance"]["command"]
    assert shlex.split(command)[1:] == ["fit", str(mode_canada_parquet), "-f",
                                        "(cost|constant) + (1|item)", *MODE_CANADA,
                                        "-m", str(model), "-q"]  # fmt: skip


def test_version_short_help_and_quiet_on_every_command():
    from choicecli import __version__

    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout == f"choice {__version__}\n"
    for command in ("fit", "predict", "coef", "plot"):
        short = invoke(command, "-h")
        assert short.exit_code == 0 and "--quiet" in short.stdout and "-q" in short.stdout
    assert invoke("-h").exit_code == 0


def test_every_option_has_help_and_fit_help_lists_the_variations():
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for option in command.params:
            assert getattr(option, "help", None), f"{name} {option.opts} has no help"
    text = invoke("fit", "--help").stdout
    for variation, meaning in [
        ("constant", "one coefficient, the same"),
        ("item", "one per alternative, the base"),
        ("item-full", "one per alternative, none fixed"),
        ("user", "one per decision maker"),
        ("user-item", "one per user and alternative, the base"),
        ("user-item-full", "one per user and alternative, none fixed"),
    ]:
        assert re.search(rf"^\s+{re.escape(variation)}\s+{re.escape(meaning)}", text, re.M)


def test_level_filters_with_or_without_a_term(hc_at_bound, mode_canada):
    model, _ = hc_at_bound
    nest = pl.read_csv(invoke("coef", "--level", "nest", "-m", str(model)).stdout.encode())
    assert nest.get_column("level").to_list() == ["nest"]
    item = pl.read_csv(invoke("coef", "--level", "item", "-m", str(model)).stdout.encode())
    assert set(item.get_column("level")) == {"item"} and item.height == 7
    every = pl.read_csv(invoke("coef", "-m", str(model)).stdout.encode())
    assert every.height == 8


def test_messages_name_a_conditional_logit_and_the_terms_at_each_level(mode_canada, hc_at_bound):
    terms = ("cost[constant], freq[constant], ovt[constant], income[item], ivt[item-full], "
             "intercept[item]")  # fmt: skip
    done = invoke("coef", "lambda", "-m", str(mode_canada))
    assert done.exit_code == 1
    assert done.stderr == (
        "Error: 'lambda' belongs to a nested logit, and this model is a conditional logit "
        f"(fitted without --nests); its terms (all at level item): {terms}\n"
    )
    done = invoke("coef", "cost[constant]", "--level", "nest", "-m", str(mode_canada))
    assert done.exit_code == 1 and "this model is a conditional logit: it has no nest level" in (
        done.stderr
    )
    assert done.stderr.rstrip().endswith(terms)
    nested, _ = hc_at_bound
    done = invoke("coef", "ich[constant]", "--level", "nest", "-m", str(nested))
    assert done.exit_code == 1
    assert "(it is a term at --level item)" in done.stderr
    assert "at level nest: lambda" in done.stderr and "at level item: ich[constant]" in done.stderr


def test_predict_names_the_role_option_of_a_renamed_column(mode_canada, mode_canada_parquet,
                                                           tmp_path):  # fmt: skip
    renamed = tmp_path / "renamed.parquet"
    pl.read_parquet(mode_canada_parquet).rename({"alt": "mode"}).write_parquet(renamed)
    done = invoke("predict", str(renamed), "-m", str(mode_canada), "-o", str(tmp_path / "p.csv"))
    assert done.exit_code == 1
    assert "no column 'alt' (the model's --item column); if it has another name here, pass " \
        "--item NAME" in done.stderr  # fmt: skip
    fixed = invoke("predict", str(renamed), "-m", str(mode_canada), "--item", "mode",
                   "-o", str(tmp_path / "p.csv"), "-q")  # fmt: skip
    assert fixed.exit_code == 0, fixed.stderr


def test_one_case_without_a_choice_is_said_in_the_singular(tmp_path):
    frame = pl.DataFrame({"case": [1, 1, 2, 2], "item": ["a", "b", "a", "b"],
                          "choice": [1, 0, 0, 0], "x": [1.0, 2.0, 3.0, 1.0]})  # fmt: skip
    frame.write_parquet(tmp_path / "d.parquet")
    done = invoke("fit", str(tmp_path / "d.parquet"), "-f", "(x|constant)", "-m",
                  str(tmp_path / "m"))  # fmt: skip
    assert done.exit_code == 1 and "1 case has no chosen row" in done.stderr


def test_many_flagged_estimates_are_named_up_to_ten_then_counted():
    parameters = [parameter("x[user]", user=f"u{i}", variation="user") for i in range(25)]
    result = make_result(parameters, [2e4] * 20 + [1.0] * 5, [0.1] * 25)
    messages = estimate_warnings(result.coefficient_table(), result.spec)
    assert len(messages) == 11
    assert messages[0].startswith("x[user] for user 'u0' = 20000 (std. error 0.1)")
    assert messages[-1] == "10 more estimates on a bound or run away: see choice coef"


def test_summary_through_the_cli_puts_lambdas_first_and_names_collapsed_terms(tmp_path):
    """Finding 2 and 11: lambdas were hidden below the alternative intercepts, and user terms
    were '862 user-specific coefficients' with no term named."""
    done = invoke("fit", str(reference_file("HC.csv")), *HC, "-f", "(1|item) + (ich|constant)",
                  "--nests", HC_NESTS, "-m", str(tmp_path / "hc"),
                  env={"COLUMNS": "100"})  # fmt: skip
    assert done.exit_code == 0, done.stderr
    lines = done.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("term "))
    firsts = [line.split()[0] for line in lines[start + 1 : start + 5]]
    assert firsts == ["ich[constant]", "lambda", "lambda", "intercept[item]"]
    users = invoke("fit", str(SAMPLE_DATA / "transport.parquet"), "-f",
                   "(time|constant) + (cost|user)", "--case", "case_id", "--item", "mode",
                   "--choice", "chosen", "--user", "user_id", "-m", str(tmp_path / "t"),
                   env={"COLUMNS": "200"})  # fmt: skip
    assert users.exit_code == 0, users.stderr
    line = next(line for line in users.stderr.splitlines() if line.startswith("cost[user]"))
    assert re.search(r"150 coefficients by user: 150 estimated, from \S+ to \S+; see choice "
                     r"coef 'cost\[user\]'$", line)  # fmt: skip
