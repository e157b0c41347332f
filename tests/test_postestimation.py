"""Post-estimation commands (compare, summary, coef --describe, wtp) on real fitted models,
through the CLI in-process (CliRunner) and as a subprocess of the installed `choice`."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import polars as pl
import pytest
import torch
from reliability_helpers import CLEAN_ENV, long_table, subprocess_env
from typer.testing import CliRunner

from choicecli.cli import app
from choicecli.compare import chi_squared_upper
from conftest import CHOICE_EXECUTABLE, MODE_CANADA_FORMULA, SAMPLE_DATA

MODE_CANADA_SMALL = MODE_CANADA_FORMULA.replace(" + (ivt|item-full)", "")
MODE_CANADA_ROLES = ["--case", "case", "--item", "alt", "--choice", "choice"]


def invoke(*arguments: str):
    return CliRunner().invoke(app, [str(a) for a in arguments], env=CLEAN_ENV)


def fit(data, model, formula: str, *roles: str) -> None:
    result = invoke("fit", data, "--formula", formula, *roles, "-m", model, "-q")
    assert result.exit_code == 0, result.stderr


def one_error_line(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr


@pytest.fixture(scope="module")
def mode_canada_models(mode_canada_parquet, tmp_path_factory):
    """ModeCanada with and without (ivt|item-full)."""
    root = tmp_path_factory.mktemp("mc_models")
    fit(mode_canada_parquet, root / "full", MODE_CANADA_FORMULA, *MODE_CANADA_ROLES)
    fit(mode_canada_parquet, root / "small", MODE_CANADA_SMALL, *MODE_CANADA_ROLES)
    return root / "small", root / "full"


def model_fit(model) -> dict:
    return json.loads((model / "model.json").read_text())["fit"]


# ---------------------------------------------------------------- compare


def test_chi_squared_upper_tail_matches_closed_forms():
    for statistic in (0.5, 3.0, 17.25, 314.0):
        assert chi_squared_upper(statistic, 2) == pytest.approx(math.exp(-statistic / 2), rel=1e-12)
        assert chi_squared_upper(statistic, 4) == pytest.approx(
            math.exp(-statistic / 2) * (1 + statistic / 2), rel=1e-12
        )
    assert chi_squared_upper(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi_squared_upper(0.0, 3) == 1.0


def test_compare_mode_canada_with_and_without_ivt(mode_canada_models):
    small, full = mode_canada_models
    result = invoke("compare", small, full, "--tests", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    (test,) = json.loads(result.stdout)
    difference = model_fit(full)["log_likelihood"] - model_fit(small)["log_likelihood"]
    assert test["restricted"] == str(small) and test["full"] == str(full)
    assert test["lr_statistic"] == 2 * difference
    assert test["lr_statistic"] == pytest.approx(
        314.095, abs=1e-3
    )  # mlogit's -1874.34 and -2031.39
    assert test["df"] == 4
    statistic = test["lr_statistic"]
    assert test["p_value"] == pytest.approx(
        math.exp(-statistic / 2) * (1 + statistic / 2), rel=1e-9
    )
    # the models table: one row per model, in the order given, with the fit's own statistics
    models = json.loads(invoke("compare", full, small, "--format", "json").stdout)
    assert [row["model"] for row in models] == [str(full), str(small)]
    for row, model in zip(models, (full, small), strict=True):
        statistics = model_fit(model)
        for key in ("log_likelihood", "n_parameters", "aic", "bic", "adjusted_rho_squared"):
            assert row[key] == statistics[key]
    assert [row["n_parameters"] for row in models] == [13, 9]


def test_compare_table_and_parquet_outputs(mode_canada_models, tmp_path):
    small, full = mode_canada_models
    shown = invoke("compare", small, full, "--format", "table")
    assert shown.exit_code == 0, shown.stderr
    for text in ("log-likelihood", "AIC", "BIC", "adj. rho-squared", "likelihood-ratio tests",
                 "-1874.3427", "-2031.3902", "314.0950"):  # fmt: skip
        assert text in shown.stdout
    target = tmp_path / "comparison.parquet"
    written = invoke("compare", small, full, "-o", target)
    assert written.exit_code == 0 and written.stdout == ""
    frame = pl.read_parquet(target)
    assert frame.get_column("model").to_list() == [str(small), str(full)]
    assert frame.get_column("n_cases").to_list() == [2779, 2779]
    tests = invoke("compare", small, full, "--tests", "--format", "csv")
    assert tests.stdout.splitlines()[0] == "restricted,full,lr_statistic,df,p_value"


def test_compare_says_when_the_data_differ(mode_canada_models, mode_canada_parquet, tmp_path):
    small, _ = mode_canada_models
    part = tmp_path / "part.parquet"
    # every other case (the first 300 alone have a runaway: bus never chosen, car separated)
    pl.read_parquet(mode_canada_parquet).filter(pl.col("case") % 2 == 0).write_parquet(part)
    fit(part, tmp_path / "part", MODE_CANADA_SMALL, *MODE_CANADA_ROLES)
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "compare", str(small), str(tmp_path / "part"), "--tests"],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "restricted,full,lr_statistic,df,p_value\n"  # no test
    (line,) = completed.stderr.splitlines()
    assert line.startswith("Note: ") and "not fit on the same data" in line
    assert "SHA-256" in line
    shown = invoke("compare", small, tmp_path / "part", "--format", "table")
    assert "not fit on the same data" in shown.stdout and shown.stderr == ""
    # an output that cannot be written: its error alone, no notes before it
    blocked = invoke("compare", small, tmp_path / "part", "-o", tmp_path, "--format", "csv")
    one_error_line(blocked, 1, str(tmp_path))


def test_compare_nesting_is_a_subset_of_estimated_parameters(tmp_path):
    frame = long_table(60)
    data = tmp_path / "toy.parquet"
    frame.write_parquet(data)
    models = {}
    for name, formula in (("both", "(price|constant) + (1|item)"), ("price", "(price|constant)"),
                          ("intercepts", "(1|item)")):  # fmt: skip
        models[name] = tmp_path / name
        fit(data, models[name], formula)
    result = invoke("compare", models["price"], models["intercepts"], models["both"], "--tests",
                    "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    tests = json.loads(result.stdout)
    assert [(t["restricted"], t["full"], t["df"]) for t in tests] == [
        (str(models["price"]), str(models["both"]), 2),  # the two intercepts (base fixed)
        (str(models["intercepts"]), str(models["both"]), 1),
    ]
    (note,) = result.stderr.splitlines()
    assert "neither nests the other" in note
    # a model beside itself: the same parameters, no test
    same = invoke("compare", models["both"], models["both"], "--tests", "--format", "json")
    assert json.loads(same.stdout) == [] and "the same parameters" in same.stderr


def test_compare_usage_and_model_errors(mode_canada_models, tmp_path):
    small, _ = mode_canada_models
    one_error_line(invoke("compare", small), 2, "two or more")
    one_error_line(invoke("compare", small, tmp_path / "nothing"), 1, "nothing", "choice fit")
    one_error_line(invoke("compare", small, small, "--format", "table", "-o", tmp_path / "x"), 2)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- summary, coef --describe

TRANSPORT = [
    "--formula", "(time|constant) + (1|item) + (income|item) + (cost|user)",
    "--case", "case_id", "--item", "mode", "--choice", "chosen", "--user", "user_id",
]  # fmt: skip


@pytest.fixture(scope="module")
def transport_fit(tmp_path_factory):
    """The sample transport data with a cost coefficient per user; the fit's own printout."""
    model = tmp_path_factory.mktemp("transport") / "model"
    result = invoke("fit", SAMPLE_DATA / "transport.parquet", *TRANSPORT, "-m", model)
    assert result.exit_code == 0, result.stderr
    return model, result.stderr


