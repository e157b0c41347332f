"""The nested logit's analytic Hessian with per-user terms at both levels (nested_hessian.py):
against autograd, by blocks against dense solves, and a fit through the CLI against the
dense path with autograd's Hessian."""

from __future__ import annotations

import functools
import subprocess

import polars as pl
import pytest
import torch

import choicecli.fit as fit_module
from choicecli.data import Roles
from choicecli.estimate import EstimateOptions, _newton_direction, covariance
from choicecli.fit import FitOptions, fit_model
from choicecli.models import DenseNestedLogit, RaggedNestedLogit
from choicecli.problem import ModelSpec
from conftest import CHOICE_EXECUTABLE, problem_for, random_theta

ITEM_FORMULA = "(1|item) + (x1|constant) + (x3|user)"
NEST_FORMULA = "(1|item) + (1|user) + (z|user)"
NESTS = "n0=i0,i1,i2;n1=i3,i4,i5;n2=i6,i7,i8"
ROLES = Roles(case="case", item="item", choice="choice", user="user", weights="weight")


def simulated_nested_frame(
    n_cases: int = 300, n_users: int = 20, missing: float = 0.0, seed: int = 7
) -> pl.DataFrame:
    """Nine alternatives in three nests of three, drawn from a nested logit with known
    coefficients (per-user slopes at both levels, lambdas 0.5 to 0.8); `missing` of the
    alternatives absent (never a chosen one's whole nest: probabilities over the offered)."""
    generator = torch.Generator().manual_seed(seed)
    n_items, n_nests = 9, 3
    nest = torch.arange(n_items) // 3  # (J,)
    user = torch.randint(0, n_users, (n_cases,), generator=generator)  # (N,)
    x1, x3 = torch.randn(2, n_cases, n_items, generator=generator, dtype=torch.float64)
    z = torch.randn(n_cases, n_nests, generator=generator, dtype=torch.float64)[:, nest]
    offered = torch.rand(n_cases, n_items, generator=generator) >= missing  # (N, J)
    offered[:, 0] = offered[:, 4] = True  # two nests always offered
    intercept = torch.linspace(-0.4, 0.4, n_items, dtype=torch.float64)
    intercept[0] = 0.0
    slope = 0.8 + 0.3 * torch.randn(n_users, generator=generator, dtype=torch.float64)
    nest_slope = 0.4 + 0.3 * torch.randn(n_users, generator=generator, dtype=torch.float64)
    lambdas = torch.tensor([0.5, 0.65, 0.8], dtype=torch.float64)
    utility = intercept - 1.0 * x1 + slope[user][:, None] * x3  # (N, J)
    scaled = (utility / lambdas[nest]).masked_fill(~offered, -torch.inf)  # (N, J)
    inclusive = torch.stack([scaled[:, nest == k].logsumexp(1) for k in range(n_nests)], 1)
    upper = nest_slope[user][:, None] * z[:, [0, 3, 6]] + lambdas * inclusive  # (N, M)
    upper = torch.nan_to_num(upper, nan=-torch.inf)
    log_p = scaled - inclusive[:, nest] + upper[:, nest] - upper.logsumexp(1, keepdim=True)
    chosen = torch.multinomial(log_p.exp().nan_to_num(0.0), 1, generator=generator)[:, 0]
    weight = 0.5 + torch.rand(n_cases, generator=generator, dtype=torch.float64)  # (N,)
    case, item = offered.nonzero(as_tuple=True)  # (R,) by case, then alternative
    return pl.DataFrame(
        {
            "case": case.tolist(),
            "item": [f"i{k}" for k in item.tolist()],
            "user": [f"u{u}" for u in user[case].tolist()],
            "x1": x1[case, item].tolist(),
            "x3": x3[case, item].tolist(),
            "z": z[case, item].tolist(),
            "weight": weight[case].tolist(),
            "choice": (chosen[case] == item).long().tolist(),
        }
    )


