"""Estimation options (issue 18): --se kinds, --weights-kind, the tests against the null and
`choice coef --vcov`. Robust errors are checked against a sandwich computed here in numpy from
the data and the estimates alone; per-case scores against autograd."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from choicecli.cli import app
from choicecli.data import Roles
from choicecli.fit import FitOptions, fit_model
from choicecli.inference import ErrorsChoice, parse_se
from choicecli.problem import ModelSpec
from conftest import (
    CHOICE_EXECUTABLE,
    MODE_CANADA_FORMULA,
    problem_for,
    random_theta,
    reference_file,
    toy_frame,
)

MC_ROLES = Roles(case="case", item="alt", choice="choice")
MC_OPTIONS = ["--case", "case", "--item", "alt", "--choice", "choice"]


@pytest.fixture(scope="module")
def mc_frame() -> pl.DataFrame:
    """ModeCanada's cases offering all four alternatives (mlogit's published fit)."""
    return pl.read_csv(reference_file("ModeCanada.csv.gz")).filter(pl.col("noalt") == 4)


def fit(frame: pl.DataFrame, se: str = "classic", formula=MODE_CANADA_FORMULA, roles=MC_ROLES,
        **options):  # fmt: skip
    spec = ModelSpec(formula, roles)
    result, _ = fit_model(frame.clone(), spec, FitOptions(errors=parse_se(se), **options),
                          where="test")  # fmt: skip
    return result


def numpy_sandwich(frame: pl.DataFrame, result, parts: bool = False):
    """Classic and robust standard errors of the free parameters, from the rows and the
    estimates only: x_r per parameter built from the coefficient labels. parts: the classic
    covariance and the per-case scores instead."""
    frame = frame.sort("case", "alt")
    free = [k for k, p in enumerate(result.parameters) if not p.fixed]
    columns = []
    for k in free:
        parameter = result.parameters[k]
        values = (
            np.ones(frame.height)
            if parameter.variable in ("1", "intercept")
            else frame.get_column(parameter.variable).cast(pl.Float64).to_numpy()
        )
        if parameter.item is not None:
            values = values * (frame.get_column("alt") == parameter.item).to_numpy()
        columns.append(values)
    x = np.stack(columns, axis=1)  # (R, P)
    beta = result.estimate.numpy()[free]
    n_cases = frame.get_column("case").n_unique()
    x = x.reshape(n_cases, 4, -1)  # every case offers 4 alternatives, sorted
    chosen = frame.get_column("choice").to_numpy().reshape(n_cases, 4)
    utility = x @ beta  # (N, 4)
    p = np.exp(utility - utility.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = np.einsum("nj,njk->nk", chosen - p, x)  # (N, P)
    mean_x = np.einsum("nj,njk->nk", p, x)  # (N, P)
    centred = x - mean_x[:, None, :]
    information = np.einsum("nj,njk,njl->kl", p, centred, centred)  # (P, P)
    classic = np.linalg.inv(information)
    if parts:
        return classic, scores
    robust = classic @ (scores.T @ scores) @ classic
    return np.sqrt(np.diag(classic)), np.sqrt(np.diag(robust))


def free_errors(result, kind: str) -> np.ndarray:
    values = result.std_errors[kind].numpy()
    return values[~np.isnan(values)]


def test_robust_equals_a_numpy_sandwich_on_mode_canada(mc_frame):
    result = fit(mc_frame, "robust")
    classic, robust = numpy_sandwich(mc_frame, result)
    assert np.allclose(free_errors(result, "classic"), classic, rtol=1e-8, atol=0)
    assert np.allclose(free_errors(result, "robust"), robust, rtol=1e-8, atol=0)
    assert torch.equal(result.std_error.nan_to_num(), result.std_errors["robust"].nan_to_num())
    assert result.fit["standard_errors"] == "robust"
    # the robust covariance is what is stored, classic's standard errors beside it
    assert np.allclose(result.covariance.diagonal().sqrt().numpy(), robust, rtol=1e-8)
    table = result.coefficient_table()
    assert {"std_error_classic", "std_error_robust"} <= set(table.columns)


def test_one_case_per_cluster_is_robust_times_the_factor(mc_frame):
    robust = fit(mc_frame, "robust")
    clustered = fit(mc_frame, "cluster:case")
    n_cases = 2779
    factor = math.sqrt(n_cases / (n_cases - 1))
    assert np.allclose(
        free_errors(clustered, "cluster"), factor * free_errors(robust, "robust"), rtol=1e-10
    )


def test_clusters_sum_their_scores(mc_frame):
    """50 clusters of cases: B = G/(G-1) sum_g (sum_n s_n)(sum_n s_n)', in numpy."""
    frame = mc_frame.with_columns((pl.col("case") % 50).alias("person"))
    roles = Roles(case="case", item="alt", choice="choice", user="person")
    result = fit(frame, "cluster", roles=roles)
    classic, scores = numpy_sandwich(frame, result, parts=True)
    people = frame.sort("case", "alt").get_column("person").to_numpy()[::4]  # (N,)
    totals = np.stack([scores[people == g].sum(axis=0) for g in range(50)])  # (G, P)
    expected = classic @ (50 / 49 * totals.T @ totals) @ classic
    assert np.allclose(free_errors(result, "cluster"), np.sqrt(np.diag(expected)), rtol=1e-8)


