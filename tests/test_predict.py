"""choice predict: probabilities on training data, counterfactuals, formats, errors."""

from __future__ import annotations

import json

import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from choicecli.cli import app
from conftest import HC_FORMULA, MODE_CANADA_FORMULA, SAMPLE_DATA, reference_file

MC_ROLES = ["--case", "case", "--item", "alt", "--choice", "choice"]


def invoke(*arguments: str):
    return CliRunner().invoke(app, list(arguments))


@pytest.fixture(scope="module")
def mode_canada_model(mode_canada_parquet, tmp_path_factory):
    model = tmp_path_factory.mktemp("mcpred") / "model"
    fitted = invoke("fit", str(mode_canada_parquet), "--formula", MODE_CANADA_FORMULA,
                    *MC_ROLES, "-m", str(model))  # fmt: skip
    assert fitted.exit_code == 0, fitted.stderr
    return model


def fitted_log_likelihood(model) -> float:
    return json.loads((model / "model.json").read_text())["fit"]["log_likelihood"]


def check_training_predictions(scored: pl.DataFrame, model, case: str, choice: str) -> None:
    sums = scored.group_by(case).agg(pl.col("probability").sum())
    assert (sums.get_column("probability") - 1).abs().max() < 1e-12
    chosen = scored.filter(pl.col(choice).cast(pl.Int64) == 1)
    log_likelihood = chosen.get_column("probability").log().sum()
    assert log_likelihood == pytest.approx(fitted_log_likelihood(model), abs=1e-8)
    assert scored.group_by(case).agg(pl.col("predicted").sum()).get_column("predicted").max() == 1


def test_training_data_probabilities_reproduce_the_fit(mode_canada_model, mode_canada_parquet,
                                                       tmp_path):  # fmt: skip
    out = tmp_path / "scores.parquet"
    result = invoke("predict", str(mode_canada_parquet), "-m", str(mode_canada_model),
                    "-o", str(out))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    scored = pl.read_parquet(out)
    original = pl.read_parquet(mode_canada_parquet)
    assert scored.height == original.height
    assert scored.get_column("alt").to_list() == original.get_column("alt").to_list()  # order
    assert scored.columns == ["case", "alt", "choice", "utility", "probability", "predicted"]
    check_training_predictions(scored, mode_canada_model, "case", "choice")
    assert "hit rate" in result.stderr and "log-likelihood -1874.3427" in result.stderr
    metadata = pq.read_schema(out).metadata
    for key in (b"choice.model", b"choice.formula", b"choice.input_sha256", b"choice.versions"):
        assert key in metadata


def test_nested_training_data_probabilities_reproduce_the_fit(tmp_path):
    data = str(reference_file("HC.csv"))
    model = tmp_path / "m"
    fitted = invoke("fit", data, "--formula", HC_FORMULA, "--case", "idx.id1", "--item",
                    "idx.id2", "--choice", "depvar", "--nests",
                    "cooling=gcc,ecc,erc,hpc;other=gc,ec,er", "-m", str(model))  # fmt: skip
    assert fitted.exit_code == 0, fitted.stderr
    out = tmp_path / "scores.csv"
    assert invoke("predict", data, "-m", str(model), "-o", str(out)).exit_code == 0
    scored = pl.read_csv(out)
    check_training_predictions(scored, model, "idx.id1", "depvar")


def test_counterfactual_air_cost_up_moves_shares(mode_canada_model, mode_canada_parquet,
                                                  tmp_path):  # fmt: skip
    base = invoke("predict", str(mode_canada_parquet), "-m", str(mode_canada_model), "--shares")
    changed = pl.read_parquet(mode_canada_parquet).with_columns(
        pl.when(pl.col("alt") == "air").then(pl.col("cost") * 1.1).otherwise(pl.col("cost"))
        .alias("cost")
    )  # fmt: skip
    path = tmp_path / "expensive_air.parquet"
    changed.write_parquet(path)
    after = invoke("predict", str(path), "-m", str(mode_canada_model), "--shares")
    before_shares = dict(pl.read_csv(base.stdout.encode()).select("item", "predicted_share").rows())
    after_shares = dict(pl.read_csv(after.stdout.encode()).select("item", "predicted_share").rows())
    assert after_shares["air"] < before_shares["air"]
    for other in ("bus", "car", "train"):
        assert after_shares[other] > before_shares[other]