def nested_problem(frame: pl.DataFrame, shared_lambda: bool = False, weights: bool = True):
    roles = ROLES if weights else Roles(case="case", item="item", choice="choice", user="user")
    return problem_for(
        frame, ITEM_FORMULA, nests=NESTS, nest_formula=NEST_FORMULA,
        shared_lambda=shared_lambda, roles=roles,
    )  # fmt: skip


def relative_error(left: torch.Tensor, right: torch.Tensor) -> float:
    return float((left - right).abs().max() / right.abs().max())


def at_random_point(problem, seed: int) -> torch.Tensor:
    theta = random_theta(len(problem.parameters), seed=seed)
    lambdas = problem.lambda_index.unique()
    theta[lambdas] = torch.tensor([0.55, 0.8, 1.3], dtype=torch.float64)[: lambdas.numel()]
    return theta


@pytest.mark.parametrize("shared_lambda", [False, True])
@pytest.mark.parametrize(
    ("missing", "threshold", "strategy"),
    [
        (0.0, 0.5, DenseNestedLogit),  # every alternative offered: full grid
        (0.2, 0.5, DenseNestedLogit),  # varying choice sets on a padded grid
        (0.2, 2.0, RaggedNestedLogit),  # varying choice sets over rows (Hessian on a grid)
    ],
)
def test_nested_hessian_with_user_terms_at_both_levels_equals_autograd(
    shared_lambda, missing, threshold, strategy, monkeypatch
):
    from choicecli import problem as problem_module

    pick = problem_module.nested_logit
    monkeypatch.setattr(problem_module, "nested_logit", lambda rows: pick(rows, threshold))
    frame = simulated_nested_frame(n_cases=60, n_users=4, missing=missing)
    problem = nested_problem(frame, shared_lambda)
    model = problem.model(torch.device("cpu"))
    assert type(model) is strategy and model.by_user and model.analytic_hessian_limit is None
    theta = at_random_point(problem, seed=11)
    auto_hessian = torch.func.hessian(model.log_likelihood)(theta)
    assert relative_error(model.hessian(theta), auto_hessian) <= 1e-9
    _, gradient = model.value_and_gradient(theta)
    auto_gradient = torch.func.grad(model.log_likelihood)(theta)
    assert relative_error(gradient, auto_gradient) <= 1e-9


def test_every_variation_at_both_levels_equals_autograd():
    """user-item terms, alternative-level slopes and nest-level per-nest ones, all at once."""
    frame = simulated_nested_frame(n_cases=50, n_users=3, missing=0.2, seed=3)
    problem = problem_for(
        frame,
        "(x1|constant) + (1|item) + (x3|item) + (x1|user) + (x3|user-item) + (z|item-full)",
        nests=NESTS, nest_formula="(z|item) + (1|user) + (z|user-item)", roles=ROLES,
    )  # fmt: skip
    model = problem.model(torch.device("cpu"))
    theta = at_random_point(problem, seed=5)
    auto_hessian = torch.func.hessian(model.log_likelihood)(theta)
    assert relative_error(model.hessian(theta), auto_hessian) <= 1e-9


@pytest.mark.parametrize("nest_formula", ["", "(z|item)"])
def test_compact_hessian_equals_the_per_parameter_one_without_user_terms(nest_formula):
    """Past ANALYTIC_NESTED_LIMIT parameters the compact path serves models without user
    terms too: the same matrix as the (cases x alternatives x P) one below it."""
    frame = simulated_nested_frame(n_cases=80, missing=0.2, seed=9)
    problem = problem_for(
        frame, "(1|item) + (x1|constant) + (x3|item)", nests=NESTS,
        nest_formula=nest_formula, roles=ROLES,
    )  # fmt: skip
    model = problem.model(torch.device("cpu"))
    assert not model.by_user
    theta = at_random_point(problem, seed=13)
    state = model._state(theta)
    compact = model._compact_hessian(theta, state)
    assert relative_error(compact, model.hessian(theta)) <= 1e-12