def test_bootstrap_is_seeded_and_near_the_classic_errors(mc_frame):
    """60 draws here (200 by hand: see the report); each draw's estimate is a weighted refit.

    The bootstrap estimates the sandwich, not the classic errors, and its Monte Carlo error
    is about 1/sqrt(2 x draws) of each error: with 60 draws about 9%. The mean of the
    log-ratios to the classic errors (13 coefficients) is checked to 10%, each ratio to 35%
    (3.5 Monte Carlo standard errors, above the robust-classic gap of 12%)."""
    first = fit(mc_frame, "bootstrap:60", seed=7)
    again = fit(mc_frame, "bootstrap:60", seed=7)
    other = fit(mc_frame, "bootstrap:60", seed=8)
    draws = [r.std_errors["bootstrap"].nan_to_num() for r in (first, again, other)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    ratio = free_errors(first, "bootstrap") / free_errors(first, "classic")
    assert abs(np.log(ratio).mean()) < 0.10
    assert np.all(np.abs(np.log(ratio)) < np.log(1.35))
    assert first.fit["standard_errors"] == "bootstrap"
    assert first.estimate.equal(fit(mc_frame).estimate)  # the estimate is the full data's


def test_bootstrap_of_clusters_of_one_case_is_the_bootstrap_of_cases(mc_frame):
    """Clusters of one case each: the same draws as resampling cases, so the same errors."""
    cases = fit(mc_frame, "bootstrap:5", seed=3)
    clusters = fit(mc_frame, "bootstrap:5:cluster:case", seed=3)
    assert torch.equal(
        cases.std_errors["bootstrap"].nan_to_num(), clusters.std_errors["bootstrap"].nan_to_num()
    )
    frame = mc_frame.with_columns((pl.col("case") % 40).alias("person"))
    roles = Roles(case="case", item="alt", choice="choice", user="person")
    by_person = fit(frame, "bootstrap:5:cluster", roles=roles, seed=3)
    assert not torch.equal(
        by_person.std_errors["bootstrap"].nan_to_num(), cases.std_errors["bootstrap"].nan_to_num()
    )


def test_one_user_is_too_few_clusters(mc_frame):
    from choicecli.errors import ModelError

    frame = mc_frame.with_columns(pl.lit("everyone").alias("person"))
    roles = Roles(case="case", item="alt", choice="choice", user="person")
    with pytest.raises(ModelError, match="clustered errors need at least 2 clusters"):
        fit(frame, "cluster", roles=roles)


def duplicated(frame: pl.DataFrame, copies: pl.Series) -> pl.DataFrame:
    """Each case repeated `copies[case]` times under new case ids."""
    weights = frame.select("case").unique().sort("case").with_columns(copies.alias("w"))
    frame = frame.join(weights, on="case")
    repeated = frame.with_columns(pl.int_ranges(0, pl.col("w")).alias("copy")).explode("copy")
    return repeated.with_columns((pl.col("case") * 100 + pl.col("copy")).alias("case")).drop("copy")


def test_integer_frequency_weights_equal_duplicated_rows(mc_frame):
    n_cases = mc_frame.get_column("case").n_unique()
    copies = pl.Series((np.arange(n_cases) % 3) + 1)  # 1, 2, 3, ...
    weights = mc_frame.select("case").unique().sort("case").with_columns(copies.alias("w"))
    weighted_frame = mc_frame.join(weights, on="case")
    roles = Roles(case="case", item="alt", choice="choice", weights="w")
    weighted = fit(weighted_frame, "robust", roles=roles)
    repeated = fit(duplicated(mc_frame, copies), "robust")
    assert torch.allclose(weighted.estimate, repeated.estimate, rtol=1e-8, atol=1e-12)
    for kind in ("classic", "robust"):
        assert np.allclose(free_errors(weighted, kind), free_errors(repeated, kind), rtol=1e-8)
    assert weighted.fit["log_likelihood"] == pytest.approx(repeated.fit["log_likelihood"], 1e-10)


def test_sampling_weights_are_invariant_to_rescaling_and_robust(mc_frame):
    n_cases = mc_frame.get_column("case").n_unique()
    raw = pl.Series(0.5 + (np.arange(n_cases) % 5) / 3.0)
    roles = Roles(case="case", item="alt", choice="choice", weights="w")
    results = []
    for scale in (1.0, 37.5):
        weights = (
            mc_frame.select("case").unique().sort("case").with_columns((raw * scale).alias("w"))
        )
        frame = mc_frame.join(weights, on="case")
        spec = ModelSpec(MODE_CANADA_FORMULA, roles)
        options = FitOptions(weights_kind="sampling")  # classic asked: robust implied
        results.append(fit_model(frame, spec, options, where="test")[0])
    first, second = results
    assert first.fit["standard_errors"] == "robust" and first.fit["weights_kind"] == "sampling"
    assert torch.allclose(first.estimate, second.estimate, rtol=1e-9, atol=1e-12)
    assert np.allclose(free_errors(first, "robust"), free_errors(second, "robust"), rtol=1e-8)
    assert first.fit["log_likelihood"] == pytest.approx(second.fit["log_likelihood"], rel=1e-10)
    # rescaled to sum to the cases: the log-likelihood is on the scale of N cases
    assert first.fit["null_log_likelihood"] == pytest.approx(-n_cases * math.log(4), rel=1e-10)


def test_likelihood_ratio_against_market_shares_is_mlogits(mc_frame):
    result = fit(mc_frame)
    shares = result.fit["lr_market_shares"]
    assert round(shares["chi_squared"], 1) == 2058.1  # mlogit's summary on ModeCanada
    assert shares["df"] == 10 and shares["p_value"] < 1e-300
    equal = result.fit["lr_equal_shares"]
    expected = 2 * (result.fit["log_likelihood"] - result.fit["null_log_likelihood"])
    assert equal["chi_squared"] == pytest.approx(expected) and equal["df"] == 13
    assert result.fit["gradient_norm"] < 1e-6
    hessian = -torch.linalg.eigvalsh(torch.tensor(np.linalg.inv(result.covariance.numpy())))
    assert result.fit["hessian_condition_number"] == pytest.approx(
        float(hessian.min() / hessian.max()), rel=1e-6
    )


def test_chi_squared_p_value_by_hand():
    from choicecli.fit import _null_tests

    found = _null_tests(
        {"log_likelihood": -10.0, "null_log_likelihood": -12.0, "n_parameters": 2,
         "shares_log_likelihood": None}, n_items=3,
    )  # fmt: skip
    # chi2 with 2 df: p = exp(-x / 2) = exp(-2)
    assert found["lr_equal_shares"]["p_value"] == pytest.approx(math.exp(-2.0), rel=1e-12)
    assert found["lr_market_shares"] is None


# -- per-case scores ----------------------------------------------------------------------


def autograd_scores(model, theta: torch.Tensor) -> torch.Tensor:
    """Each case's gradient by autograd through its row log-probabilities. (N, P)"""
    chosen_rows = model.chosen_rows  # (R,) 0/1 per input row

    def per_case(point):
        log_p = model.row_log_probabilities(point)
        return torch.zeros(model.n_cases, dtype=point.dtype).index_add(
            0, model.case_rows, chosen_rows * log_p
        )

    return torch.autograd.functional.jacobian(per_case, theta)


@pytest.mark.parametrize(("n_items", "keep"), [(4, 4), (4, 3), (6, 2)])  # full, padded, ragged
def test_conditional_case_scores_equal_autograd_and_sum_to_the_gradient(n_items, keep):
    generator = np.random.default_rng(n_items + keep)
    n_cases, items = 12, [chr(ord("a") + j) for j in range(n_items)]
    frame = pl.DataFrame(
        {
            "case": np.repeat(np.arange(n_cases), n_items),
            "item": items * n_cases,
            "x": generator.normal(size=n_items * n_cases),
            "z": generator.normal(size=n_items * n_cases),
            "user": np.repeat(np.arange(n_cases) % 3, n_items).astype(str),
        }
    )
    slot = pl.int_range(pl.len()) % n_items
    chosen_slot = pl.col("case") % n_items
    frame = frame.with_columns((slot == chosen_slot).cast(pl.Int64).alias("choice"))
    # each case keeps its chosen row and the next keep - 1 alternatives
    frame = frame.filter((slot - chosen_slot) % n_items < keep)
    formula = "(x|constant) + (z|item) + (1|item) + (x|user)"
    problem = problem_for(frame, formula)
    model = problem.model(torch.device("cpu"))
    assert model.layout == {4: "full", 3: "padded", 2: "ragged"}[keep]
    theta = random_theta(len(problem.parameters), seed=keep)
    theta[problem.fixed] = 0.0
    scores = model.case_scores(theta)  # (N, P)
    _, gradient = model.value_and_gradient(theta)
    assert torch.allclose(scores.sum(dim=0), gradient, atol=1e-12)
    model.case_rows = problem.data.case_index
    model.chosen_rows = problem.data.chosen
    assert torch.allclose(scores, autograd_scores(model, theta), atol=1e-12)
    blocks = torch.cat([model.case_scores(theta, slice(k, min(k + 5, 12))) for k in (0, 5, 10)])
    assert torch.equal(blocks, scores)


@pytest.mark.parametrize("dense_threshold", [0.0, 2.0])  # dense (analytic), ragged (autograd)
@pytest.mark.parametrize("nest_formula", ["", "(w|constant) + (1|user)"])
def test_nested_case_scores_equal_autograd(dense_threshold, nest_formula):
    from choicecli.models import NestedRows, nested_logit

    frame = pl.concat([toy_frame().with_columns(pl.col("case") + 10 * k) for k in range(3)])
    problem = problem_for(
        frame, "(x|constant) + (z|item)", nests="n1=a,b;n2=c", nest_formula=nest_formula
    )
    data = problem.data
    weights = torch.arange(1.0, data.n_cases + 1, dtype=torch.float64)  # (N,)
    rows = NestedRows(
        problem.item_blocks, problem.nest_blocks, problem.lambda_index, problem.nest_of_item,
        len(problem.parameters), data.case_index, data.item_index, data.n_cases, data.chosen,
        weights,
    )  # fmt: skip
    model = nested_logit(rows, dense_threshold=dense_threshold)
    theta = random_theta(len(problem.parameters), seed=3)
    theta[problem.fixed] = 0.0
    theta[problem.lambda_index] = torch.tensor([0.7, 0.9], dtype=torch.float64)
    scores = model.case_scores(theta)  # (N, P) unweighted
    model.case_rows = data.case_index
    model.chosen_rows = data.chosen
    assert torch.allclose(scores, autograd_scores(model, theta), atol=1e-10)
    _, gradient = model.value_and_gradient(theta)
    assert torch.allclose((weights[:, None] * scores).sum(dim=0), gradient, atol=1e-10)
    assert torch.allclose(model.case_scores(theta, slice(2, 5)), scores[2:5], atol=1e-14)


def test_nested_logit_robust_is_the_sandwich_of_its_scores_and_bootstrap_runs():
    from choicecli.io import read_table
    from conftest import HC_FORMULA

    frame = read_table(str(reference_file("HC.csv")))[0]
    spec = ModelSpec(
        HC_FORMULA,
        Roles(case="idx.id1", item="idx.id2", choice="depvar"),
        nests="cooling=gcc,ecc,erc,hpc;other=gc,ec,er",
        shared_lambda=True,
    )
    result, problem = fit_model(
        frame.clone(), spec, FitOptions(errors=parse_se("robust")), where="HC"
    )
    model = problem.model(torch.device("cpu"))
    free = ~problem.fixed
    scores = model.case_scores(result.estimate)[:, free].numpy()  # (N, P)
    classic = np.linalg.inv(-model.hessian(result.estimate)[free][:, free].numpy())
    expected = classic @ (scores.T @ scores) @ classic
    assert np.allclose(free_errors(result, "robust"), np.sqrt(np.diag(expected)), rtol=1e-8)
    boot, _ = fit_model(frame, spec, FitOptions(errors=parse_se("bootstrap:20")), where="HC")
    ratio = free_errors(boot, "bootstrap") / free_errors(boot, "classic")
    assert np.all((ratio > 0.5) & (ratio < 2.0))  # 20 draws: a sanity check of the machinery


def test_case_weights_change_value_gradient_and_hessian(mc_frame):
    """set_case_weights: the model's value, gradient and Hessian follow the new weights (the
    bootstrap's resamples), and its caches do not outlive them."""
    spec = ModelSpec(MODE_CANADA_FORMULA, MC_ROLES)
    from choicecli.problem import build_problem

    problem = build_problem(mc_frame.clone(), spec, "mc")
    model = problem.model(torch.device("cpu"))
    theta = random_theta(len(problem.parameters), scale=0.01)
    theta[problem.fixed] = 0.0
    weights = torch.arange(model.n_cases, dtype=torch.float64) % 3  # (N,) some 0
    model.value_and_gradient(theta)
    model.hessian(theta)  # cached at theta
    model.set_case_weights(weights)
    value, gradient = model.value_and_gradient(theta)
    hessian = model.hessian(theta)
    scores = model.case_scores(theta)  # (N, P) unweighted
    assert torch.allclose(gradient, (weights[:, None] * scores).sum(0), atol=1e-9)
    fresh = problem_for_weights(mc_frame, weights)
    fresh_value, fresh_gradient = fresh.value_and_gradient(theta)
    assert float(value) == pytest.approx(float(fresh_value), rel=1e-12)
    assert torch.allclose(hessian, fresh.hessian(theta), rtol=1e-10, atol=1e-10)
    model.set_case_weights(None)
    assert not model.weighted and bool((model.case_weights == 1).all())


def problem_for_weights(frame: pl.DataFrame, weights: torch.Tensor):
    from choicecli.problem import build_problem

    table = frame.select("case").unique().sort("case").with_columns(pl.Series("w", weights))
    spec = ModelSpec(MODE_CANADA_FORMULA, Roles(case="case", item="alt", choice="choice",
                                                weights="w"))  # fmt: skip
    problem = build_problem(frame.join(table, on="case"), spec, "mc")
    return problem.model(torch.device("cpu"))


# -- options and the CLI ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("classic", ErrorsChoice("classic")),
        ("robust", ErrorsChoice("robust")),
        ("cluster", ErrorsChoice("cluster", clustered=True)),
        ("cluster:person", ErrorsChoice("cluster", "person", clustered=True)),
        ("bootstrap:50", ErrorsChoice("bootstrap", None, 50)),
        ("bootstrap:50:cluster", ErrorsChoice("bootstrap", None, 50, clustered=True)),
        ("bootstrap:9:cluster:case", ErrorsChoice("bootstrap", "case", 9, clustered=True)),
        ("none", ErrorsChoice("none")),
    ],
)
def test_parse_se(text, expected):
    assert parse_se(text) == expected