@pytest.mark.parametrize("command", ["compare", "summary", "wtp", "effects"])
def test_new_commands_have_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example: choice" in result.stdout


def test_summary_prints_what_fit_printed(transport_fit):
    model, printed = transport_fit
    shown = invoke("summary", "-m", model, "--format", "table")
    assert shown.exit_code == 0, shown.stderr
    assert shown.stderr == ""
    fitted = printed.split()
    assert fitted[-4:-1] == ["model", "written", "to"]
    assert shown.stdout.split() == fitted[:-4]  # the same words, whatever the line width


def test_summary_statistics_in_every_format(transport_fit, tmp_path):
    model, _ = transport_fit
    statistics = model_fit(model)
    (row,) = json.loads(invoke("summary", "-m", model, "--format", "json").stdout)
    for key in ("log_likelihood", "null_log_likelihood", "aic", "bic", "n_cases", "n_parameters",
                "adjusted_rho_squared", "converged", "method"):  # fmt: skip
        assert row[key] == statistics[key]
    assert row["observed_share_bike"] == statistics["observed_shares"]["bike"]
    assert row["formula"] == TRANSPORT[1] and row["kind"] == "conditional logit"
    assert invoke("summary", "-m", model, "-o", tmp_path / "s.parquet").exit_code == 0
    frame = pl.read_parquet(tmp_path / "s.parquet")
    assert frame.height == 1 and frame["log_likelihood"][0] == statistics["log_likelihood"]
    assert frame.schema["rho_squared_shares"] == pl.Float64  # null here: still a number column
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "summary", "-m", str(model)],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0 and completed.stderr == ""
    assert pl.read_csv(completed.stdout.encode())["n_cases"][0] == 2000  # CSV when piped