def test_shares_by_segment_and_json_report(mode_canada_model, mode_canada_parquet, tmp_path):
    by = invoke("predict", str(mode_canada_parquet), "-m", str(mode_canada_model), "--shares",
                "--by", "urban")  # fmt: skip
    table = pl.read_csv(by.stdout.encode())
    assert table.columns == ["urban", "item", "predicted_share", "observed_share"]
    sums = table.group_by("urban").agg(pl.col("predicted_share").sum())
    assert (sums.get_column("predicted_share") - 1).abs().max() < 1e-12
    out = tmp_path / "scores.json"
    assert invoke("predict", str(mode_canada_parquet), "-m", str(mode_canada_model),
                  "-o", str(out)).exit_code == 0  # fmt: skip
    document = json.loads(out.read_text())
    assert document["report"]["log_likelihood"] == pytest.approx(-1874.3427, abs=1e-3)
    assert len(document["rows"]) == 11116


def test_predict_without_choice_column_writes_no_report(mode_canada_model, mode_canada_parquet,
                                                         tmp_path):  # fmt: skip
    path = tmp_path / "new.csv"
    pl.read_parquet(mode_canada_parquet).drop("choice").head(40).write_csv(path)
    result = invoke("predict", str(path), "-m", str(mode_canada_model))
    assert result.exit_code == 0
    assert "hit rate" not in result.stderr
    scored = pl.read_csv(result.stdout.encode())
    assert scored.columns == ["case", "alt", "utility", "probability", "predicted"]


def test_unseen_alternative_is_an_error(mode_canada_model, mode_canada_parquet, tmp_path):
    path = tmp_path / "new.parquet"
    frame = pl.read_parquet(mode_canada_parquet).head(8)
    frame.with_columns(pl.col("alt").replace("bus", "plane")).write_parquet(path)
    result = invoke("predict", str(path), "-m", str(mode_canada_model), "-o",
                    str(tmp_path / "out.csv"))  # fmt: skip
    if "plane" not in frame.with_columns(pl.col("alt").replace("bus", "plane"))["alt"]:
        pytest.skip("the head has no bus rows")
    assert result.exit_code == 1
    assert "'plane'" in result.stderr and "not seen when the model was fitted" in result.stderr
    assert not (tmp_path / "out.csv").exists()


def test_missing_column_and_wrong_type_are_errors(mode_canada_model, mode_canada_parquet,
                                                  tmp_path):  # fmt: skip
    frame = pl.read_parquet(mode_canada_parquet).head(40)
    frame.drop("ivt").write_parquet(tmp_path / "no_ivt.parquet")
    missing = invoke("predict", str(tmp_path / "no_ivt.parquet"), "-m", str(mode_canada_model))
    assert missing.exit_code == 1 and "'ivt'" in missing.stderr
    frame.with_columns(pl.col("cost").cast(pl.String) + "$").write_parquet(tmp_path / "t.parquet")
    wrong = invoke("predict", str(tmp_path / "t.parquet"), "-m", str(mode_canada_model))
    assert wrong.exit_code == 1 and "'cost'" in wrong.stderr and "non-numeric" in wrong.stderr


def test_unseen_users_error_or_zero(tmp_path):
    roles = ["--case", "case_id", "--item", "mode", "--choice", "chosen", "--user", "user_id"]
    model = tmp_path / "m"
    formula = "(time|constant) + (1|item) + (cost|user)"
    data = str(SAMPLE_DATA / "transport.parquet")
    fitted = invoke("fit", data, "--formula", formula, *roles, "-m", str(model))
    assert fitted.exit_code == 0, fitted.stderr
    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet").filter(pl.col("case_id") <= 6)
    frame.with_columns(pl.lit("newcomer").alias("user_id")).write_parquet(tmp_path / "n.parquet")
    refused = invoke("predict", str(tmp_path / "n.parquet"), "-m", str(model))
    assert refused.exit_code == 1 and "'newcomer'" in refused.stderr
    zero = invoke("predict", str(tmp_path / "n.parquet"), "-m", str(model), "--unseen", "zero")
    assert zero.exit_code == 0, zero.stderr
    scored = pl.read_csv(zero.stdout.encode())
    assert scored.height == frame.height
    assert scored.get_column("probability").is_finite().all()


def test_small_batches_of_a_parquet_file_give_the_same_scores(
    mode_canada_model, mode_canada_parquet, tmp_path
):
    shuffled = tmp_path / "shuffled.parquet"
    pl.read_parquet(mode_canada_parquet).sample(fraction=1.0, shuffle=True, seed=3).write_parquet(
        shuffled
    )
    whole, batched = tmp_path / "whole.parquet", tmp_path / "batched.parquet"
    assert invoke("predict", str(shuffled), "-m", str(mode_canada_model), "-o", str(whole),
                  "--quiet").exit_code == 0  # fmt: skip
    assert invoke("predict", str(shuffled), "-m", str(mode_canada_model), "-o", str(batched),
                  "--batch-cases", "97").exit_code == 0  # fmt: skip
    assert pl.read_parquet(whole).equals(pl.read_parquet(batched))
    order = pl.read_parquet(shuffled).select("case", "alt")
    assert pl.read_parquet(batched).select("case", "alt").equals(order)
