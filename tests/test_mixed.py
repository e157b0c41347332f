"""Mixed logit core: draws, the simulated log-likelihood, its gradient and Hessian, fits."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from choicecli import draws as draws_module
from choicecli.errors import DataError, ModelError
from choicecli.models import mixed
from conftest import ELECTRICITY_VARIABLES, XLOGIT_ELECTRICITY, reference_file

DTYPE = torch.float64
ALL_DISTRIBUTIONS = ("normal", "lognormal", "uniform", "triangular", "truncated_normal")


def panel_table(
    n_users: int = 12,
    cases_per_user: tuple[int, int] = (1, 5),
    n_alternatives: int = 4,
    n_fixed: int = 1,
    n_random: int = 3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A small long table with unbalanced panels and varying choice sets; rows shuffled."""
    generator = torch.Generator().manual_seed(seed)
    low, high = cases_per_user
    counts = torch.randint(low, high + 1, (n_users,), generator=generator)
    user_of_case = torch.repeat_interleave(torch.arange(n_users), counts)  # (N,)
    n_cases = user_of_case.shape[0]
    offered = torch.rand((n_cases, n_alternatives), generator=generator) < 0.75
    offered[:, :2] = True  # at least two alternatives in every case
    case, _ = torch.nonzero(offered, as_tuple=True)  # (S,)
    n_rows = case.shape[0]
    chosen = torch.zeros(n_rows, dtype=DTYPE)
    first_row = torch.cumsum(offered.sum(dim=1), 0) - offered.sum(dim=1)  # (N,)
    pick = (torch.rand(n_cases, generator=generator) * offered.sum(dim=1)).long()
    chosen[first_row + pick] = 1.0
    fixed = torch.randn((n_rows, n_fixed), generator=generator, dtype=DTYPE)
    random = torch.randn((n_rows, n_random), generator=generator, dtype=DTYPE)
    order = torch.randperm(n_rows, generator=generator)
    return {
        "fixed": fixed[order],
        "random": random[order],
        "case": case[order],
        "chosen": chosen[order],
        "user_of_case": user_of_case,
    }


def build(table: dict[str, torch.Tensor], panel: bool = True) -> mixed.MixedData:
    user = table["user_of_case"] if panel else None
    return mixed.mixed_data(table["fixed"], table["random"], table["case"], table["chosen"], user)


def conditional_logit_log_likelihood(
    table: dict[str, torch.Tensor], coefficients: torch.Tensor
) -> float:
    """Directly: log_softmax of the utilities within each case, at the chosen row."""
    design = torch.cat([table["fixed"], table["random"]], dim=1)  # (S, K)
    utility = design @ coefficients  # (S,)
    total = 0.0
    for case_code in torch.unique(table["case"]).tolist():
        rows = table["case"] == case_code
        log_probability = torch.log_softmax(utility[rows], dim=0)
        total += float(log_probability[table["chosen"][rows] == 1].sum())
    return total


# -- draws ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", draws_module.DRAW_KINDS)
def test_draws_are_reproducible_by_seed_and_inside_the_unit_interval(kind):
    first = draws_module.uniform_draws(7, 30, 4, kind=kind, seed=5)
    again = draws_module.uniform_draws(7, 30, 4, kind=kind, seed=5)
    other = draws_module.uniform_draws(7, 30, 4, kind=kind, seed=6)
    assert first.shape == (7, 30, 4) and first.dtype == DTYPE
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert bool((first > 0).all()) and bool((first < 1).all())


def test_plain_halton_is_the_radical_inverse_after_the_dropped_points():
    points = draws_module.halton_points(5, 2, drop=1, scramble=False)
    base_two = [1 / 2, 1 / 4, 3 / 4, 1 / 8, 5 / 8]
    base_three = [1 / 3, 2 / 3, 1 / 9, 4 / 9, 7 / 9]
    assert torch.allclose(points, torch.tensor([base_two, base_three], dtype=DTYPE).T)
    # unit u takes points drop + u * R + r (Train's layout)
    grid = draws_module.uniform_draws(2, 3, 1, kind="halton", scramble=False, drop=1)
    assert torch.allclose(grid[1, :, 0], torch.tensor([1 / 8, 5 / 8, 3 / 8], dtype=DTYPE))