def test_summary_of_a_missing_model(tmp_path):
    one_error_line(invoke("summary", "-m", tmp_path / "none"), 1, "none", "choice fit")


def test_coef_describe_summarises_users(transport_fit, tmp_path):
    model, _ = transport_fit
    result = invoke("coef", "cost[user]", "--describe", "-m", model, "--format", "json")
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    users = pl.read_parquet(model / "coefficients.parquet").filter(pl.col("term") == "cost[user]")
    estimates = users["estimate"].to_numpy()
    assert row["count"] == 150 == users.height and row["not_estimated"] == 0
    assert row["mean"] == pytest.approx(estimates.mean(), rel=1e-12)
    assert row["sd"] == pytest.approx(estimates.std(ddof=1), rel=1e-12)
    for name, q in (("q05", 0.05), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("q95", 0.95)):
        assert row[name] == pytest.approx(np.quantile(estimates, q), rel=1e-12)
    assert (row["min"], row["max"]) == (estimates.min(), estimates.max())
    share = float((np.abs(users["z_value"].to_numpy()) > 1.959963984540054).mean())
    assert row["share_significant"] == pytest.approx(share, rel=1e-12)
    assert 0 < share < 1
    # every format; no TERM describes every user term
    shown = invoke("coef", "--describe", "-m", model, "--format", "table")
    assert "cost[user]" in shown.stdout and "|z| > 1.96" in shown.stdout and "150" in shown.stdout
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "coef", "cost[user]", "--describe", "-m", str(model), "-o",
         str(tmp_path / "d.parquet")],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0 and completed.stderr == "" and completed.stdout == ""
    assert pl.read_parquet(tmp_path / "d.parquet").to_dicts() == [row]
    csv = invoke("coef", "cost[user]", "--describe", "-m", model, "--format", "csv")
    assert pl.read_csv(csv.stdout.encode())["count"][0] == 150


def test_coef_describe_per_alternative_and_errors(tmp_path, transport_fit):
    data = tmp_path / "toy.parquet"
    long_table(60).write_parquet(data)
    fit(data, tmp_path / "m", "(price|constant) + (1|user-item)", "--user", "user")
    result = invoke("coef", "intercept[user-item]", "--describe", "-m", tmp_path / "m",
                      "--format", "json")  # fmt: skip
    rows = json.loads(result.stdout)
    assert [row["item"] for row in rows] == ["b", "c"]  # the base alternative a is fixed
    assert sum(row["count"] + row["not_estimated"] for row in rows) == 12  # 6 users x 2
    model, _ = transport_fit
    one_error_line(invoke("coef", "time[constant]", "--describe", "-m", model), 2, "by user")
    one_error_line(invoke("coef", "nope[user]", "--describe", "-m", model), 1, "nope[user]")


# ---------------------------------------------------------------- wtp


def parameter_keys(result) -> list[tuple]:
    return [(p.level, p.term, p.feature, p.item, p.user) for p in result.parameters]


def row_key(row: dict) -> tuple:
    return (row["level"], row["term"], row["feature"], row["item"], row["user"])


