"""Likelihoods by hand on toy arrays; gradients and Hessians against autograd and differences."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from choicecli.data import Roles
from conftest import problem_for, random_theta, toy_frame

ALL_VARIATIONS = (
    "(x|constant) + (1|item) + (z|item-full) + (w|item) + (x|user) + (z|user-item) "
    "+ (w|user-item-full)"
)


def test_conditional_logit_matches_hand_computation():
    frame = toy_frame()
    problem = problem_for(frame, "(x|constant) + (1|item)")
    model = problem.model(torch.device("cpu"))
    beta, intercept_b, intercept_c = 0.7, 0.3, -0.4
    theta = torch.tensor([beta, 0.0, intercept_b, intercept_c], dtype=torch.float64)
    intercepts = {"a": 0.0, "b": intercept_b, "c": intercept_c}
    expected = 0.0
    for case in (1, 2, 3):
        rows = frame.filter(frame["case"] == case).to_dicts()
        utilities = [beta * r["x"] + intercepts[r["item"]] for r in rows]
        denominator = sum(math.exp(u) for u in utilities)
        chosen = next(u for u, r in zip(utilities, rows, strict=True) if r["choice"] == 1)
        expected += chosen - math.log(denominator)
    assert float(model.log_likelihood(theta)) == pytest.approx(expected, abs=1e-12)


def test_nested_logit_matches_hand_computation():
    frame = toy_frame()
    problem = problem_for(
        frame, "(x|constant)", nests="n1=a,b;n2=c", nest_formula="(w|item)", shared_lambda=False
    )
    model = problem.model(torch.device("cpu"))
    names = [p.term + ":" + str(p.item) for p in problem.parameters]
    theta = torch.zeros(len(names), dtype=torch.float64)
    beta, gamma_n2, lam1 = 0.8, 0.35, 0.6
    theta[names.index("x[constant]:None")] = beta
    theta[names.index("w[item]:n2")] = gamma_n2
    theta[names.index("lambda:n1")] = lam1
    theta[names.index("lambda:n2")] = 1.0  # a single-alternative nest: lambda cancels
    lambdas = {"n1": lam1, "n2": 1.0}
    nest_of = {"a": "n1", "b": "n1", "c": "n2"}
    expected = 0.0
    for case in (1, 2, 3):
        rows = frame.filter(frame["case"] == case).to_dicts()
        inclusive, upper = {}, {}
        for nest in {nest_of[r["item"]] for r in rows}:
            members = [r for r in rows if nest_of[r["item"]] == nest]
            inclusive[nest] = math.log(
                sum(math.exp(beta * r["x"] / lambdas[nest]) for r in members)
            )
            w_value = members[0]["w"] * (gamma_n2 if nest == "n2" else 0.0)
            upper[nest] = w_value + lambdas[nest] * inclusive[nest]
        chosen = next(r for r in rows if r["choice"] == 1)
        nest = nest_of[chosen["item"]]
        log_conditional = beta * chosen["x"] / lambdas[nest] - inclusive[nest]
        log_marginal = upper[nest] - math.log(sum(math.exp(v) for v in upper.values()))
        expected += log_conditional + log_marginal
    assert float(model.log_likelihood(theta)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "formula, weighted",
    [
        (ALL_VARIATIONS, False),
        ("(x|constant) + (1|item) + (z|user)", False),
        # no user terms: the Hessian's row part per alternative only for alternative-level
        # columns, constant ones in one product
        ("(x|constant) + (1|item) + (z|item-full) + (w|item) + (z|constant)", False),
        ("(x|constant) + (1|item) + (z|item-full) + (w|item)", True),
        ("(x|constant) + (1|item) + (z|user)", True),
    ],
)
def test_conditional_logit_gradient_and_hessian_match_autograd(formula, weighted):
    frame = toy_frame()
    roles = Roles(case="case", item="item", choice="choice", user="user")
    if weighted:
        frame = frame.with_columns(
            pl.col("case").replace_strict({1: 0.5, 2: 2.0, 3: 1.25}).alias("weight")
        )
        roles = Roles(case="case", item="item", choice="choice", user="user", weights="weight")
    problem = problem_for(frame, formula, roles=roles)
    model = problem.model(torch.device("cpu"))
    theta = random_theta(len(problem.parameters), seed=3)
    value, gradient = model.value_and_gradient(theta)
    auto_gradient = torch.func.grad(model.log_likelihood)(theta)
    auto_hessian = torch.func.hessian(model.log_likelihood)(theta)
    assert torch.allclose(gradient, auto_gradient, atol=1e-12)
    assert torch.allclose(model.hessian(theta), auto_hessian, atol=1e-12)
    assert float(value) == pytest.approx(float(model.log_likelihood(theta)), abs=1e-12)


def skewed_users_frame(n_cases: int = 90, n_items: int = 4, drop: float = 0.0) -> pl.DataFrame:
    """Random cases of 7 users with 1 to 40 cases each (several padded size classes in the
    Hessian's grouping), every alternative offered unless `drop` > 0."""
    generator = torch.Generator().manual_seed(11)
    sizes = [1, 2, 3, 5, 9, 30, n_cases - 50]
    user_of_case = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    user_of_case = user_of_case[torch.randperm(n_cases, generator=generator)]  # interleaved
    case = torch.arange(n_cases).repeat_interleave(n_items)
    item = torch.arange(n_items).repeat(n_cases)
    offered = torch.rand(n_cases * n_items, generator=generator) >= drop
    offered |= item < 2  # every case offers at least two alternatives
    utility = torch.randn(n_cases * n_items, generator=generator)
    utility[~offered] = -math.inf
    chosen = utility.view(n_cases, n_items).argmax(dim=1)  # random choices among the offered
    frame = pl.DataFrame(
        {
            "case": case.numpy(),
            "item": [f"i{j}" for j in item.tolist()],
            "choice": (item == chosen[case]).long().numpy(),
            "user": [f"u{u}" for u in user_of_case[case].tolist()],
            "x": torch.randn(n_cases * n_items, generator=generator).numpy(),
            "z": torch.randn(n_cases * n_items, generator=generator).numpy(),
            "w": torch.randn(n_cases, generator=generator)[case].numpy(),
            "weight": (0.5 + torch.rand(n_cases, generator=generator))[case].numpy(),
        }
    )
    return frame.filter(pl.Series(offered.numpy()))


def small_chunks(store):
    """A store's blocks of cases, 23 at a time: several blocks even on small data."""
    for first in range(0, store.n_cases, 23):
        last = min(first + 23, store.n_cases)
        if store.dense:
            yield slice(first * store.n_items, last * store.n_items), slice(first, last)
        else:
            yield slice(store.case_start[first], store.case_start[last]), slice(first, last)


@pytest.mark.parametrize("drop, threshold", [(0.0, 0.0), (0.3, 0.0), (0.3, 2.0)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize(
    "formula",
    [
        ALL_VARIATIONS,  # user terms at case level (x|user) and at alternative level
        "(x|constant) + (1|item) + (w|item) + (z|user) + (1|user)",
        "(z|user-item) + (x|constant)",
        "(x|constant) + (1|item) + (z|item-full) + (w|item)",  # no user terms: column loop
        # no user terms, 5 alternative-level columns: one batched product
        "(x|constant) + (1|item) + (z|item-full) + (w|item) + (x|item) + (z|item)",
    ],
)
def test_conditional_hessian_by_blocks_equals_autograd(monkeypatch, formula, weighted, drop,
                                                       threshold):  # fmt: skip
    """The batched Hessian (rows grouped by (user, alternative) in padded tables, cases by
    user within each block of cases) on full, padded and ragged layouts, users with 1 to 40
    cases, many blocks of cases: autograd's to 1e-10 relative."""
    from choicecli.models import ColumnStore, ConditionalLogit, HandedRows

    monkeypatch.setattr(ColumnStore, "chunks", small_chunks)
    roles = Roles(case="case", item="item", choice="choice", user="user",
                  weights="weight" if weighted else None)  # fmt: skip
    problem = problem_for(skewed_users_frame(drop=drop), formula, roles=roles)
    data = problem.data
    rows = HandedRows(data.case_index, data.item_index, data.chosen)
    store = ColumnStore(problem.item_blocks, len(problem.parameters), rows, data.n_cases,
                        data.n_items, dense_threshold=threshold)  # fmt: skip
    expected_layout = "full" if drop == 0.0 else "padded" if threshold == 0.0 else "ragged"
    assert store.layout == expected_layout
    model = ConditionalLogit(store, data.user_of_case, data.case_weights)
    theta = random_theta(len(problem.parameters), seed=17)
    auto_hessian = torch.func.hessian(model.log_likelihood)(theta)
    for _ in range(2):  # the second call reuses the cached grouping
        model._last_hessian = (None, None)
        hessian = model.hessian(theta)
        error = float((hessian - auto_hessian).abs().max() / auto_hessian.abs().max())
        assert error <= 1e-10
    assert torch.equal(hessian, hessian.T) or torch.allclose(hessian, hessian.T, rtol=1e-12)


def assert_gradient_matches_differences(model, theta: torch.Tensor, step: float = 1e-6) -> None:
    """Every gradient entry against a central difference of the log-likelihood."""
    _, gradient = model.value_and_gradient(theta)
    for index in range(theta.numel()):
        shift = torch.zeros_like(theta)
        shift[index] = step
        upper, lower = model.log_likelihood(theta + shift), model.log_likelihood(theta - shift)
        assert float(gradient[index]) == pytest.approx(float(upper - lower) / (2 * step), abs=1e-7)


def test_conditional_logit_gradient_matches_finite_differences():
    problem = problem_for(toy_frame(), ALL_VARIATIONS)
    model = problem.model(torch.device("cpu"))
    theta = random_theta(len(problem.parameters), seed=5)
    assert_gradient_matches_differences(model, theta)


def test_nested_logit_gradient_matches_finite_differences_including_lambda():
    problem = problem_for(
        toy_frame(),
        "(x|constant) + (1|item) + (z|user)",
        nests="n1=a,b;n2=c",
        nest_formula="(w|item) + (1|user)",
    )
    model = problem.model(torch.device("cpu"))
    theta = random_theta(len(problem.parameters), seed=7)
    theta[problem.lambda_index] = torch.tensor([0.7, 0.9], dtype=torch.float64)
    assert_gradient_matches_differences(model, theta)
    hessian = model.hessian(theta)
    assert torch.allclose(hessian, hessian.T, atol=1e-10)


def test_nested_logit_with_unit_lambdas_equals_conditional_logit():
    frame = toy_frame()
    nested = problem_for(frame, "(x|constant) + (1|item)", nests="n1=a,b;n2=c")
    plain = problem_for(frame, "(x|constant) + (1|item)")
    theta_plain = random_theta(len(plain.parameters), seed=11)
    theta_nested = torch.cat([theta_plain, torch.ones(2, dtype=torch.float64)])
    nested_value = nested.model(torch.device("cpu")).log_likelihood(theta_nested)
    plain_value = plain.model(torch.device("cpu")).log_likelihood(theta_plain)
    assert float(nested_value) == pytest.approx(float(plain_value), abs=1e-12)


def test_extreme_utilities_stay_finite():
    problem = problem_for(toy_frame(), "(x|constant) + (1|item)")
    model = problem.model(torch.device("cpu"))
    theta = torch.tensor([1e6, 0.0, -1e6, 1e6], dtype=torch.float64)
    value, gradient = model.value_and_gradient(theta)
    assert math.isfinite(float(value))
    assert torch.isfinite(gradient).all()
    assert torch.isfinite(model.hessian(theta)).all()
    nested = problem_for(toy_frame(), "(x|constant)", nests="n1=a,b;n2=c")
    nested_theta = torch.tensor([1e4, 1e-3, 1.0], dtype=torch.float64)
    assert math.isfinite(float(nested.model(torch.device("cpu")).log_likelihood(nested_theta)))


@pytest.mark.parametrize("formula", [ALL_VARIATIONS, "(x|constant) + (1|item)"])
def test_padded_and_ragged_layouts_agree(formula):
    from choicecli.models import ColumnStore, ConditionalLogit, HandedRows

    problem = problem_for(toy_frame(), formula)
    data = problem.data
    theta = random_theta(len(problem.parameters), seed=13)
    results = {}
    for threshold in (0.0, 2.0):  # 0: padded N x J slots; 2: ragged rows
        rows = HandedRows(data.case_index, data.item_index, data.chosen)
        store = ColumnStore(problem.item_blocks, len(problem.parameters), rows, data.n_cases,
                            data.n_items, dense_threshold=threshold)  # fmt: skip
        model = ConditionalLogit(store, data.user_of_case)
        value, gradient = model.value_and_gradient(theta)
        results[model.layout] = (value, gradient, model.hessian(theta),
                                 model.row_log_probabilities(theta),
                                 model.second_moments())  # fmt: skip
    padded, ragged = results["padded"], results["ragged"]
    for left, right in zip(padded, ragged, strict=True):
        assert torch.allclose(left, right, atol=1e-12)


def test_padded_rows_in_any_order_give_each_row_its_own_probability():
    """Rows in (case, alternative) order are the offered slots in order (the model recovers
    their slots from its mask); rows of a case in another order keep their own slot vector."""
    from choicecli.design import Block
    from choicecli.models import ColumnStore, ConditionalLogit, HandedRows

    problem = problem_for(toy_frame(), "(x|constant) + (1|item) + (z|item) + (z|user)")
    data = problem.data
    theta = random_theta(len(problem.parameters), seed=23)
    noise = torch.rand(data.n_rows, generator=torch.Generator().manual_seed(5))  # (R,)
    order = torch.argsort(data.case_index + noise)  # (R,) by case, shuffled within each
    shuffled_blocks = [
        Block(b.term, b.level, b.features, b.x[order], b.code[order], b.layout_index)
        for b in problem.item_blocks
    ]
    models = [
        ConditionalLogit(
            ColumnStore(
                blocks,
                len(problem.parameters),
                HandedRows(data.case_index[rows], data.item_index[rows], data.chosen[rows]),
                data.n_cases,
                data.n_items,
                dense_threshold=0.0,
                own_blocks=True,
            ),
            data.user_of_case,
        )
        for blocks, rows in ((list(problem.item_blocks), slice(None)), (shuffled_blocks, order))
    ]
    in_order, shuffled = models
    assert in_order.layout == shuffled.layout == "padded"
    positions = in_order.store.positions
    assert torch.equal(positions, data.case_index * data.n_items + data.item_index)
    assert torch.equal(shuffled.store.positions, positions[order])
    assert not torch.equal(order, torch.arange(data.n_rows))
    expected = in_order.row_log_probabilities(theta)[order]  # (R,)
    assert torch.allclose(shuffled.row_log_probabilities(theta), expected, rtol=0, atol=1e-14)
    pairs = zip(in_order.value_and_gradient(theta), shuffled.value_and_gradient(theta), strict=True)
    for left, right in pairs:
        assert torch.allclose(left, right, rtol=1e-13, atol=0)
    assert all(b.x is None and b.code is None for b in shuffled_blocks)  # handed over: dropped


def test_nested_dense_and_ragged_layouts_agree():
    from choicecli.models import DenseNestedLogit, NestedRows, nested_logit

    problem = problem_for(
        toy_frame(), "(x|constant) + (1|item) + (z|user)", nests="n1=a,b;n2=c",
        nest_formula="(w|item) + (1|user)",
    )  # fmt: skip
    data = problem.data
    theta = random_theta(len(problem.parameters), seed=17)
    theta[problem.lambda_index] = torch.tensor([0.6, 0.8], dtype=torch.float64)
    results = []
    for threshold in (0.0, 2.0):
        rows = NestedRows(
            problem.item_blocks, problem.nest_blocks, problem.lambda_index, problem.nest_of_item,
            len(problem.parameters), data.case_index, data.item_index, data.n_cases, data.chosen,
        )  # fmt: skip
        model = nested_logit(rows, dense_threshold=threshold)
        assert isinstance(model, DenseNestedLogit) == (threshold == 0.0)
        value, gradient = model.value_and_gradient(theta)
        results.append((value, gradient, model.hessian(theta), model.row_log_probabilities(theta)))
    for left, right in zip(*results, strict=True):
        assert torch.allclose(left, right, atol=1e-12)


def random_nested_frame(n_cases: int = 60, seed: int = 3) -> pl.DataFrame:
    """Five alternatives in three nests, about a fifth of them missing, two users."""
    generator = torch.Generator().manual_seed(seed)
    case = torch.arange(n_cases).repeat_interleave(5)
    item = torch.arange(5).repeat(n_cases)
    offered = torch.rand(n_cases * 5, generator=generator) > 0.2
    offered[item == 0] = True  # every case keeps at least two alternatives
    offered[item == 3] = True
    frame = pl.DataFrame(
        {
            "case": case.numpy(),
            "item": [f"i{k}" for k in item.tolist()],
            "user": [f"u{c % 2}" for c in case.tolist()],
            "x": torch.randn(n_cases * 5, generator=generator, dtype=torch.float64).numpy(),
            "z": torch.randn(n_cases * 5, generator=generator, dtype=torch.float64).numpy(),
            "w": torch.rand(n_cases, generator=generator, dtype=torch.float64)
            .repeat_interleave(5)
            .numpy(),
            "weight": (1.0 + torch.rand(n_cases, generator=generator, dtype=torch.float64))
            .repeat_interleave(5)
            .numpy(),
        }
    ).filter(pl.Series(offered.numpy()))
    chosen_row = frame.with_row_index("row").group_by("case").agg(pl.col("row").sample(1, seed=1))
    rows = chosen_row.explode("row").get_column("row")
    return frame.with_columns(choice=pl.int_range(pl.len()).is_in(rows.implode()).cast(pl.Int64))


@pytest.mark.parametrize("shared_lambda", [False, True])
def test_nested_analytic_derivatives_match_autograd(shared_lambda):
    roles = Roles(case="case", item="item", choice="choice", user="user", weights="weight")
    problem = problem_for(
        random_nested_frame(),
        "(x|constant) + (1|item) + (z|item) + (x|user)",
        nests="n1=i0,i1;n2=i2,i3;n3=i4",
        nest_formula="(w|item)",
        shared_lambda=shared_lambda,
        roles=roles,
    )
    model = problem.model(torch.device("cpu"))
    assert model.item_store.layout == "padded"  # the dense strategy, some alternatives missing
    theta = random_theta(len(problem.parameters), seed=23)
    lambdas = problem.lambda_index.unique()  # one shared, or one per nest
    theta[lambdas] = torch.tensor([0.55, 0.8, 1.3], dtype=torch.float64)[: lambdas.numel()]
    value, gradient = model.value_and_gradient(theta)
    auto_gradient = torch.func.grad(model.log_likelihood)(theta)
    auto_hessian = torch.func.hessian(model.log_likelihood)(theta)
    assert float(value) == pytest.approx(float(model.log_likelihood(theta)), abs=1e-12)
    assert torch.allclose(gradient, auto_gradient, atol=1e-10)
    assert torch.allclose(model.hessian(theta), auto_hessian, atol=1e-10)


@pytest.mark.parametrize("shared_lambda", [False, True])
def test_nested_structured_hessian_matches_autograd(shared_lambda):
    """Constant and alternative-level terms only, no nest formula: the structured path."""
    problem = problem_for(
        random_nested_frame(seed=5),
        "(x|constant) + (1|item) + (z|item) + (z|item-full)",
        nests="n1=i0,i3;n2=i2,i1;n3=i4",  # n1 and n2 are not consecutive codes
        shared_lambda=shared_lambda,
        roles=Roles(case="case", item="item", choice="choice", weights="weight"),
    )
    model = problem.model(torch.device("cpu"))
    assert model._compact_columns is not None
    theta = random_theta(len(problem.parameters), seed=29)
    lambdas = problem.lambda_index.unique()
    theta[lambdas] = torch.tensor([0.45, 0.75, 1.2], dtype=torch.float64)[: lambdas.numel()]
    value, gradient = model.value_and_gradient(theta)
    assert torch.allclose(gradient, torch.func.grad(model.log_likelihood)(theta), atol=1e-10)
    auto_hessian = torch.func.hessian(model.log_likelihood)(theta)
    assert torch.allclose(model.hessian(theta), auto_hessian, atol=1e-10)


@pytest.mark.parametrize("nests", [None, "n1=i0,i3;n2=i2,i1;n3=i4"])
def test_subsample_holds_every_tenth_case(nests):
    """The warm start's model: the same likelihood, summed over cases 0, 10, 20, ..."""
    frame = random_nested_frame(n_cases=200, seed=9)
    roles = Roles(case="case", item="item", choice="choice", weights="weight")
    formula = "(x|constant) + (1|item) + (z|item)"
    problem = problem_for(frame, formula, nests=nests, roles=roles)
    smaller = problem.model(torch.device("cpu")).subsample(10)
    kept = frame.filter(pl.col("case") % 10 == 0)
    expected = problem_for(kept, formula, nests=nests, roles=roles).model(torch.device("cpu"))
    assert smaller.n_cases == expected.n_cases == 20
    theta = random_theta(len(problem.parameters), seed=31)
    if nests:
        theta[problem.lambda_index] = torch.tensor([0.6, 0.9, 1.1], dtype=torch.float64)
    for left, right in zip(
        (*smaller.value_and_gradient(theta), smaller.hessian(theta)),
        (*expected.value_and_gradient(theta), expected.hessian(theta)),
        strict=True,
    ):
        assert torch.allclose(left, right, atol=1e-12)


def simulated_frame(n_cases: int, seed: int) -> pl.DataFrame:
    """Choices drawn from a logit with known coefficients; about a fifth of rows missing."""
    frame = random_nested_frame(n_cases, seed).drop("choice")
    generator = torch.Generator().manual_seed(seed)
    intercept = {"i0": 0.0, "i1": 0.5, "i2": -0.3, "i3": 0.2, "i4": 0.8}
    utility = (
        -0.8 * torch.tensor(frame.get_column("x").to_numpy())
        + 0.4 * torch.tensor(frame.get_column("z").to_numpy())
        + torch.tensor([intercept[i] for i in frame.get_column("item").to_list()])
    )
    gumbel = -torch.log(-torch.log(torch.rand(utility.shape, generator=generator)))
    frame = frame.with_columns(noisy=pl.Series((utility + gumbel).numpy()))
    best = pl.col("noisy") == pl.col("noisy").max().over("case")
    return frame.with_columns(choice=best.cast(pl.Int64)).drop("noisy")


@pytest.mark.parametrize("nests", [None, "n1=i0,i3;n2=i2,i1;n3=i4"])
def test_warm_start_reaches_the_same_optimum(monkeypatch, nests):
    from choicecli import estimate
    from choicecli.fit import FitOptions, fit_model
    from choicecli.problem import ModelSpec

    frame = simulated_frame(n_cases=3000, seed=13)
    spec = ModelSpec(
        formula="(x|constant) + (1|item) + (z|item)",
        roles=Roles(case="case", item="item", choice="choice"),
        nests=nests,
    )
    cold, _ = fit_model(frame, spec, FitOptions(), where="test")
    started = []
    original = estimate._newton

    def newton(objective, *args):
        started.append(objective.model.n_cases)
        return original(objective, *args)

    monkeypatch.setattr(estimate, "_newton", newton)
    monkeypatch.setattr(estimate, "WARM_START_CASES", 1000)
    monkeypatch.setattr(estimate, "WARM_START_CASES_PER_PARAMETER", 5)
    warm, _ = fit_model(frame, spec, FitOptions(), where="test")
    assert started == [300, 3000]  # every 10th case first, then all of them
    assert warm.fit["converged"]  # its speed is measured in make bench, not here
    assert warm.fit["log_likelihood"] == pytest.approx(cold.fit["log_likelihood"], abs=1e-9)
    assert torch.allclose(warm.estimate, cold.estimate, atol=1e-7, equal_nan=True)
    # the subsample's Hessian only steers the first step: standard errors are the optimum's
    assert torch.allclose(warm.std_error, cold.std_error, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize(
    "formula", ["(x|constant) + (1|item) + (z|item)", "(x|constant) + (1|item) + (w|constant)"]
)
def test_rank_check_on_a_subsample_finds_what_the_full_check_finds(monkeypatch, formula):
    """w is constant within each case: it cancels, and both checks say so; clean formulas
    pass on the tenth of the cases without the full Hessian at theta = 0."""
    from choicecli import estimate, identify
    from choicecli.fit import FitOptions, fit_model
    from choicecli.problem import ModelSpec

    frame = simulated_frame(n_cases=3000, seed=17)
    spec = ModelSpec(formula=formula, roles=Roles(case="case", item="item", choice="choice"))
    full, _ = fit_model(frame, spec, FitOptions(), where="test")
    monkeypatch.setattr(identify, "RANK_CHECK_SUBSAMPLE_CASES", 1000)
    monkeypatch.setattr(estimate, "WARM_START_CASES", 1000)
    monkeypatch.setattr(estimate, "WARM_START_CASES_PER_PARAMETER", 5)
    sampled, _ = fit_model(frame, spec, FitOptions(), where="test")
    assert sampled.warnings == full.warnings
    assert torch.equal(sampled.estimate.isnan(), full.estimate.isnan())
    assert sampled.fit["log_likelihood"] == pytest.approx(full.fit["log_likelihood"], abs=1e-9)
    assert ("w[constant]" in " ".join(full.warnings)) == ("w|constant" in formula)


@pytest.mark.parametrize("n_cases, seed", [(60, 1), (1000, 7), (3000, 3), (3000, 4)])
def test_newton_returns_the_hessian_of_its_optimum(n_cases, seed):
    """The Hessian Newton returns (for standard errors) may be the one of its last step when
    that step was tiny: it must equal a fresh one at the optimum to far below any SE digit."""
    from choicecli.estimate import EstimateOptions, Objective, maximise
    from choicecli.problem import ModelSpec, build_problem

    frame = simulated_frame(n_cases=n_cases, seed=seed)
    spec = ModelSpec(
        formula="(x|constant) + (1|item) + (z|item)",
        roles=Roles(case="case", item="item", choice="choice"),
    )
    problem = build_problem(frame, spec, "test")
    free = (~problem.fixed).nonzero().flatten()
    model = problem.model(torch.device("cpu"))
    objective = Objective(model, free, problem.start, torch.ones_like(free, dtype=torch.bool), 0.0)
    outcome = maximise(objective, problem.start[free], EstimateOptions())
    assert outcome.converged
    fresh = objective.hessian(outcome.theta)
    assert float((outcome.hessian - fresh).norm() / fresh.norm()) <= 1e-7
    std_errors = [torch.linalg.inv(-h).diagonal().sqrt() for h in (outcome.hessian, fresh)]
    assert torch.allclose(*std_errors, rtol=1e-6, atol=0)


def test_a_model_handed_rows_and_blocks_empties_them_and_equals_one_built_from_copies():
    """Handed over, the row vectors leave the caller's holder once the slots are laid out,
    and owned blocks their values once copied."""
    from choicecli.models import ColumnStore, ConditionalLogit, HandedRows

    problem = problem_for(toy_frame(), "(x|constant) + (1|item) + (z|item)")
    data = problem.data
    theta = random_theta(len(problem.parameters), seed=19)
    shape = (len(problem.parameters),)
    copies = HandedRows(data.case_index, data.item_index, data.chosen)
    size = (data.n_cases, data.n_items)
    built = ConditionalLogit(
        ColumnStore(problem.item_blocks, *shape, copies, *size, dense_threshold=0.0)
    )
    rows = HandedRows(data.case_index.clone(), data.item_index.clone(), data.chosen.clone())
    taken = ConditionalLogit(
        ColumnStore(problem.item_blocks, *shape, rows, *size, dense_threshold=0.0, own_blocks=True)
    )
    assert rows.case_index is None and rows.item_index is None and rows.chosen is None
    assert taken.layout == built.layout == "padded"
    pairs = zip(built.value_and_gradient(theta), taken.value_and_gradient(theta), strict=True)
    for left, right in pairs:
        assert torch.equal(left, right)
    assert torch.equal(built.hessian(theta), taken.hessian(theta))
    assert all(block.x is None for block in problem.item_blocks)  # handed over: dropped


def test_every_model_provides_what_the_protocol_declares():
    """estimate reads models only through models.protocol.Model: every member is there, with
    the declared facts' values."""
    from choicecli.models import (
        ConditionalLogit,
        DenseNestedLogit,
        Model,
        NestedRows,
        RaggedNestedLogit,
        nested_logit,
    )

    members = [*Model.__annotations__, "value_and_gradient", "hessian", "subsample"]
    members.append("drop_subsamples")
    problem = problem_for(
        toy_frame(), "(x|constant) + (1|item)", nests="n1=a,b;n2=c", nest_formula="(1|user)"
    )
    data = problem.data
    rows = NestedRows(
        problem.item_blocks, problem.nest_blocks, problem.lambda_index, problem.nest_of_item,
        len(problem.parameters), data.case_index, data.item_index, data.n_cases, data.chosen,
    )  # fmt: skip
    models = [
        problem.identification_model(),
        nested_logit(rows, dense_threshold=0.0),
        nested_logit(rows, dense_threshold=2.0),
    ]
    assert [type(m) for m in models] == [ConditionalLogit, DenseNestedLogit, RaggedNestedLogit]
    for model in models:
        assert [name for name in members if not hasattr(model, name)] == []
        assert model.n_parameters == len(problem.parameters) and model.n_cases == 3
        assert model.n_rows == data.n_rows and model.by_user  # (1|user) in the nest formula
    # analytic at any P: the ragged strategy on an N x J grid made for its Hessian
    assert [m.analytic_hessian_limit for m in models] == [None, None, None]
    assert [m.can_subsample for m in models] == [True, True, False]
    assert models[2].subsample(10) is None
