"""Identification: the rank check's factorisation, data reasons, and the fits where nothing
(or something unbounded) is estimable, through the library and the real CLI."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from reliability_helpers import error_line, fit, long_table, warning_lines, write
from test_models import ALL_VARIATIONS, random_nested_frame, simulated_frame

from choicecli import estimate
from choicecli.data import Roles
from choicecli.identify import Dependence, dependent_parameters, greedy_factor
from conftest import problem_for, toy_frame


def least_squares_dependences(
    information: torch.Tensor, candidates: torch.Tensor, second_moments: torch.Tensor
) -> list[Dependence]:
    """The rank check by its definition, one parameter at a time: a parameter is kept when
    the part of its column that the kept ones before it do not explain (a regression on
    them, solved afresh) is above the tolerance; its partners are the regression's weights."""
    from choicecli.identify import DEPENDENCE_TOLERANCE, ZERO_TOLERANCE

    block = information[candidates][:, candidates]
    diagonal = block.diagonal().clamp_min(0)
    magnitude = second_moments[candidates].clamp_min(0).sqrt()
    magnitude = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    cancels = diagonal / magnitude**2 <= ZERO_TOLERANCE
    found = [Dependence(int(candidates[i]), True, ()) for i in cancels.nonzero().flatten()]
    scale = torch.where(cancels, torch.ones_like(diagonal), diagonal.sqrt())
    scaled = block / scale[:, None] / scale[None, :]
    kept: list[int] = []
    for position in (~cancels).nonzero().flatten().tolist():
        gram, cross = scaled[kept][:, kept], scaled[kept, position]
        weights = torch.linalg.solve(gram, cross) if kept else cross
        left = float(scaled[position, position] - cross @ weights) if kept else 1.0
        if left > DEPENDENCE_TOLERANCE:
            kept.append(position)
            continue
        strongest = weights.abs()
        partners = [kept[i] for i in (strongest > 1e-6 * strongest.max()).nonzero().flatten()]
        found.append(
            Dependence(
                int(candidates[position]), False, tuple(int(candidates[p]) for p in partners)
            )
        )
    return sorted(found, key=lambda item: item.index)