def wtp_rows(model, price: str, *extra: str) -> list[dict]:
    result = invoke("wtp", "--price", price, "-m", model, "--format", "json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def bootstrap_draws(result, n_draws: int = 2000, seed: int = 0) -> torch.Tensor:
    """Parametric bootstrap: parameters drawn from N(estimate, covariance). (D, P)"""
    index = result.estimated_index
    factor = torch.linalg.cholesky(result.covariance.double())  # (k, k)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(n_draws, index.numel(), generator=generator, dtype=torch.float64)
    draws = result.estimate.double().repeat(n_draws, 1)  # (D, P)
    draws[:, index] = result.estimate.double()[index] + noise @ factor.T
    return draws


def test_wtp_is_the_coefficient_ratio_with_delta_method_errors(mode_canada_models):
    from choicecli.loader import load_result

    _, full = mode_canada_models
    result = load_result(full)
    keys = parameter_keys(result)
    estimate = result.estimate.double()
    price = keys.index(("item", "cost[constant]", "cost", None, None))
    rows = wtp_rows(full, "cost[constant]")
    # every estimated coefficient but the price itself: 13 - 1 (base rows fixed, not listed)
    assert len(rows) == 12
    assert {row_key(r) for r in rows} == {
        k for k, p in zip(keys, result.parameters, strict=True) if not p.fixed
    } - {keys[price]}
    position = {int(j): i for i, j in enumerate(result.estimated_index)}
    covariance = result.covariance.double()
    for row in rows:
        b = keys.index(row_key(row))
        assert row["wtp"] == -float(estimate[b]) / float(estimate[price])  # exactly the ratio
        assert row["coefficient"] == float(estimate[b])
        # the delta method through autograd: J Sigma J' with J the gradient of -b/p
        pair = torch.tensor([position[b], position[price]])
        theta = estimate[[b, price]].clone().requires_grad_(True)
        (-theta[0] / theta[1]).backward()
        variance = theta.grad @ covariance[pair][:, pair] @ theta.grad
        assert row["std_error"] == pytest.approx(float(variance.sqrt()), rel=1e-12)
        assert row["ci_low"] == pytest.approx(row["wtp"] - 1.959963984540054 * row["std_error"])
        # Fieller: the bounds solve (b - r q)^2 = z^2 Var(b - r q), q = -p, around the estimate
        q = -float(estimate[price])
        v_b, v_q = float(covariance[pair[0], pair[0]]), float(covariance[pair[1], pair[1]])
        c_bq = -float(covariance[pair[0], pair[1]])
        for r in (row["fieller_low"], row["fieller_high"]):
            gap = (row["coefficient"] - r * q) ** 2
            spread = 1.959963984540054**2 * (v_b - 2 * r * c_bq + r**2 * v_q)
            assert gap == pytest.approx(spread, rel=1e-8)
        assert row["fieller_low"] < row["wtp"] < row["fieller_high"]


@pytest.mark.parametrize(
    ("which", "price", "measure"),
    [
        ("transport", "time[constant]", "sd"),  # price z = -15.5
        ("mode_canada", "cost[constant]", "central"),  # price z = -4.7
    ],
)
def test_wtp_errors_agree_with_a_parametric_bootstrap(
    which, price, measure, transport_fit, mode_canada_models
):
    """2,000 draws from the saved covariance, the ratio in each: its spread is the delta-method
    error to within 10%. With ModeCanada's cost coefficient only 4.7 errors from zero, the
    ratio's tails are long (1/p): its standard deviation is 6-16% above the delta method's
    first-order error (measured), so the test there uses the half-width of the central 68.3%
    of draws, the spread the 95% interval's construction rests on."""
    from choicecli.loader import load_result

    model = transport_fit[0] if which == "transport" else mode_canada_models[1]
    result = load_result(model)
    keys = parameter_keys(result)
    price_index = next(i for i, k in enumerate(keys) if k[1] == price)
    draws = bootstrap_draws(result)  # (D, P)
    rows = [r for r in wtp_rows(model, price) if r["user"] is None]
    assert len(rows) >= 8
    for row in rows:
        ratio = -draws[:, keys.index(row_key(row))] / draws[:, price_index]  # (D,)
        if measure == "sd":
            spread = float(ratio.std())
        else:
            low, high = torch.quantile(ratio, torch.tensor([0.158655, 0.841345], dtype=ratio.dtype))
            spread = float(high - low) / 2
        assert spread == pytest.approx(row["std_error"], rel=0.10), row_key(row)


def test_wtp_with_a_price_per_user(transport_fit, tmp_path):
    from choicecli.loader import load_result

    model, _ = transport_fit
    result = load_result(model)
    keys = parameter_keys(result)
    estimate = result.estimate.double()
    rows = wtp_rows(model, "cost[user]")
    time_rows = [r for r in rows if r["term"] == "time[constant]"]
    assert len(time_rows) == 150 and len(rows) == 150 * 9  # time and 8 alternative terms
    time = float(estimate[keys.index(("item", "time[constant]", "time", None, None))])
    for row in time_rows:
        cost = float(estimate[keys.index(("item", "cost[user]", "cost", None, row["user"]))])
        assert row["wtp"] == -time / cost and row["price_coefficient"] == cost
    described = wtp_rows(model, "cost[user]", "--describe")
    by_term = {(d["term"], d["item"]): d for d in described}
    assert by_term[("time[constant]", None)]["count"] == 150
    values = np.array([r["wtp"] for r in time_rows])
    assert by_term[("time[constant]", None)]["median"] == pytest.approx(np.median(values))
    shown = invoke("wtp", "--price", "cost[user]", "-m", model, "--format", "table")
    assert "per user, over users" in shown.stdout and "Note:" in shown.stdout
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "wtp", "--price", "cost[user]", "-m", str(model), "-o",
         str(tmp_path / "wtp.parquet")],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0 and completed.stdout == ""
    (note,) = completed.stderr.splitlines()  # some users' cost is not significant
    assert note.startswith("Note: ") and "of 150 users' price coefficients" in note
    assert pl.read_parquet(tmp_path / "wtp.parquet").height == len(rows)


