"""The estimator's runaway test and progress reports, through the library and the real CLI."""

from __future__ import annotations

import json
import re
import subprocess

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from choicecli.cli import app
from choicecli.estimate import (
    EstimateOptions,
    Iteration,
    Objective,
    _runaway,
    maximise,
)
from conftest import CHOICE_EXECUTABLE, SAMPLE_DATA, problem_for, random_theta

MODE_CANADA_NESTED = [
    "--formula", "(cost|constant) + (1|item)", "--item", "alt",
    "--nests", "a=air,bus;b=car,train",
]  # fmt: skip
TRANSPORT = [
    "--formula", "(time|constant) + (1|item) + (income|item) + (cost|user)",
    "--case", "case_id", "--item", "mode", "--choice", "chosen", "--user", "user_id",
]  # fmt: skip
# one --verbose line: method, iteration, log-likelihood, decrement or gradient, step, seconds
VERBOSE_LINE = re.compile(
    r"^(newton|lbfgs)[^:]* iteration (\d+): log-likelihood (-?\d+\.\d{6})  "
    r"(decrement|gradient) (\S+)  step (\S+)  (\d+\.\d{2}) s$"
)

ITERATION = re.compile(r"iteration \d+:")


def invoke(*arguments: str):
    return CliRunner().invoke(app, list(arguments))


def fit_statistics(model) -> dict:
    return json.loads((model / "model.json").read_text())["fit"]


@pytest.fixture(scope="module")
def separable_parquet(tmp_path_factory):
    """Every case chooses its alternative of largest x: (x|constant) has no finite optimum."""
    generator = torch.Generator().manual_seed(1)
    n_cases, n_items = 200, 3
    x = torch.randn(n_cases, n_items, generator=generator, dtype=torch.float64)
    chosen = x.argmax(dim=1)
    items = torch.arange(n_items).repeat(n_cases)
    frame = pl.DataFrame(
        {
            "case": torch.arange(n_cases).repeat_interleave(n_items).numpy(),
            "item": [f"i{j}" for j in items.tolist()],
            "choice": (items == chosen.repeat_interleave(n_items)).long().numpy(),
            "x": x.reshape(-1).numpy(),
        }
    )
    path = tmp_path_factory.mktemp("separable") / "separable.parquet"
    frame.write_parquet(path)
    return path


def test_a_lambda_running_away_stops_the_fit_with_exit_3_and_names_it(
    mode_canada_parquet, tmp_path
):
    """ModeCanada's nested example (issue 17): the likelihood rises as lambda_a grows. It
    used to be reported converged at lambda_a = 380,041; now it stops within a few dozen
    iterations, exit 3, the model written, the lambda named with the bounds to use."""
    model = tmp_path / "model"
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "fit", str(mode_canada_parquet), *MODE_CANADA_NESTED,
         "-m", str(model), "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 3, completed.stderr
    assert "lambda:a" in completed.stderr
    assert "--lambda-bounds 0.01,1" in completed.stderr
    assert "Traceback" not in completed.stderr
    statistics = fit_statistics(model)
    assert statistics["converged"] is False
    assert statistics["stopped"] == "runaway"
    assert "lambda:a" in statistics["runaway"]
    assert "lambda:b" not in statistics["runaway"]
    assert statistics["iterations"] <= 40
    coefficients = pl.read_parquet(model / "coefficients.parquet")
    lambda_a = coefficients.filter((pl.col("term") == "lambda") & (pl.col("item") == "a"))
    assert 100.0 <= float(lambda_a["estimate"][0]) < 1000.0  # stopped soon past the ceiling


def test_the_same_model_with_lambda_bounds_converges_at_the_bound(mode_canada_parquet, tmp_path):
    model = tmp_path / "model"
    result = invoke("fit", str(mode_canada_parquet), *MODE_CANADA_NESTED, "-m", str(model),
                    "--lambda-bounds", "0.01,1")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    statistics = fit_statistics(model)
    assert statistics["converged"] is True
    assert "stopped" not in statistics and "runaway" not in statistics


def test_a_separable_conditional_logit_stops_as_a_runaway(separable_parquet, tmp_path):
    model = tmp_path / "model"
    result = invoke("fit", str(separable_parquet), "-f", "(x|constant)", "-m", str(model))
    assert result.exit_code == 3, result.stderr
    assert "x[constant] grows without bound" in result.stderr
    assert "drop or merge the term x[constant]" in result.stderr
    assert "perfect prediction" in result.stderr  # the diagnosis still runs at the stop
    statistics = fit_statistics(model)
    assert statistics["stopped"] == "runaway"
    assert statistics["runaway"] == ["x[constant]"]
    assert statistics["iterations"] <= 40


def test_normal_fits_are_not_runaways(tmp_path):
    """An interior optimum: converged, exit 0, no runaway recorded (the whole suite's fits
    converge as before, so none of them is taken for one either)."""
    model = tmp_path / "model"
    result = invoke("fit", str(SAMPLE_DATA / "transport.parquet"), *TRANSPORT, "-m", str(model))
    assert result.exit_code == 0, result.stderr
    statistics = fit_statistics(model)
    assert statistics["converged"] is True
    assert "stopped" not in statistics


