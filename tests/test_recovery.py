"""Parameter recovery on simulated data with known truth, for every variation and for nests."""

from __future__ import annotations

import json
from dataclasses import replace

import polars as pl
import pytest
import torch

from choicecli.data import Roles
from choicecli.fit import FitOptions, fit_model
from choicecli.problem import ModelSpec, build_problem
from conftest import SAMPLE_DATA

EVERY_VARIATION = (
    "(x1|constant) + (1|item) + (x2|item-full) + (x3|item) + (x4|user) + (x5|user-item) "
    "+ (x6|user-item-full)"
)
ROLES = Roles(case="case", item="item", choice="choice", user="user")


def simulated_frame(n_users: int, cases_per_user: int, n_items: int, seed: int) -> pl.DataFrame:
    generator = torch.Generator().manual_seed(seed)
    n_cases = n_users * cases_per_user
    rows = n_cases * n_items
    columns = {
        f"x{k}": torch.randn(rows, generator=generator, dtype=torch.float64).numpy()
        for k in range(1, 7)
    }
    return pl.DataFrame(
        {
            "case": torch.arange(n_cases).repeat_interleave(n_items).numpy(),
            "item": [f"alt{j}" for j in range(n_items)] * n_cases,
            "user": (torch.arange(n_cases) % n_users).repeat_interleave(n_items).numpy(),
            "choice": ([1] + [0] * (n_items - 1)) * n_cases,
            **columns,
        }
    )


def simulate_choices(frame: pl.DataFrame, formula: str, seed: int, **spec) -> tuple:
    """Draw each case's choice from the model at a random truth; return (frame, truth, problem)."""
    problem = build_problem(frame, ModelSpec(formula, ROLES, **spec), "simulation")
    generator = torch.Generator().manual_seed(seed)
    truth = 0.7 * torch.randn(len(problem.parameters), generator=generator, dtype=torch.float64)
    truth[problem.fixed] = 0.0
    if problem.lambda_index is not None:
        count = problem.lambda_index.numel()
        truth[problem.lambda_index] = torch.linspace(0.45, 0.85, count, dtype=torch.float64)
    data = problem.data
    log_p = problem.model(torch.device("cpu")).row_log_probabilities(truth)
    n_items = data.n_items
    gumbel = -torch.log(-torch.log(torch.rand(log_p.shape, generator=generator)))
    grid = (log_p + gumbel).view(data.n_cases, n_items)  # full choice sets
    chosen = torch.zeros_like(grid).scatter_(1, grid.argmax(1, keepdim=True), 1.0).view(-1)
    order = data.source_row.argsort()
    frame = frame.with_columns(pl.Series("choice", chosen[order].long().numpy()))
    return frame, truth, problem


def assert_recovered(result, truth: torch.Tensor, max_z: float = 4.5) -> None:
    estimated = result.identified & ~torch.isnan(result.std_error)
    z = (result.estimate[estimated] - truth[estimated]) / result.std_error[estimated]
    assert result.fit["converged"]
    assert z.abs().max() < max_z, f"largest |z| {float(z.abs().max()):.2f}"
    assert z.abs().mean() < 1.2  # about 0.8 when the errors are right


def test_every_variation_is_recovered():
    frame = simulated_frame(n_users=25, cases_per_user=120, n_items=4, seed=1)
    frame, truth, problem = simulate_choices(frame, EVERY_VARIATION, seed=2)
    result, _ = fit_model(frame, ModelSpec(EVERY_VARIATION, ROLES), FitOptions(), where="sim")
    assert result.identified.all()
    variations = {p.variation for p, fixed in zip(problem.parameters, problem.fixed.tolist(),
                                                  strict=True) if not fixed}  # fmt: skip
    assert variations == {"constant", "item", "item-full", "user", "user-item", "user-item-full"}
    assert_recovered(result, truth)


def test_nested_lambdas_and_nest_level_coefficients_are_recovered():
    frame = simulated_frame(n_users=20, cases_per_user=250, n_items=6, seed=3)
    spec = {
        "nests": "n0=alt0,alt1,alt2;n1=alt3,alt4,alt5",
        "nest_formula": "(x4|constant) + (1|item)",
    }
    formula = "(x1|constant) + (x2|constant)"
    nest_level = frame.with_columns(
        pl.col("x4").first().over(["case", pl.col("item").is_in(["alt0", "alt1", "alt2"])])
    )
    nest_level, truth, problem = simulate_choices(nest_level, formula, seed=4, **spec)
    result, _ = fit_model(nest_level, ModelSpec(formula, ROLES, **spec), FitOptions(),
                          where="sim")  # fmt: skip
    lambdas = result.estimate[problem.lambda_index]
    assert torch.allclose(
        truth[problem.lambda_index], torch.tensor([0.45, 0.85], dtype=torch.float64)
    )
    assert_recovered(result, truth)
    assert (lambdas > 0.2).all() and (lambdas < 1.2).all()