def test_scrambled_halton_keeps_each_dimension_stratified():
    # digit permutations (0 kept) map the first b^2 points onto the grid i / b^2, each once
    for dimension, base in enumerate([2, 3, 5]):
        points = draws_module.halton_points(base**2, 3, drop=0, scramble=True, seed=3)
        grid = points[:, dimension] * base**2
        assert torch.allclose(grid, grid.round(), atol=1e-9)
        assert sorted(grid.round().long().tolist()) == list(range(base**2))
    scrambled = draws_module.halton_points(200, 3, drop=0, scramble=True, seed=3)
    assert not torch.equal(scrambled, draws_module.halton_points(200, 3, drop=0, scramble=False))


def test_mlhs_puts_one_draw_in_each_of_r_intervals_per_unit_and_dimension():
    points = draws_module.uniform_draws(5, 40, 3, kind="mlhs", seed=2)  # (U, R, K)
    cells = torch.floor(points * 40).long().sort(dim=1).values
    assert torch.equal(cells, torch.arange(40).view(1, 40, 1).expand(5, 40, 3))
    # shuffled independently per dimension: the orders differ
    assert not torch.equal(points[:, :, 0].argsort(dim=1), points[:, :, 1].argsort(dim=1))


@pytest.mark.parametrize("kind", draws_module.DRAW_KINDS)
def test_transformed_draws_have_the_distributions_moments(kind):
    uniform = draws_module.uniform_draws(200, 500, 3, kind=kind, seed=1)  # 100,000 per column
    normal = draws_module.standard_draws(uniform[:, :, 0], "normal")
    assert abs(normal.mean().item()) < 0.01 and abs(normal.std().item() - 1) < 0.01
    lognormal, _, _ = draws_module.coefficients_and_derivatives(
        "lognormal", torch.tensor(0.5, dtype=DTYPE), torch.tensor(0.8, dtype=DTYPE), normal
    )
    assert bool((lognormal > 0).all())
    assert abs(lognormal.mean().item() / math.exp(0.5 + 0.8**2 / 2) - 1) < 0.02
    symmetric = draws_module.standard_draws(uniform[:, :, 1], "uniform")
    assert symmetric.min() >= -1 and symmetric.max() <= 1
    assert abs(symmetric.var().item() - 1 / 3) < 0.005
    triangular = draws_module.standard_draws(uniform[:, :, 2], "triangular")
    assert triangular.min() >= -1 and triangular.max() <= 1
    assert abs(triangular.mean().item()) < 0.01 and abs(triangular.var().item() - 1 / 6) < 0.005


def test_truncated_normal_is_positive_with_the_truncated_mean():
    uniform = draws_module.uniform_draws(100, 1000, 1, kind="halton", seed=4)[:, :, 0]
    mean, spread = torch.tensor(0.3, dtype=DTYPE), torch.tensor(1.2, dtype=DTYPE)
    for signed_spread in (spread, -spread):  # the spread's sign is not identified
        value, _, _ = draws_module.coefficients_and_derivatives(
            "truncated_normal", mean, signed_spread, uniform
        )
        assert bool((value > 0).all())
        alpha = -0.3 / 1.2
        density = math.exp(-(alpha**2) / 2) / math.sqrt(2 * math.pi)
        expected = 0.3 + 1.2 * density / (1 - 0.5 * (1 + math.erf(alpha / math.sqrt(2))))
        assert abs(value.mean().item() - expected) < 0.005