def test_wtp_notes_an_insignificant_price(tmp_path):
    data = tmp_path / "toy.parquet"
    long_table(60).write_parquet(data)
    fit(data, tmp_path / "m", "(price|constant) + (1|item)")
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "wtp", "--price", "price[constant]", "-m", str(tmp_path / "m")],
        capture_output=True, text=True, env=subprocess_env(), timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0
    notes = completed.stderr.splitlines()
    assert len(notes) == 2 and "not significantly different from zero" in notes[0]
    assert "positive" in notes[1]
    frame = pl.read_csv(completed.stdout.encode())
    assert frame.height == 2 and frame["fieller_low"].null_count() == 2  # unbounded
    assert frame["std_error"].null_count() == 0


def test_wtp_errors(transport_fit, tmp_path):
    model, _ = transport_fit
    one_error_line(invoke("wtp", "--price", "prize[constant]", "-m", model), 1, "prize",
                   "time[constant]")  # fmt: skip
    one_error_line(invoke("wtp", "--price", "intercept[item]", "-m", model), 2, "varies by item")
    one_error_line(invoke("wtp", "--price", "time[constant]", "-m", tmp_path / "no"), 1, "no")
    missing = invoke("wtp", "-m", model)
    assert missing.exit_code == 2 and "--price" in missing.stderr


# ---------------------------------------------------------------- effects

HC_NESTS = "cooling=gcc,ecc,erc,hpc;other=gc,ec,er"
HC_ROLES = ["--case", "idx.id1", "--item", "idx.id2", "--choice", "depvar"]


def effects_rows(data, model, variable: str, kind: str = "elasticity", *extra) -> list[dict]:
    result = invoke("effects", data, "--variable", variable, "--kind", kind, "-m", model,
                    "--format", "json", *extra)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def as_matrix(rows: list[dict], column: str, labels: list[str]) -> np.ndarray:
    """(J, J): row j responds, column i changes."""
    position = {label: k for k, label in enumerate(labels)}
    matrix = np.full((len(labels), len(labels)), np.nan)
    for row in rows:
        matrix[position[row["item"]], position[row["changed"]]] = row[column]
    return matrix


def mode_canada_grids(data, model, column: str):
    """Probabilities and one column as (N, J) grids (every case offers all four modes)."""
    scored = invoke("predict", data, "-m", model, "--format", "csv")
    assert scored.exit_code == 0, scored.stderr
    frame = pl.read_csv(scored.stdout.encode()).join(
        pl.read_parquet(data).select("case", "alt", column), on=["case", "alt"]
    )
    frame = frame.sort("case", "alt")
    labels = sorted(frame["alt"].unique().to_list())
    shape = (-1, len(labels))
    return (frame["probability"].to_numpy().reshape(shape),
            frame[column].to_numpy().reshape(shape), labels)  # fmt: skip