def test_transport_sample_truth_is_recovered():
    truth = json.loads((SAMPLE_DATA / "true_coefficients.json").read_text())["transport"]
    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet")
    roles = Roles(case="case_id", item="mode", choice="chosen", user="user_id")
    result, problem = fit_model(frame, ModelSpec(truth["formula"], roles), FitOptions(),
                                where="transport")  # fmt: skip
    table = result.coefficient_table().filter(~pl.col("fixed"))
    shared = table.filter(pl.col("user").is_null())
    for row in shared.iter_rows(named=True):
        expected = truth[row["term"]]
        value = expected[row["item"]] if isinstance(expected, dict) else expected
        assert abs(row["estimate"] - value) < 4.5 * row["std_error"], row["term"]
    slopes = table.filter(pl.col("term") == "cost[user]")
    true_slopes = pl.Series([truth["cost[user]"][u] for u in slopes.get_column("user")])
    errors = (slopes.get_column("estimate") - true_slopes) / slopes.get_column("std_error")
    assert errors.abs().max() < 4.5
    assert abs(slopes.get_column("estimate").mean() - (-0.8)) < 0.15


def test_tutorial_nested_part_runs_with_per_nest_lambdas(tmp_path):
    from typer.testing import CliRunner

    from choicecli.cli import app

    model = tmp_path / "nested"
    data = tmp_path / "tutorial_40_users.parquet"  # the tutorial's data, a fifth of it
    tutorial = pl.read_parquet(SAMPLE_DATA / "tutorial.parquet")
    tutorial.filter(pl.col("user_id") < "user_40").write_parquet(data)
    runner = CliRunner()
    result = runner.invoke(app, [
        "fit", str(data),
        "--formula", "(1|item) + (user_obs_*|item) + (itemsession_obs_*|constant)",
        "--nests", "col:nest", "--nest-formula", "(1|user) + (1|item) + (nest_obs_*|user)",
        "--case", "case_id", "--item", "item_id", "--choice", "chosen", "--user", "user_id",
        "-m", str(model),
    ])  # fmt: skip
    assert result.exit_code in (0, 3), result.stderr
    assert "intercept[user] (nest level)" in result.stderr
    assert "intercept[item] (nest level)" in result.stderr  # nest intercepts beside item ones
    users = runner.invoke(app, ["coef", "intercept[user]", "--level", "nest", "-m", str(model)])
    rows = pl.read_csv(users.stdout.encode())
    assert rows.height == 40 and not rows.get_column("identified").any()
    assert set(rows.get_column("level")) == {"nest"}
    lambdas = pl.read_csv(runner.invoke(app, ["coef", "lambda", "-m", str(model)]).stdout.encode())
    assert lambdas.get_column("item").to_list() == [f"nest_{k}" for k in range(5)]
    assert lambdas.get_column("estimate").is_not_null().all()
    slopes = runner.invoke(app, ["coef", "nest_obs_*[user]", "--level", "nest", "-m", str(model)])
    assert pl.read_csv(slopes.stdout.encode()).height == 40


@pytest.mark.parametrize("shared", [True, False])
def test_nested_with_lambda_fixed_at_one_equals_conditional_logit(shared):
    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet")
    roles = Roles(case="case_id", item="mode", choice="chosen")
    formula = "(time|constant) + (cost|constant) + (1|item)"
    plain, _ = fit_model(frame, ModelSpec(formula, roles), FitOptions(), where="t")
    nested, _ = fit_model(
        frame,
        ModelSpec(
            formula,
            roles,
            nests="slow=walk,bike;motor=bus,car,train",
            shared_lambda=shared,
            lambda_fixed=True,
        ),  # fmt: skip
        FitOptions(),
        where="t",
    )
    assert nested.fit["log_likelihood"] == pytest.approx(plain.fit["log_likelihood"], abs=1e-8)
    count = len(plain.parameters)
    assert torch.allclose(nested.estimate[:count], plain.estimate, atol=1e-7, equal_nan=True)
    assert torch.allclose(nested.std_error[:count], plain.std_error, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("nests", [None, "slow=walk,bike;motor=bus,car,train"])
def test_case_weights_equal_repeated_cases(nests):
    """A case of weight 2 counts as the same case twice: same estimates and log-likelihood."""
    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet").filter(pl.col("case_id") <= 600)
    weights = (pl.col("case_id") % 3 == 0).cast(pl.Float64) + 1.0  # 1 or 2
    weighted = frame.with_columns(weights.alias("weight"))
    repeated = pl.concat(
        [frame, frame.filter(pl.col("case_id") % 3 == 0).with_columns(pl.col("case_id") + 10_000)]
    )
    formula = "(time|constant) + (cost|constant) + (1|item)"
    roles = Roles(case="case_id", item="mode", choice="chosen")
    options = {"nests": nests, "shared_lambda": True} if nests else {}
    by_weight, _ = fit_model(
        weighted, ModelSpec(formula, replace(roles, weights="weight"), **options), FitOptions(),
        where="w",
    )  # fmt: skip
    by_copy, _ = fit_model(repeated, ModelSpec(formula, roles, **options), FitOptions(), where="r")
    assert by_weight.fit["log_likelihood"] == pytest.approx(by_copy.fit["log_likelihood"], abs=1e-8)
    assert torch.allclose(by_weight.estimate, by_copy.estimate, atol=1e-7, equal_nan=True)
    assert torch.allclose(by_weight.std_error, by_copy.std_error, atol=1e-7, equal_nan=True)