@functools.cache
def fitted_hessian(n_users: int = 40):
    """A nested model's Hessian (free parameters) at its optimum and their user groups."""
    frame = simulated_nested_frame(n_cases=800, n_users=n_users, seed=21)
    result, problem = fit_model(frame, nested_spec(), FitOptions(device="cpu"), where="test")
    free = result.estimated_index
    model = problem.model(torch.device("cpu"))
    theta = torch.nan_to_num(result.estimate, nan=0.0)
    groups = fit_module._user_groups(problem, torch.device("cpu"))[free]
    return model.hessian(theta)[free][:, free], groups  # (P, P), (P,)


def nested_spec(**options) -> ModelSpec:
    return ModelSpec(
        formula=ITEM_FORMULA, nest_formula=NEST_FORMULA, nests=NESTS, roles=ROLES, **options
    )


def test_block_newton_step_and_covariance_equal_the_dense_ones():
    hessian, groups = fitted_hessian()
    assert int((groups >= 0).sum()) >= 64  # enough per-user coefficients for blocks
    gradient = random_theta(hessian.shape[0], seed=3)
    by_blocks = _newton_direction(gradient, hessian, groups)
    dense = _newton_direction(gradient, hessian, None)
    assert relative_error(by_blocks, dense) <= 1e-9
    block_covariance, definite = covariance(hessian, groups)
    dense_covariance, dense_definite = covariance(hessian, None)
    assert definite and dense_definite
    assert relative_error(block_covariance, dense_covariance) <= 1e-9


def test_block_newton_step_away_from_concavity_is_saddle_free_in_the_shared_part():
    """Where -H is not positive definite in the shared coefficients (lambdas, far from the
    optimum) but every user's block is, the step by blocks takes the shared coefficients'
    Schur complement with its eigenvalues made positive: computed densely here."""
    hessian, groups = fitted_hessian()
    lambdas = (groups < 0).nonzero().flatten()[-3:]  # the last shared ones: the lambdas
    hessian = hessian.clone()
    hessian[lambdas, lambdas] = -hessian[lambdas, lambdas]  # indefinite
    gradient = random_theta(hessian.shape[0], seed=4)
    by_blocks = _newton_direction(gradient, hessian, groups)
    information = -hessian
    own, shared = (groups >= 0).nonzero().flatten(), (groups < 0).nonzero().flatten()
    blocks = information[own][:, own]
    border = information[own][:, shared]
    schur = information[shared][:, shared] - border.T @ torch.linalg.solve(blocks, border)
    values, vectors = torch.linalg.eigh(schur)
    assert float(values.min()) < 0  # not positive definite
    absolute = (vectors * values.abs().clamp_min(1e-8 * float(values.abs().max()))) @ vectors.T
    modified = information.clone()
    modified[shared[:, None], shared[None, :]] = absolute + border.T @ torch.linalg.solve(
        blocks, border
    )
    dense = torch.linalg.solve(modified, gradient)
    assert relative_error(by_blocks, dense) <= 1e-9
    assert float(gradient @ by_blocks) > 0  # an ascent direction


def test_block_newton_step_with_a_ridge_equals_the_dense_one():
    """Where a user's block is not positive definite both add the same growing ridge."""
    hessian, groups = fitted_hessian()
    first_user = (groups == 0).nonzero().flatten()
    hessian = hessian.clone()
    hessian[first_user, first_user] = -hessian[first_user, first_user]  # indefinite
    gradient = random_theta(hessian.shape[0], seed=4)
    by_blocks = _newton_direction(gradient, hessian, groups)
    dense = _newton_direction(gradient, hessian, None)
    assert relative_error(by_blocks, dense) <= 1e-9