@pytest.mark.parametrize("distribution", ALL_DISTRIBUTIONS)
def test_coefficient_derivatives_equal_autograd(distribution):
    uniform = draws_module.uniform_draws(4, 25, 1, kind="pseudo", seed=9)[:, :, 0]
    draw = draws_module.standard_draws(uniform, distribution)
    mean = torch.tensor(0.4, dtype=DTYPE, requires_grad=True)
    spread = torch.tensor(-0.7, dtype=DTYPE, requires_grad=True)
    value, d_mean, d_spread = draws_module.coefficients_and_derivatives(
        distribution, mean, spread, draw
    )
    by_mean, by_spread = torch.autograd.grad(value.sum(), (mean, spread))
    assert torch.allclose(d_mean.sum(), by_mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(d_spread.sum(), by_spread, rtol=1e-12, atol=1e-12)


def test_unknown_kind_or_distribution_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown draw kind 'latin'"):
        draws_module.uniform_draws(2, 2, 1, kind="latin")
    with pytest.raises(ModelError, match="unknown distribution 'gamma'"):
        mixed.MixedSpec(0, ("gamma",))


# -- the simulated log-likelihood ----------------------------------------------------------


def test_correlated_normals_are_mean_plus_cholesky_times_draws():
    spec = mixed.MixedSpec(1, ("normal", "lognormal", "normal", "normal"), correlated=True)
    assert spec.cholesky_pairs == ((2, 0), (3, 0), (3, 2)) and spec.n_parameters == 12
    labels = spec.labels(["f"], ["a", "b", "c", "d"])
    assert labels[5:9] == [("a", "sd"), ("b", "sd"), ("c", "sd"), ("d", "sd")]
    assert labels[9:] == [("c,a", "cholesky"), ("d,a", "cholesky"), ("d,c", "cholesky")]
    theta = torch.arange(12, dtype=DTYPE) / 10
    factor = spec.cholesky_factor(theta)
    expected_factor = torch.tensor([[0.5, 0, 0], [0.9, 0.7, 0], [1.0, 1.1, 0.8]], dtype=DTYPE)
    assert torch.allclose(factor, expected_factor)
    assert torch.allclose(spec.covariance(theta), expected_factor @ expected_factor.T)
    draws = mixed.make_draws(spec, 3, 8, kind="pseudo", seed=1)  # (U, R, 4)
    beta = mixed.random_coefficients(spec, theta, draws)[0]
    normal = [0, 2, 3]
    expected = theta[[1, 3, 4]] + draws[:, :, normal] @ expected_factor.T
    assert torch.allclose(beta[:, :, normal], expected)
    assert torch.allclose(beta[:, :, 1], torch.exp(0.2 + 0.6 * draws[:, :, 1]))


def test_rows_in_any_order_and_case_codes_checked():
    table = panel_table(seed=3)
    data = build(table)
    assert data.n_cases == table["user_of_case"].shape[0]
    assert data.n_units == 12 and data.n_alternatives == 4
    chosen = table["chosen"].clone()
    first_case = table["case"][chosen == 1][0]
    chosen[(table["case"] == first_case) & (chosen == 0)] = 1.0
    with pytest.raises(DataError, match=f"case code {int(first_case)} has [2-4] chosen rows"):
        mixed.mixed_data(table["fixed"], table["random"], table["case"], chosen)


@pytest.mark.parametrize("panel", [True, False])
@pytest.mark.parametrize("correlated", [False, True])
def test_zero_spreads_give_the_conditional_logit(panel, correlated):
    table = panel_table(n_random=5, seed=1)
    data = build(table, panel)
    spec = mixed.MixedSpec(1, ALL_DISTRIBUTIONS, correlated=correlated)
    draws = mixed.make_draws(spec, data.n_units, 37, kind="sobol", seed=2)
    theta = torch.zeros(spec.n_parameters, dtype=DTYPE)
    theta[:6] = torch.tensor([0.5, -0.8, 0.3, 1.1, -0.4, 0.9], dtype=DTYPE)
    # lognormal: beta = exp(mean); truncated normal with a positive mean and spread 0: its mean
    coefficients = theta[:6].clone()
    coefficients[2] = math.exp(0.3)
    expected = conditional_logit_log_likelihood(table, coefficients)
    value = mixed.log_likelihood(spec, data, theta, draws, draw_batch=10)
    assert abs(value.item() - expected) < 1e-10
    fast, _ = mixed.log_likelihood_and_gradient(spec, data, theta, draws, draw_batch=10)
    assert abs(fast.item() - expected) < 1e-10


@pytest.mark.parametrize(
    ("distributions", "correlated", "kind"),
    [
        (ALL_DISTRIBUTIONS, False, "halton"),
        (("normal", "lognormal", "normal", "normal"), True, "mlhs"),
        (("normal", "normal"), True, "pseudo"),
    ],
)
def test_gradient_equals_autograd_and_finite_differences(distributions, correlated, kind):
    table = panel_table(n_random=len(distributions), seed=4)
    data = build(table)
    spec = mixed.MixedSpec(1, distributions, correlated=correlated)
    draws = mixed.make_draws(spec, data.n_units, 23, kind=kind, seed=1)
    generator = torch.Generator().manual_seed(8)
    theta = 0.5 * torch.randn(spec.n_parameters, generator=generator, dtype=DTYPE)
    value, gradient = mixed.log_likelihood_and_gradient(spec, data, theta, draws, draw_batch=5)

    point = theta.clone().requires_grad_(True)
    by_autograd = torch.autograd.grad(mixed.log_likelihood(spec, data, point, draws), point)[0]
    assert torch.allclose(gradient, by_autograd, rtol=1e-10, atol=1e-10)

    step = 1e-6
    shifts = step * torch.eye(spec.n_parameters, dtype=DTYPE)
    central = torch.stack(
        [
            (
                mixed.log_likelihood(spec, data, theta + shift, draws)
                - mixed.log_likelihood(spec, data, theta - shift, draws)
            )
            / (2 * step)
            for shift in shifts
        ]
    )
    assert torch.allclose(gradient, central, rtol=1e-6, atol=1e-6)
    assert math.isfinite(value.item())


def test_draw_batches_do_not_change_the_result():
    table = panel_table(seed=5)
    data = build(table)
    spec = mixed.MixedSpec(1, ("normal", "lognormal", "triangular"))
    draws = mixed.make_draws(spec, data.n_units, 50, seed=3)
    theta = torch.tensor([0.2, 0.4, -0.3, 0.1, 0.9, 0.5, 0.7], dtype=DTYPE)
    results = [
        mixed.log_likelihood_and_scores(spec, data, theta, draws, draw_batch=batch)
        for batch in (1, 7, 50)
    ]
    for value, scores in results[:2]:
        assert abs(value.item() - results[2][0].item()) < 1e-10
        assert torch.allclose(scores, results[2][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("correlated", [False, True])
def test_analytic_hessian_equals_forward_mode_autograd_and_reverse_mode(correlated):
    distributions = ("normal", "lognormal", "truncated_normal", "normal")
    table = panel_table(n_users=6, n_random=4, seed=6)
    data = build(table)
    spec = mixed.MixedSpec(1, distributions, correlated=correlated)
    draws = mixed.make_draws(spec, data.n_units, 11, seed=4)
    generator = torch.Generator().manual_seed(2)
    theta = 0.4 * torch.randn(spec.n_parameters, generator=generator, dtype=DTYPE)
    theta[3] = 0.6  # the truncated normal's mean
    analytic, value, scores = mixed.analytic_hessian(spec, data, theta, draws, draw_batch=6)
    forward = mixed.hessian(spec, data, theta, draws, draw_batch=4)
    reverse = torch.autograd.functional.hessian(
        lambda point: mixed.log_likelihood(spec, data, point, draws), theta
    )
    assert torch.allclose(analytic, forward, rtol=1e-10, atol=1e-10)
    assert torch.allclose(analytic, reverse, rtol=1e-10, atol=1e-10)
    expected_value, gradient = mixed.log_likelihood_and_gradient(spec, data, theta, draws)
    assert abs(value.item() - expected_value.item()) < 1e-10
    assert torch.allclose(scores.sum(dim=0), gradient, rtol=1e-10, atol=1e-10)
    outer = mixed.bhhh(scores)
    assert torch.allclose(outer, outer.T) and bool((torch.linalg.eigvalsh(outer) > -1e-9).all())


def test_simulated_log_likelihood_settles_as_draws_grow():
    table = panel_table(n_users=40, n_random=2, seed=7)
    data = build(table)
    spec = mixed.MixedSpec(1, ("normal", "lognormal"))
    theta = torch.tensor([0.3, 0.5, -0.2, 1.5, 0.6], dtype=DTYPE)
    values = {
        n_draws: mixed.log_likelihood(
            spec, data, theta, mixed.make_draws(spec, data.n_units, n_draws, "pseudo", seed=1)
        ).item()
        for n_draws in (25, 400, 6400, 51200)
    }
    reference = values[51200]
    errors = [abs(values[n] - reference) for n in (25, 400, 6400)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1


def test_conditional_means_weigh_each_users_draws_by_their_choices():
    table = panel_table(n_random=2, seed=8)
    data = build(table)
    spec = mixed.MixedSpec(1, ("normal", "lognormal"))
    draws = mixed.make_draws(spec, data.n_units, 30, seed=2)
    theta = torch.tensor([0.3, 0.5, -0.2, 1.5, 0.6], dtype=DTYPE)
    means = mixed.conditional_means(spec, data, theta, draws, draw_batch=7)
    # directly: one batch of all draws, weights P_ur / sum_r P_ur
    per_draw = torch.stack(
        [
            mixed.unit_log_likelihood(spec, data, theta, draws[:, r : r + 1])
            for r in range(draws.shape[1])
        ],
        dim=1,
    )  # (U, R)
    weights = torch.softmax(per_draw, dim=1)
    beta = mixed.random_coefficients(spec, theta, draws)[0]  # (U, R, Kr)
    assert torch.allclose(means, (weights.unsqueeze(2) * beta).sum(dim=1), rtol=1e-10)
    assert bool((means[:, 1] > 0).all())  # lognormal: every user's mean is positive
    zero_spread = theta.clone()
    zero_spread[3:] = 0.0
    flat = mixed.conditional_means(spec, data, zero_spread, draws)
    assert torch.allclose(flat, torch.tensor([0.5, math.exp(-0.2)], dtype=DTYPE).expand(12, 2))


def test_simulation_standard_error_is_the_delta_method_on_each_users_average():
    table = panel_table(n_random=2, seed=10)
    data = build(table)
    spec = mixed.MixedSpec(1, ("normal", "normal"))
    draws = mixed.make_draws(spec, data.n_units, 40, kind="pseudo", seed=5)
    theta = torch.tensor([0.3, 0.5, -0.2, 1.5, 0.6], dtype=DTYPE)
    per_draw = torch.stack(
        [
            mixed.unit_log_likelihood(spec, data, theta, draws[:, r : r + 1])
            for r in range(draws.shape[1])
        ],
        dim=1,
    ).exp()  # (U, R): P_ur
    average = per_draw.mean(dim=1)
    variance = per_draw.var(dim=1, unbiased=False)
    expected = math.sqrt(float((variance / (40 * average**2)).sum()))
    found = mixed.simulation_standard_error(spec, data, theta, draws, draw_batch=7)
    assert abs(found - expected) < 1e-10 * expected
    zero_spread = theta.clone()
    zero_spread[3:] = 0.0
    assert mixed.simulation_standard_error(spec, data, zero_spread, draws) < 1e-7


# -- fits ----------------------------------------------------------------------------------


def simulated_panel(
    n_users: int, n_cases: int, n_alternatives: int, seed: int, lognormal_sign: float = 1.0
) -> dict:
    """Choices from known coefficients: fixed 1.0; normal mean -1.0 sd 0.8; lognormal with
    log-mean -0.5 and log-sd 0.6 (median 0.61), times lognormal_sign; one draw per user,
    Gumbel errors."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n_users, n_cases, n_alternatives)
    x = torch.randn(shape + (3,), generator=generator, dtype=DTYPE)  # (U, T, J, 3)
    normal = -1.0 + 0.8 * torch.randn((n_users, 1, 1), generator=generator, dtype=DTYPE)
    lognormal = lognormal_sign * torch.exp(
        -0.5 + 0.6 * torch.randn((n_users, 1, 1), generator=generator, dtype=DTYPE)
    )
    uniform = torch.rand(shape, generator=generator, dtype=DTYPE)
    gumbel = -torch.log(-torch.log(uniform))
    utility = 1.0 * x[..., 0] + normal * x[..., 1] + lognormal * x[..., 2] + gumbel
    choice = utility.argmax(dim=2)  # (U, T)
    chosen = torch.zeros(shape, dtype=DTYPE)
    chosen.scatter_(2, choice.unsqueeze(2), 1.0)
    case = torch.arange(n_users * n_cases).repeat_interleave(n_alternatives)
    return {
        "fixed": x[..., :1].reshape(-1, 1),
        "random": x[..., 1:].reshape(-1, 2),
        "case": case,
        "chosen": chosen.reshape(-1),
        "user_of_case": torch.arange(n_users).repeat_interleave(n_cases),
    }


def test_fit_recovers_known_means_and_spreads_within_two_standard_errors():
    # one fixed data set (seed 1; over seeds 1, 2, 3 and 11 the largest |estimate - truth| / se
    # were 0.94, 1.59, 1.55 and 2.56: the check is statistical, the seed is not tuned further)
    table = simulated_panel(n_users=400, n_cases=6, n_alternatives=3, seed=1)
    data = build(table)
    spec = mixed.MixedSpec(1, ("normal", "lognormal"))
    draws = mixed.make_draws(spec, data.n_units, 1000, kind="halton", seed=1)
    fit = mixed.fit_mixed(spec, data, draws)
    assert fit.converged and fit.gradient.abs().max() < 1e-6
    truth = torch.tensor([1.0, -1.0, -0.5, 0.8, 0.6], dtype=DTYPE)
    estimate = fit.theta.clone()
    estimate[3:] = estimate[3:].abs()  # the sign of a spread is not identified
    errors = fit.standard_errors
    assert bool(((estimate - truth).abs() < 2 * errors).all()), (estimate, errors)
    # the lognormal coefficient keeps its sign at every draw and for every user
    beta = mixed.random_coefficients(spec, fit.theta, draws)[0]
    assert bool((beta[:, :, 1] > 0).all())
    assert bool((mixed.conditional_means(spec, data, fit.theta, draws)[:, 1] > 0).all())
    # the Hessian is negative definite at the optimum; BHHH and robust errors are finite
    assert bool((torch.linalg.eigvalsh(fit.hessian) < 0).all())
    assert bool(torch.isfinite(fit.bhhh_standard_errors).all())
    assert bool(torch.isfinite(fit.robust_standard_errors).all())


def test_lognormal_keeps_its_sign_and_a_negative_effect_is_fitted_on_the_negated_variable():
    spec = mixed.MixedSpec(0, ("lognormal",))
    draws = mixed.make_draws(spec, 50, 100, kind="pseudo", seed=3)
    for mean, spread in [(-3.0, 2.0), (2.0, -1.5), (0.0, 0.0)]:
        theta = torch.tensor([mean, spread], dtype=DTYPE)
        assert bool((mixed.random_coefficients(spec, theta, draws)[0] > 0).all())
    # a negative lognormal effect: the model is given the variable negated
    table = simulated_panel(n_users=300, n_cases=6, n_alternatives=3, seed=12, lognormal_sign=-1)
    table["random"][:, 1] = -table["random"][:, 1]
    data = build(table)
    spec = mixed.MixedSpec(1, ("normal", "lognormal"))
    draws = mixed.make_draws(spec, data.n_units, 300, kind="sobol", seed=3)
    fit = mixed.fit_mixed(spec, data, draws)
    assert fit.converged
    truth = torch.tensor([1.0, -1.0, -0.5, 0.8, 0.6], dtype=DTYPE)
    estimate = fit.theta.clone()
    estimate[3:] = estimate[3:].abs()
    assert bool(((estimate - truth).abs() < 2 * fit.standard_errors).all()), estimate
    assert bool((mixed.random_coefficients(spec, fit.theta, draws)[0][:, :, 1] > 0).all())


@pytest.fixture(scope="module")
def electricity() -> mixed.MixedData:
    frame = pl.read_csv(reference_file("electricity_long.csv"))
    assert frame.shape == (17232, 10)
    case = frame["chid"].rank("dense").cast(pl.Int64).to_torch() - 1
    user_of_row = frame["id"].rank("dense").cast(pl.Int64).to_torch() - 1
    user_of_case = torch.zeros(int(case.max()) + 1, dtype=torch.int64).scatter(0, case, user_of_row)
    random_design = frame.select(ELECTRICITY_VARIABLES).to_torch(dtype=pl.Float64)
    fixed_design = torch.zeros((frame.height, 0), dtype=DTYPE)
    chosen = frame["choice"].to_torch().to(DTYPE)
    return mixed.mixed_data(fixed_design, random_design, case, chosen, user_of_case)


def xlogit_estimates() -> tuple[torch.Tensor, torch.Tensor]:
    values = [XLOGIT_ELECTRICITY[name] for name in ELECTRICITY_VARIABLES]
    theta = torch.tensor([v[0] for v in values] + [v[2] for v in values], dtype=DTYPE)
    errors = torch.tensor([v[1] for v in values] + [v[3] for v in values], dtype=DTYPE)
    return theta, errors


def test_electricity_log_likelihood_at_xlogits_estimates_is_xlogits(electricity):
    # xlogit's draws: plain Halton, primes 2..13, the first 100 points dropped, points
    # u * R + r for user u: the simulated log-likelihood at its published estimates is its
    # published -3888.4134, and the gradient there is what its BFGS stopped at (gtol 1e-4)
    spec = mixed.MixedSpec(0, ("normal",) * 6)
    draws = mixed.make_draws(spec, electricity.n_units, 600, "halton", scramble=False)
    theta, _ = xlogit_estimates()
    value, gradient = mixed.log_likelihood_and_gradient(spec, electricity, theta, draws)
    assert electricity.n_units == 361 and electricity.n_cases == 4308
    assert abs(value.item() - (-3888.4134)) < 1e-4
    assert gradient.abs().max() < 1e-3


@pytest.mark.slow  # a full fit at 600 draws: about 12 s of CPU on the loaded 2-core machine
def test_electricity_fit_reproduces_xlogits_estimates(electricity):
    # 600 Halton draws as xlogit draws them, a start of 0.1 with the signs xlogit's spreads
    # ended with (the sign of a spread is not identified; each sign pattern is its own local
    # optimum of the simulated likelihood): every estimate within 0.01 of xlogit's standard
    # error of its published value, the log-likelihood equal to its 4 published decimals
    spec = mixed.MixedSpec(0, ("normal",) * 6)
    draws = mixed.make_draws(spec, electricity.n_units, 600, "halton", scramble=False)
    published, published_errors = xlogit_estimates()
    start = torch.full((12,), 0.1, dtype=DTYPE) * torch.sign(published)
    start[:6] = 0.1
    fit = mixed.fit_mixed(spec, electricity, draws, initial=start)
    assert fit.converged and fit.gradient.abs().max() < 1e-6
    assert abs(fit.log_likelihood - (-3888.4134)) < 1e-4
    assert bool(((fit.theta - published).abs() < 0.01 * published_errors).all())
    # our errors from the exact Hessian; xlogit's come from BFGS's running approximation
    assert bool((fit.standard_errors / published_errors < 1.5).all())
    assert bool((fit.standard_errors / published_errors > 0.9).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpus_log_likelihood_gradient_and_hessian():
    table = panel_table(n_random=3, seed=9)
    spec = mixed.MixedSpec(1, ("normal", "lognormal", "truncated_normal"))
    theta = torch.tensor([0.2, 0.4, -0.3, 0.5, 0.9, 0.5, 0.7], dtype=DTYPE)
    results = []
    for device in ("cpu", "cuda"):
        moved = {name: tensor.to(device) for name, tensor in table.items()}
        data = build(moved)
        assert data.device.type == device
        draws = mixed.make_draws(spec, data.n_units, 40, seed=1, device=device)
        value, gradient = mixed.log_likelihood_and_gradient(spec, data, theta.to(device), draws)
        second = mixed.analytic_hessian(spec, data, theta.to(device), draws)[0]
        results.append((value.cpu(), gradient.cpu(), second.cpu()))
    for cpu, cuda in zip(results[0], results[1], strict=True):
        assert torch.allclose(cpu, cuda, rtol=1e-10, atol=1e-10)