@pytest.fixture(scope="module")
def mc_parquet(mc_frame, tmp_path_factory):
    path = tmp_path_factory.mktemp("options") / "mc.parquet"
    mc_frame.with_columns((pl.col("case") % 50).alias("person")).write_parquet(path)
    return path


def run_cli(*arguments: str):
    return CliRunner().invoke(app, list(arguments), env={"COLUMNS": "400"})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--se", "sandwich"], "--se must be classic, robust"),
        (["--se", "bootstrap"], "--se bootstrap:N needs a number of draws"),
        (["--se", "bootstrap:1"], "--se bootstrap:N needs a number of draws"),
        (["--se", "robust:2"], "--se robust takes no argument"),
        (["--se", "bootstrap:5:users"], "draws cases, or clusters with :cluster[:COL]"),
        (["--se", "cluster"], "--se cluster clusters by the user column"),
        (["--se", "cluster:dist"], "--se cluster:dist: clusters are the user column"),
        (["--weights-kind", "analytic"], "--weights-kind must be frequency or sampling"),
        (["--weights-kind", "sampling"], "--weights-kind sampling needs --weights COL"),
        (
            ["--weights-kind", "sampling", "--weights", "income", "--se", "classic"],
            "--se classic does not apply to sampling weights",
        ),
    ],
)
def test_bad_options_are_one_line_usage_errors(mc_parquet, tmp_path, arguments, message):
    model = tmp_path / "model"
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "fit", str(mc_parquet), "-f", "(cost|constant)", *MC_OPTIONS,
         "--model", str(model), *arguments],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert not model.exists()