def test_runaway_rule_on_made_up_sequences():
    """Shrinking gains with steady or growing steps in one direction: a runaway; steps that
    shrink with the gains (Newton's quadratic convergence), or a turn: none."""
    gains = [1.0, 0.5, 0.25, 0.125, 0.0625]
    steady = [torch.tensor([2.0, 0.01 / (k + 1)], dtype=torch.float64) for k in range(5)]
    theta = torch.tensor([10.0, 0.1], dtype=torch.float64)
    # the gains left (0.0625) are small against a log-likelihood of 1e6: settled
    assert _runaway(gains, steady, -1e6, theta, None) == [0]
    # large against a log-likelihood of 10: not yet, unless past a ceiling
    assert _runaway(gains, steady, -10.0, theta, None) is None
    ceilings = torch.tensor([5.0, torch.inf], dtype=torch.float64)
    assert _runaway(gains, steady, -10.0, theta, ceilings) == [0]
    shrinking = [torch.tensor([2.0**-k, 0.0], dtype=torch.float64) for k in range(5)]
    assert _runaway(gains, shrinking, -1e6, theta, None) is None
    turning = [torch.tensor([(-1.0) ** k, 0.0], dtype=torch.float64) for k in range(5)]
    assert _runaway(gains, turning, -1e6, theta, None) is None
    assert _runaway([1.0, 0.9, 0.85, 0.8], steady[:4], -1e6, theta, None) is None


def test_progress_hears_every_iteration_with_its_fields():
    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet")
    from choicecli.data import Roles

    roles = Roles(case="case_id", item="mode", choice="chosen", user="user_id")
    problem = problem_for(frame, "(time|constant) + (1|item)", roles=roles)
    model = problem.model(torch.device("cpu"))
    free = (~problem.fixed).nonzero().flatten()
    objective = Objective(model, free, problem.start, torch.ones(free.numel(), dtype=torch.bool),
                          0.0)  # fmt: skip
    heard: list[Iteration] = []
    for method in ("newton", "lbfgs"):
        heard.clear()
        start = random_theta(free.numel(), seed=2, scale=0.1)
        outcome = maximise(objective, start, EstimateOptions(method=method), progress=heard.append)
        assert outcome.converged
        assert [i.number for i in heard if i.method == method] == list(
            range(1, sum(i.method == method for i in heard) + 1)
        )
        assert all(b.seconds >= a.seconds for a, b in zip(heard, heard[1:], strict=False))
        newton = [i for i in heard if i.method == "newton"]
        assert newton[-1].log_likelihood == pytest.approx(outcome.log_likelihood, abs=1e-9)
        assert newton[-1].decrement == outcome.gradient_norm  # the last convergence test
        assert all(0.0 < i.step <= 1.0 for i in newton[:-1])


def verbose_lines(stderr: str) -> list[re.Match]:
    return [m for m in map(VERBOSE_LINE.match, stderr.splitlines()) if m]


@pytest.mark.parametrize("method", ["newton", "lbfgs"])
def test_verbose_prints_one_line_per_iteration_on_a_non_terminal_stderr(tmp_path, method):
    model = tmp_path / "model"
    data = str(SAMPLE_DATA / "transport.parquet")
    result = invoke("fit", data, *TRANSPORT, "-m", str(model), "--verbose", "--method", method)
    assert result.exit_code == 0, result.stderr
    lines = verbose_lines(result.stderr)
    statistics = fit_statistics(model)
    newton = [m for m in lines if m.group(1) == "newton"]
    assert newton and [int(m.group(2)) for m in newton] == list(range(1, len(newton) + 1))
    if method == "newton":
        assert len(newton) == statistics["iterations"]
        assert all(m.group(4) == "decrement" for m in newton)
    else:  # L-BFGS reports its evaluations and the largest gradient, then the Newton polish
        assert lines[0].group(1) == "lbfgs" and lines[0].group(4) == "gradient"
    # the last line is the last convergence test: the optimum's log-likelihood and decrement
    assert float(lines[-1].group(3)) == pytest.approx(statistics["log_likelihood"], abs=1e-6)
    assert float(lines[-1].group(5)) == pytest.approx(statistics["gradient_norm"], rel=1e-3)
    quiet = invoke("fit", data, *TRANSPORT, "-m", str(tmp_path / "other"), "--method", method)
    assert quiet.exit_code == 0 and not ITERATION.search(quiet.stderr)


def test_verbose_in_a_subprocess_writes_its_lines_to_stderr_only(tmp_path):
    data = str(SAMPLE_DATA / "transport.parquet")
    command = [str(CHOICE_EXECUTABLE), "fit", data, *TRANSPORT, "--threads", "1"]
    loud = subprocess.run([*command, "-m", str(tmp_path / "a"), "--verbose"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert loud.returncode == 0, loud.stderr
    lines = verbose_lines(loud.stderr)
    assert len(lines) == fit_statistics(tmp_path / "a")["iterations"]
    assert not ITERATION.search(loud.stdout)
    silent = subprocess.run([*command, "-m", str(tmp_path / "b")],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert silent.returncode == 0, silent.stderr
    assert not ITERATION.search(silent.stderr) and not ITERATION.search(silent.stdout)