@pytest.mark.parametrize("kind", ["elasticity", "semi-elasticity", "marginal"])
@pytest.mark.parametrize("variable", ["cost", "ivt"])
def test_conditional_logit_effects_equal_the_closed_form(
    kind, variable, mode_canada_models, mode_canada_parquet
):
    """d P_j / d x_i = beta_i P_j (1[i = j] - P_i): own beta x (1 - P), cross -beta P_i x_i."""
    _, full = mode_canada_models
    probability, values, labels = mode_canada_grids(mode_canada_parquet, full, variable)
    table = pl.read_parquet(full / "coefficients.parquet")
    rows = table.filter(pl.col("variable") == variable)
    beta = np.array([rows["estimate"][0]] * 4 if rows.height == 1 else rows["estimate"].to_list())
    identity = np.eye(len(labels))
    # (N, j, i): each case's effect on j of a change in x_i
    log_derivative = beta[None, None, :] * (identity[None] - probability[:, None, :])
    if kind == "elasticity":
        per_case = log_derivative * values[:, None, :]
    elif kind == "semi-elasticity":
        per_case = log_derivative
    else:
        per_case = probability[:, :, None] * log_derivative
    weight = probability[:, :, None] if kind != "marginal" else np.ones_like(per_case)
    aggregate = (weight * per_case).sum(axis=0) / weight.sum(axis=0)
    average = per_case.mean(axis=0)
    effects = effects_rows(mode_canada_parquet, full, variable, kind)
    assert len(effects) == 16 and all(row["n_cases"] == 2779 for row in effects)
    np.testing.assert_allclose(as_matrix(effects, "aggregate", labels), aggregate, rtol=1e-9)
    np.testing.assert_allclose(as_matrix(effects, "average", labels), average, rtol=1e-9)
    assert [row["own"] for row in effects] == [j == i for j in range(4) for i in range(4)]


def test_effect_errors_agree_with_a_parametric_bootstrap(mode_canada_models, mode_canada_parquet):
    """2,000 draws from the saved covariance, the cost elasticities (closed form) in each:
    their standard deviation is the delta-method error to within 10%."""
    from choicecli.loader import load_result
    from choicecli.predict import spec_from_result
    from choicecli.problem import build_problem

    _, full = mode_canada_models
    result = load_result(full)
    frame = pl.read_parquet(mode_canada_parquet)
    problem = build_problem(frame, spec_from_result(result, {}), "mc",
                            item_labels=result.labels["items"])  # fmt: skip
    assert parameter_keys(result) == [
        (p.level, p.term, p.feature, p.item, p.user) for p in problem.parameters
    ]
    model = problem.model(torch.device("cpu"))
    data = problem.data
    cost = data.columns["cost"].reshape(-1, 4)  # (N, J) rows sorted by case, then alternative
    beta_index = parameter_keys(result).index(("item", "cost[constant]", "cost", None, None))
    draws = torch.nan_to_num(bootstrap_draws(result), nan=0.0)  # (D, P)
    own_average, own_aggregate = [], []
    for theta in draws:  # 2,000 evaluations of the model, each over all cases at once
        probability = model.row_log_probabilities(theta).exp().reshape(-1, 4)  # (N, J)
        own = theta[beta_index] * cost * (1 - probability)  # (N, J)
        own_average.append(own.mean(dim=0))
        own_aggregate.append((probability * own).sum(dim=0) / probability.sum(dim=0))
    spread = {"average": torch.stack(own_average).std(dim=0),
              "aggregate": torch.stack(own_aggregate).std(dim=0)}  # fmt: skip
    labels = [str(label) for label in result.labels["items"]]
    effects = [r for r in effects_rows(mode_canada_parquet, full, "cost") if r["own"]]
    for row in effects:
        for name in ("average", "aggregate"):
            expected = float(spread[name][labels.index(row["item"])])
            assert row[f"{name}_std_error"] == pytest.approx(expected, rel=0.10), (row, name)


@pytest.fixture(scope="module")
def hc_nested(tmp_path_factory):
    from conftest import HC_FORMULA, reference_file

    model = tmp_path_factory.mktemp("hc") / "model"
    data = reference_file("HC.csv")
    fit(data, model, HC_FORMULA, *HC_ROLES, "--nests", HC_NESTS)
    return data, model