def test_cli_cluster_by_user_and_coef_vcov_in_every_format(mc_parquet, tmp_path):
    model = tmp_path / "model"
    result = run_cli(
        "fit", str(mc_parquet), "-f", MODE_CANADA_FORMULA, *MC_OPTIONS, "--user", "person",
        "--se", "cluster", "--model", str(model),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = " ".join(result.output.split())
    assert "standard errors: cluster" in summary
    assert "LR chi2 2058.1 (df 10, p < 1e-300) against market shares" in summary
    document = json.loads((model / "model.json").read_text())
    assert document["fit"]["standard_errors"] == "cluster"
    assert document["fit"]["lr_market_shares"]["df"] == 10
    assert document["fit"]["hessian_condition_number"] > 1
    assert document["spec"]["options"]["standard_errors"] == {
        "kind": "cluster", "cluster": None, "draws": 0, "clustered": True
    }  # fmt: skip
    table = pl.read_parquet(model / "coefficients.parquet")
    assert table.get_column("std_error").equals(table.get_column("std_error_cluster"))
    assert "std_error_classic" in table.columns
    from safetensors.torch import load_file

    tensors = load_file(model / "params.safetensors")
    assert {"std_error_classic", "std_error_cluster"} <= set(tensors)

    out = tmp_path / "vcov.csv"
    assert run_cli("coef", "--model", str(model), "--vcov", "-o", str(out)).exit_code == 0
    frame = pl.read_csv(out)
    labels = frame.get_column("coefficient").to_list()
    assert len(labels) == 13 and frame.columns == ["coefficient", *labels]
    matrix = frame.drop("coefficient").to_numpy()
    assert np.allclose(matrix, matrix.T, rtol=0, atol=0)
    errors = table.filter(~pl.col("fixed")).get_column("std_error").to_numpy()
    assert np.allclose(np.sqrt(np.diag(matrix)), errors, rtol=1e-12)
    assert "cost[constant]" in labels and "intercept[item] (bus)" in labels
    parquet = tmp_path / "vcov.parquet"
    assert run_cli("coef", "--model", str(model), "--vcov", "-o", str(parquet)).exit_code == 0
    assert pl.read_parquet(parquet).equals(frame)
    json_out = tmp_path / "vcov.json"
    assert run_cli("coef", "--model", str(model), "--vcov", "-o", str(json_out)).exit_code == 0
    assert len(json.loads(json_out.read_text())["covariance"]) == 13
    shown = run_cli("coef", "--model", str(model), "--vcov", "--format", "table")
    assert shown.exit_code == 0 and "intercept[item] (bus)" in shown.output
    one_term = run_cli("coef", "cost[constant]", "--model", str(model), "--vcov", "--format", "csv")
    assert one_term.exit_code == 0
    assert one_term.output.splitlines()[0] == "coefficient,cost[constant]"


def test_cli_se_none_and_sampling_weights(mc_parquet, tmp_path):
    model = tmp_path / "model"
    result = run_cli(
        "fit", str(mc_parquet), "-f", "(cost|constant) + (1|item)", *MC_OPTIONS, "--se", "none",
        "--model", str(model),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(model / "coefficients.parquet")
    assert table.get_column("std_error").null_count() == table.height
    vcov = run_cli("coef", "--model", str(model), "--vcov", "--format", "csv")
    assert vcov.exit_code == 2 and "no covariance matrix" in vcov.output
    result = run_cli(
        "fit", str(mc_parquet), "-f", "(cost|constant) + (1|item)", *MC_OPTIONS,
        "--weights", "income", "--weights-kind", "sampling", "--model", str(model),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "standard errors: robust, sampling weights" in " ".join(result.output.split())


def test_bootstrap_through_the_executable_is_reproducible_and_round_trips(mc_parquet, tmp_path):
    from choicecli.loader import load_result
    from choicecli.spec import spec_from_document

    tables = []
    for name in ("first", "second"):
        model = tmp_path / name
        completed = subprocess.run(
            [str(CHOICE_EXECUTABLE), "fit", str(mc_parquet), "-f", MODE_CANADA_FORMULA,
             *MC_OPTIONS, "--se", "bootstrap:20", "--seed", "5", "--model", str(model)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr
        assert "standard errors: bootstrap" in " ".join(completed.stderr.split())
        tables.append(pl.read_parquet(model / "coefficients.parquet"))
    first, second = tables
    assert first.get_column("std_error").equals(second.get_column("std_error"))
    assert first.get_column("std_error").equals(first.get_column("std_error_bootstrap"))
    assert not first.get_column("std_error").equals(first.get_column("std_error_classic"))
    loaded = load_result(tmp_path / "first")  # the tensors read back give the same table
    assert loaded.coefficient_table().equals(first)
    assert set(loaded.std_errors) == {"classic", "bootstrap"}
    options = loaded.spec["options"]
    assert options["standard_errors"]["kind"] == "bootstrap" and options["seed"] == 5
    assert options["weights_kind"] == "frequency"
    spec_from_document(loaded.spec)  # the recorded options leave the spec readable


@pytest.mark.parametrize("dense_threshold", [0.0, 2.0])
def test_nested_models_follow_new_case_weights(dense_threshold):
    """set_case_weights on both nested strategies: value, gradient and Hessian equal those
    of a model built with the weights, after a Hessian was cached under the old ones."""
    from choicecli.models import NestedRows, nested_logit

    frame = pl.concat([toy_frame().with_columns(pl.col("case") + 10 * k) for k in range(3)])
    problem = problem_for(frame, "(x|constant) + (z|item)", nests="n1=a,b;n2=c")
    data = problem.data
    weights = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.0, 0.0, 2.0, 1.0, 4.0], dtype=torch.float64)

    def build(case_weights):
        rows = NestedRows(
            problem.item_blocks, problem.nest_blocks, problem.lambda_index,
            problem.nest_of_item, len(problem.parameters), data.case_index, data.item_index,
            data.n_cases, data.chosen, case_weights,
        )  # fmt: skip
        return nested_logit(rows, dense_threshold=dense_threshold)

    theta = random_theta(len(problem.parameters), seed=5)
    theta[problem.fixed] = 0.0
    theta[problem.lambda_index] = torch.tensor([0.6, 0.8], dtype=torch.float64)
    model, fresh = build(None), build(weights)
    model.value_and_gradient(theta)
    model.hessian(theta)
    model.set_case_weights(weights)
    value, gradient = model.value_and_gradient(theta)
    fresh_value, fresh_gradient = fresh.value_and_gradient(theta)
    assert float(value) == pytest.approx(float(fresh_value), rel=1e-12)
    assert torch.allclose(gradient, fresh_gradient, rtol=1e-12, atol=1e-12)
    assert torch.allclose(model.hessian(theta), fresh.hessian(theta), rtol=1e-10, atol=1e-12)


def test_clustering_by_the_owner_of_user_coefficients_warns(tmp_path):
    from conftest import SAMPLE_DATA

    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet")
    roles = Roles(case="case_id", item="mode", choice="chosen", user="user_id")
    result = fit(frame, "cluster", formula="(time|constant) + (1|item) + (cost|user)", roles=roles)
    assert any("understate the uncertainty" in warning for warning in result.warnings)
    shared = fit(frame, "cluster", formula="(time|constant) + (1|item) + (cost|constant)",
                 roles=roles)  # fmt: skip
    assert not any("understate" in warning for warning in shared.warnings)