def test_tutorial_shaped_nested_fit_through_the_cli_equals_the_dense_autograd_path(
    tmp_path, monkeypatch
):
    """300 cases, 20 users, 9 alternatives in 3 nests, per-user terms at both levels: the CLI
    (analytic Hessian by blocks) and Newton with autograd's Hessian and dense solves reach
    the same estimates."""
    frame = simulated_nested_frame()
    data = tmp_path / "nested.parquet"
    frame.write_parquet(data)
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "fit", str(data), "-f", ITEM_FORMULA, "--nest-formula",
         NEST_FORMULA, "--nests", NESTS, "--user", "user", "--weights", "weight",
         "-m", str(tmp_path / "m"), "--threads", "1", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    table = pl.read_parquet(tmp_path / "m" / "coefficients.parquet")
    # the dense path: autograd's Hessian, no user groups (dense Newton steps and covariance)
    monkeypatch.setattr(fit_module, "_user_groups", lambda problem, device: None)
    monkeypatch.setattr(
        DenseNestedLogit, "hessian", lambda self, t: torch.func.hessian(self.log_likelihood)(t)
    )
    result, _ = fit_model(frame, nested_spec(), FitOptions(device="cpu"), where="test")
    assert result.fit["converged"]
    expected = result.coefficient_table()
    assert table.get_column("identified").to_list() == expected.get_column("identified").to_list()
    # found before the fit, not estimated: the nest-level (1|user) cancels, and (1|item) there
    # adds nothing to the alternatives' intercepts
    unidentified = table.filter(~pl.col("identified")).select("level", "term").rows()
    assert set(unidentified) == {("nest", "intercept[user]"), ("nest", "intercept[item]")}
    estimated = pl.col("identified") & ~pl.col("fixed")
    left = torch.tensor(table.filter(estimated).get_column("estimate").to_list())
    right = torch.tensor(expected.filter(estimated).get_column("estimate").to_list())
    assert left.numel() == 52 and torch.allclose(left, right, rtol=0, atol=1e-6)
    spread = torch.tensor(table.filter(estimated).get_column("std_error").to_list())
    dense_spread = torch.tensor(expected.filter(estimated).get_column("std_error").to_list())
    assert torch.allclose(spread, dense_spread, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("spec_options", "l2_penalty"),
    [
        ({"shared_lambda": True}, 0.0),
        ({"lambda_bounds": (0.01, 0.6)}, 0.0),  # the upper bound holds some lambdas
        ({"lambda_fixed": True, "lambda_init": 0.7}, 0.0),
        ({}, 0.5),
    ],
)
def test_nested_variants_with_user_terms_equal_the_dense_autograd_path(
    spec_options, l2_penalty, monkeypatch
):
    """Shared lambda, lambda bounds, fixed lambda and L2 on the analytic path by blocks: the
    same estimates as Newton with autograd's Hessian and dense solves."""
    frame = simulated_nested_frame(n_cases=400, n_users=25, missing=0.1, seed=17)
    options = FitOptions(device="cpu", estimate=EstimateOptions(l2_penalty=l2_penalty))
    by_blocks, _ = fit_model(frame, nested_spec(**spec_options), options, where="test")
    monkeypatch.setattr(fit_module, "_user_groups", lambda problem, device: None)
    monkeypatch.setattr(
        DenseNestedLogit, "hessian", lambda self, t: torch.func.hessian(self.log_likelihood)(t)
    )
    dense, _ = fit_model(frame, nested_spec(**spec_options), options, where="test")
    assert by_blocks.fit["converged"] and dense.fit["converged"]
    assert torch.equal(by_blocks.identified, dense.identified)
    estimated = by_blocks.identified
    assert torch.allclose(by_blocks.estimate[estimated], dense.estimate[estimated], atol=1e-6)
    lambdas = by_blocks.estimate[-3:]
    if "lambda_bounds" in spec_options:
        assert float(lambdas.max()) == pytest.approx(0.6, abs=1e-12)
    if spec_options.get("lambda_fixed"):
        assert torch.equal(lambdas, torch.full_like(lambdas, 0.7))