def test_nested_logit_effects_equal_finite_differences(hc_nested):
    from choicecli.io import read_table
    from choicecli.loader import load_result
    from choicecli.predict import predict_frame

    data, model = hc_nested
    result = load_result(model)
    frame, _ = read_table(str(data))  # as choice reads it (HC.csv pads its numbers)
    labels = [str(label) for label in result.labels["items"]]
    effects = effects_rows(data, model, "ich")
    step = 1e-6

    def shifted_probabilities(item: str, factor: float) -> np.ndarray:
        changed = frame.with_columns(
            pl.when(pl.col("idx.id2") == item).then(pl.col("ich") * factor)
            .otherwise(pl.col("ich")).alias("ich")
        )  # fmt: skip
        scored, _ = predict_frame(result, changed, where="HC.csv")
        return scored.sort("idx.id1", "idx.id2")["probability"].to_numpy()

    items = frame.sort("idx.id1", "idx.id2")["idx.id2"].to_numpy()
    aggregate = np.zeros((7, 7))
    average = np.zeros((7, 7))
    for i, label in enumerate(labels):
        up, down = shifted_probabilities(label, 1 + step), shifted_probabilities(label, 1 - step)
        for j, other in enumerate(labels):
            mine = items == other
            middle = (up[mine] + down[mine]) / 2
            aggregate[j, i] = (up[mine].sum() - down[mine].sum()) / (2 * step * middle.sum())
            average[j, i] = np.mean((np.log(up[mine]) - np.log(down[mine])) / (2 * step))
    np.testing.assert_allclose(as_matrix(effects, "aggregate", labels), aggregate, rtol=1e-5,
                               atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(as_matrix(effects, "average", labels), average, rtol=1e-5,
                               atol=1e-9)  # fmt: skip
    # within a nest, cross effects differ from those across nests (equal under IIA)
    matrix = as_matrix(effects, "average", labels)
    gcc = labels.index("gcc")
    same_nest, other_nest = matrix[labels.index("ecc"), gcc], matrix[labels.index("gc"), gcc]
    assert abs(same_nest - other_nest) > 0.05 * abs(other_nest)
    assert all(row["average_std_error"] > 0 for row in effects)


def test_effects_respect_case_weights(tmp_path):
    """Integer weights give what copying each case that many times gives."""
    frame = long_table(60).with_columns(((pl.col("case") % 3) + 1).cast(pl.Float64).alias("w"))
    weighted = tmp_path / "weighted.parquet"
    frame.write_parquet(weighted)
    fit(weighted, tmp_path / "m", "(price|constant) + (1|item)", "--weights", "w")
    repeat = np.repeat(np.arange(frame.height), frame["w"].cast(pl.Int64).to_numpy())
    copies = (
        frame[repeat]
        .with_columns(
            (pl.col("case") * 10 + pl.int_range(pl.len()).over("case", "item")).alias("case")
        )
        .drop("w")
    )
    copied = tmp_path / "copies.parquet"
    copies.write_parquet(copied)
    assert copies.height == int(frame["w"].sum())
    for kind in ("elasticity", "marginal"):
        one, other = (
            effects_rows(weighted, tmp_path / "m", "price", kind),
            effects_rows(copied, tmp_path / "m", "price", kind),
        )
        for a, b in zip(one, other, strict=True):
            assert a["aggregate"] == pytest.approx(b["aggregate"], rel=1e-10)
            assert a["average"] == pytest.approx(b["average"], rel=1e-10)


def test_effects_through_the_cli(mode_canada_models, mode_canada_parquet, hc_nested, tmp_path):
    _, full = mode_canada_models
    target = tmp_path / "effects.parquet"
    completed = subprocess.run(
        [str(CHOICE_EXECUTABLE), "effects", str(mode_canada_parquet), "--variable", "cost",
         "-m", str(full), "-o", str(target)],
        capture_output=True, text=True, env=subprocess_env(), timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "" and completed.stderr.startswith("Note: aggregate")
    assert pl.read_parquet(target).height == 16
    shown = invoke("effects", mode_canada_parquet, "--variable", "cost", "-m", full,
                   "--format", "table")  # fmt: skip
    for text in ("aggregate: effect on the predicted share", "average over cases", "train"):
        assert text in shown.stdout
    one_error_line(invoke("effects", mode_canada_parquet, "--variable", "costs", "-m", full), 1,
                   "costs", "cost, freq")  # fmt: skip
    one_error_line(invoke("effects", tmp_path / "none.parquet", "--variable", "cost", "-m", full),
                   1, "none.parquet")  # fmt: skip
    data, _ = hc_nested
    from conftest import HC_FORMULA

    fit(data, tmp_path / "upper", HC_FORMULA, *HC_ROLES, "--nests", HC_NESTS, "--nest-formula",
        "(income|item)")  # fmt: skip
    one_error_line(invoke("effects", data, "--variable", "income", "-m", tmp_path / "upper"), 1,
                   "nest formula")  # fmt: skip
    assert invoke("effects", data, "--variable", "ich", "--kind", "odd", "-m", full).exit_code == 2


def test_effects_with_a_coefficient_per_user_and_varying_choice_sets(transport_fit):
    """Own elasticities beta_u x (1 - P) where the cost coefficient is each user's own and
    cases offer different alternatives; the delta method is not offered there."""
    model, _ = transport_fit
    data = SAMPLE_DATA / "transport.parquet"
    scored = invoke("predict", data, "-m", model, "--format", "csv")
    frame = pl.read_csv(scored.stdout.encode()).join(
        pl.read_parquet(data).select("case_id", "mode", "cost"), on=["case_id", "mode"]
    )
    users = pl.read_parquet(model / "coefficients.parquet").filter(pl.col("term") == "cost[user]")
    frame = frame.join(
        users.select(pl.col("user").alias("user_id"), pl.col("estimate").alias("beta")),
        on=pl.col("user_id").cast(pl.String),
    ).with_columns((pl.col("beta") * pl.col("cost") * (1 - pl.col("probability"))).alias("own"))
    expected = frame.group_by("mode").agg(
        pl.col("own").mean().alias("average"),
        ((pl.col("probability") * pl.col("own")).sum() / pl.col("probability").sum()).alias(
            "aggregate"
        ),
        pl.len().alias("n_cases"),
    )
    result = invoke("effects", data, "--variable", "cost", "-m", model, "--format", "json")
    assert result.exit_code == 0, result.stderr
    own = {row["item"]: row for row in json.loads(result.stdout) if row["own"]}
    for row in expected.iter_rows(named=True):
        assert own[row["mode"]]["average"] == pytest.approx(row["average"], rel=1e-9)
        assert own[row["mode"]]["aggregate"] == pytest.approx(row["aggregate"], rel=1e-9)
        assert own[row["mode"]]["n_cases"] == row["n_cases"]
        assert own[row["mode"]]["average_std_error"] is None
    assert "varies by user" in result.stderr


def test_effects_standard_errors_can_be_skipped(
    mode_canada_models, mode_canada_parquet, monkeypatch
):
    _, full = mode_canada_models
    common = ["effects", mode_canada_parquet, "--variable", "cost", "-m", full, "--format", "json"]
    skipped = invoke(*common, "--no-std-errors")
    assert skipped.exit_code == 0 and "no standard errors" not in skipped.stderr
    rows = json.loads(skipped.stdout)
    assert all(row["aggregate_std_error"] is None for row in rows)
    monkeypatch.setattr("choicecli.effects.MAX_ROW_PASSES", 1000)  # as on a large table
    budget = invoke(*common)
    assert "32 second-order gradient passes over 11,116 rows" in budget.stderr
    assert all(row["average_std_error"] is None for row in json.loads(budget.stdout))
    forced = json.loads(invoke(*common, "--std-errors").stdout)
    assert all(row["average_std_error"] > 0 for row in forced)
    assert [row["average"] for row in forced] == [row["average"] for row in rows]


def test_effects_by_segment_equal_effects_on_each_segment(
    mode_canada_models, mode_canada_parquet, tmp_path
):
    _, full = mode_canada_models
    result = invoke("effects", mode_canada_parquet, "--variable", "cost", "-m", full, "--by",
                    "urban", "--no-std-errors", "--format", "json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    frame = pl.read_parquet(mode_canada_parquet)
    segments = sorted(frame["urban"].unique().to_list())
    assert [row["urban"] for row in rows] == [s for s in segments for _ in range(16)]
    for segment in segments:
        part = tmp_path / f"urban_{segment}.parquet"
        frame.filter(pl.col("urban") == segment).write_parquet(part)
        alone = effects_rows(part, full, "cost", "elasticity", "--no-std-errors")
        mine = [row for row in rows if row["urban"] == segment]
        for a, b in zip(mine, alone, strict=True):
            assert (a["item"], a["changed"], a["n_cases"]) == (
                b["item"],
                b["changed"],
                b["n_cases"],
            )
            assert a["aggregate"] == pytest.approx(b["aggregate"], rel=1e-10)
            assert a["average"] == pytest.approx(b["average"], rel=1e-10)
    shown = invoke("effects", mode_canada_parquet, "--variable", "cost", "-m", full, "--by",
                   "urban", "--no-std-errors", "--format", "table")  # fmt: skip
    assert "urban = 0" in shown.stdout and "urban = 1" in shown.stdout
    one_error_line(invoke("effects", mode_canada_parquet, "--variable", "cost", "-m", full,
                          "--by", "urbn"), 1, "did you mean 'urban'")  # fmt: skip
    one_error_line(invoke("effects", mode_canada_parquet, "--variable", "cost", "-m", full,
                          "--by", "ivt"), 1, "changes within case")  # fmt: skip