def rank_check_inputs(problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What fit's rank check factorises: the information at theta = 0 and the candidates."""
    model = problem.identification_model()
    zero = torch.zeros(len(problem.parameters), dtype=torch.float64)
    candidates = (~problem.fixed).nonzero().flatten()
    if problem.lambda_index is not None:
        candidates = candidates[~torch.isin(candidates, problem.lambda_index)]
    return -model.hessian(zero), candidates, model.second_moments()


ROLES = Roles(case="case", item="item", choice="choice", user="user")
CASES = {  # the formulas of the existing identification tests, and collinear ones
    "all variations": (toy_frame(), ALL_VARIATIONS, None),
    "w constant in each case": (
        simulated_frame(300, 17),
        "(x|constant) + (1|item) + (w|constant)",
        None,
    ),
    "x twice and a user intercept beside (1|item)": (
        random_nested_frame(200, 9),
        "(x|constant) + (1|item) + (x|item) + (z|item) + (x|user) + (1|user)",
        None,
    ),
    "nested, a nest intercept beside (1|item)": (
        random_nested_frame(200, 9),
        "(x|constant) + (1|item) + (z|user)",
        "n1=i0,i1;n2=i2,i3;n3=i4",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_factorisation_finds_what_a_regression_per_parameter_finds(case):
    frame, formula, nests = CASES[case]
    roles = ROLES if "user" in frame.columns else Roles(case="case", item="item", choice="choice")
    # a nest intercept is a sum of its alternatives' intercepts: collinear with (1|item)
    nested = {"nests": nests, "nest_formula": "(1|item) + (w|item)"} if nests else {}
    problem = problem_for(frame, formula, roles=roles, **nested)
    inputs = rank_check_inputs(problem)
    found = dependent_parameters(*inputs)
    assert found == least_squares_dependences(*inputs)
    assert found or case == "all variations"  # the others hold dependent parameters


def test_greedy_factor_keeps_the_independent_columns_and_factors_them():
    generator = torch.Generator().manual_seed(3)
    columns = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    columns[:, 4] = columns[:, 0] - 2.0 * columns[:, 2]  # planted: 4 and 9 depend on earlier
    columns[:, 9] = 0.5 * columns[:, 4] + columns[:, 7]
    gram = columns.T @ columns
    scale = gram.diagonal().sqrt()
    matrix = gram / scale[:, None] / scale[None, :]
    factor, kept = greedy_factor(matrix, 1e-9)
    assert kept.tolist() == [k not in (4, 9) for k in range(12)]
    kept_factor = factor[kept][:, kept]
    assert torch.allclose(kept_factor @ kept_factor.T, matrix[kept][:, kept], atol=1e-12)
    assert torch.equal(factor[:, ~kept], torch.zeros(12, 2, dtype=torch.float64))


def test_a_nest_level_user_term_keeps_the_nested_model_from_the_warm_start(monkeypatch):
    """A tenth of each user's cases may not identify their coefficients, at either level."""
    monkeypatch.setattr(estimate, "WARM_START_CASES", 100)
    monkeypatch.setattr(estimate, "WARM_START_CASES_PER_PARAMETER", 1)
    frame = random_nested_frame(400, 3)
    nests = "n1=i0,i1;n2=i2,i3;n3=i4"
    models = {
        nest_formula: problem_for(
            frame, "(x|constant) + (1|item)", roles=ROLES, nests=nests, nest_formula=nest_formula
        ).model(torch.device("cpu"))
        for nest_formula in ("(w|item)", "(w|item) + (1|user)")
    }
    assert not models["(w|item)"].by_user and models["(w|item) + (1|user)"].by_user
    assert estimate.warm_start_applies(models["(w|item)"], 10)
    assert not estimate.warm_start_applies(models["(w|item) + (1|user)"], 10)


@pytest.mark.parametrize(
    "formula, extra, column, reason",
    [
        ("(1|constant)", [], None, "intercept[constant]"),
        ("(price|user)", ["--user", "case"], None, "its user has a single case"),
        ("(price|user) + (1|user)", ["--user", "single"], "single", "its user has a single case"),
    ],
)
def test_nothing_estimable_is_one_clear_line(tmp_path, formula, extra, column, reason):
    frame = long_table()
    if column == "single":
        frame = frame.with_columns(single=pl.col("case").cast(pl.String))
    data = write(frame, tmp_path / "data.csv")
    result = fit(data, tmp_path / "m", *extra, formula=formula)
    error_line(result, "nothing is estimable", reason)
    assert not (tmp_path / "m").exists()


def test_all_zero_weights_are_refused_with_the_data(tmp_path):
    """Weights that are all zero leave nothing to estimate: refused as data, before the fit."""
    frame = long_table().with_columns(weight=pl.lit(0.0))
    data = write(frame, tmp_path / "data.csv")
    result = fit(data, tmp_path / "m", "--weights", "weight", formula="(price|constant) + (1|item)")
    error_line(result, "every weight in column 'weight' is 0", "positive weight")
    assert not (tmp_path / "m").exists()


def test_the_perfect_prediction_warning_names_the_separating_column(tmp_path):
    frame = long_table()
    separated = frame.with_columns(  # the chosen alternative always has the highest price
        pl.when(pl.col("choice") == 1).then(pl.col("price") + 10.0).otherwise(pl.col("price"))
    )
    data = write(separated.rename({"price": "cost in $"}), tmp_path / "data.csv")
    result = fit(data, tmp_path / "m", formula="(`cost in $`|constant)")
    assert result.exit_code in (0, 3), result.stderr
    (line,) = [w for w in warning_lines(result) if "perfect prediction" in w]
    assert "(column 'cost in $')" in line
