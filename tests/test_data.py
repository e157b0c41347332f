"""The data is held once: what `choice fit` reads, copies and lets go (issue 7, item 6).

A sorted table's value columns become tensors without a copy; a fit that is handed the frame
empties it, keeps no row positions, and drops the problem's values and its case, alternative
and choice vectors once the model is built, having read what the fit reports from them; a
Parquet file is read for the columns the model uses only, each numeric one into one array.
No timings or RSS here: the memory itself is measured by `make bench` (scenario mem_10m).
"""

from __future__ import annotations

import gc
import weakref

import polars as pl
import pytest
import torch

from choicecli.data import Roles, _codes, load_choice_data
from choicecli.fit import FitOptions, fit_model
from choicecli.io import read_table
from choicecli.problem import ModelSpec, build_problem, table_columns

ROLES = Roles(case="case", item="item", choice="choice")
FORMULA = "(1|item) + (x|constant) + (z|item)"


def long_table(
    n_cases: int = 500, n_items: int = 6, seed: int = 0, left_out: float = 0.1
) -> pl.DataFrame:
    """A few thousand rows sorted by (case, item); about one alternative in ten left out."""
    generator = torch.Generator().manual_seed(seed)
    offered = torch.rand(n_cases, n_items, generator=generator) >= left_out
    offered[:, :2] = True  # at least two alternatives per case
    case, item = offered.nonzero().unbind(1)  # row-major: sorted by case, then item
    sizes = torch.bincount(case, minlength=n_cases)  # (N,)
    first = torch.cumsum(sizes, 0) - sizes  # (N,) each case's first row
    pick = (torch.rand(n_cases, generator=generator) * sizes).long()  # (N,) any offered row
    chosen = torch.zeros(case.shape[0], dtype=torch.int64)
    chosen[first + pick] = 1
    return pl.DataFrame(
        {
            "case": case.numpy(),
            "item": [f"alt{j}" for j in item.tolist()],
            "choice": chosen.numpy(),
            "x": torch.randn(case.shape[0], generator=generator, dtype=torch.float64).numpy(),
            "z": torch.randn(case.shape[0], generator=generator, dtype=torch.float64).numpy(),
            "unused": torch.zeros(case.shape[0], dtype=torch.float64).numpy(),
        }
    )


def test_a_sorted_table_becomes_tensors_without_a_copy_and_a_shuffled_one_is_sorted():
    frame = long_table()
    data = load_choice_data(frame, ROLES, ["x", "z"], where="t")
    for name in ("x", "z"):  # views of the frame's own memory
        assert data.columns[name].data_ptr() == frame.get_column(name).to_numpy().ctypes.data
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=3)
    again = load_choice_data(shuffled, ROLES, ["x", "z"], where="t")
    for name in ("x", "z"):
        assert torch.equal(again.columns[name], data.columns[name])
    assert torch.equal(again.case_index, data.case_index)
    assert torch.equal(again.item_index, data.item_index)
    rows = shuffled.get_column("x").to_numpy()[again.source_row.numpy()]
    assert torch.equal(torch.from_numpy(rows), data.columns["x"])


def test_a_consumed_frame_is_emptied_and_released_values_are_referenced_nowhere():
    frame = long_table()
    reference = build_problem(frame, ModelSpec(FORMULA, ROLES), "t")
    theta = torch.linspace(-0.5, 0.5, len(reference.parameters), dtype=torch.float64)
    expected = reference.model(torch.device("cpu")).log_likelihood(theta)

    handed = frame.clone()
    problem = build_problem(handed, ModelSpec(FORMULA, ROLES), "t", consume=True)
    assert handed.width == 0  # the caller's frame holds nothing any more
    assert problem.data.source_row is None  # no table is left to point into
    model = problem.model(torch.device("cpu"))
    values = [weakref.ref(v) for v in problem.data.columns.values()]
    values += [weakref.ref(b.x) for b in problem.item_blocks if not b.term.is_intercept]
    assert len(values) == 4
    problem.release_values()
    gc.collect()
    assert all(value() is None for value in values)  # only the model's copy is left
    assert problem.data.columns == {} and all(b.x is None for b in problem.item_blocks)
    assert torch.allclose(model.log_likelihood(theta), expected, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="released"):
        problem.model(torch.device("cpu"))


def test_a_fit_handed_its_frame_gives_the_same_result_and_still_names_constant_columns():
    frame = long_table().with_columns(  # constant within alternative: collinear with (1|item)
        pl.col("item").str.slice(3).cast(pl.Float64).alias("w")
    )
    spec = ModelSpec(FORMULA + " + (w|constant)", ROLES)
    kept, _ = fit_model(frame, spec, FitOptions(), where="t")
    handed = frame.clone()
    consumed, problem = fit_model(handed, spec, FitOptions(), where="t", consume=True)
    assert handed.width == 0 and problem.released and problem.data.columns == {}
    assert torch.equal(consumed.estimate.isnan(), kept.estimate.isnan())
    free = ~kept.estimate.isnan()
    assert torch.allclose(consumed.estimate[free], kept.estimate[free], rtol=1e-10, atol=1e-12)
    assert consumed.warnings == kept.warnings
    assert any("constant within each alternative" in w for w in consumed.warnings)


@pytest.mark.parametrize("left_out", [0.0, 0.1], ids=["full", "padded"])
def test_a_handed_over_fit_reports_what_a_kept_one_does(left_out):
    """Shares, null and market-share log-likelihoods, never-chosen alternatives and case
    weights are read before the model takes the rows over."""
    frame = long_table(left_out=left_out).with_columns(
        (pl.col("case") % 3 + 1).cast(pl.Float64).alias("weight"),
        _never_chosen("alt5"),
    )
    spec = ModelSpec(FORMULA, Roles(case="case", item="item", choice="choice", weights="weight"))
    kept, _ = fit_model(frame, spec, FitOptions(), where="t")
    consumed, problem = fit_model(frame.clone(), spec, FitOptions(), where="t", consume=True)
    assert problem.data.case_index is None and problem.data.chosen is None
    assert consumed.warnings == kept.warnings
    assert any("'alt5' is never chosen" in w for w in consumed.warnings)
    for key, value in kept.fit.items():
        if key not in ("seconds", "optimiser_seconds"):
            close = pytest.approx(value, rel=1e-9) if isinstance(value, float | dict) else value
            assert consumed.fit[key] == close, key
    assert (consumed.fit["shares_log_likelihood"] is None) == (left_out > 0)


def _never_chosen(label: str) -> pl.Expr:
    """The choice column with `label`'s choices moved to alt0 of the same case."""
    moved = ((pl.col("item") == label) & (pl.col("choice") == 1)).any().over("case")
    return (
        pl.when(pl.col("item") == label)
        .then(0)
        .when((pl.col("item") == "alt0") & moved)
        .then(1)
        .otherwise(pl.col("choice"))
        .alias("choice")
    )


def test_the_row_vectors_go_once_a_handed_over_model_is_built():
    problem = build_problem(long_table(), ModelSpec(FORMULA, ROLES), "t", consume=True)
    data = problem.data
    rows = [weakref.ref(v) for v in (data.case_index, data.item_index, data.chosen)]
    rows += [weakref.ref(b.code) for b in problem.item_blocks]  # (R,) group codes
    sizes, counts = data.alternatives_per_case().clone(), data.choices_per_alternative().clone()
    n_rows = data.n_rows
    model = problem.model(torch.device("cpu"), release=True)
    gc.collect()
    assert model.layout == "padded"  # the model keeps no (R,) case or alternative vector
    assert all(row() is None for row in rows)  # while the model is fitted, only it holds data
    assert data.case_index is None and data.item_index is None and data.chosen is None
    assert all(b.x is None and b.code is None for b in problem.item_blocks)
    assert data.n_rows == n_rows and torch.equal(data.alternatives_per_case(), sizes)
    assert torch.equal(data.choices_per_alternative(), counts)


@pytest.mark.parametrize(
    "values",
    [[3, 3, 5, 9, 9], [9, 3, 5, 3, 9], ["b", "a", "b", "c"], [2.5, float("nan"), -1.0, 2.5],
     [-2.0, 0.5, 0.5, 7.0], [True, False, True]],
    ids=["sorted-int", "int", "text", "nan", "sorted-float", "bool"],
)  # fmt: skip
@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("chunk_rows", [3, 1 << 20], ids=["slices", "whole"])
def test_codes_number_values_by_their_sorted_distinct_values(values, drop, chunk_rows, monkeypatch):
    monkeypatch.setattr("choicecli.data.CODE_CHUNK_ROWS", chunk_rows)  # text: looked up by slices
    series = pl.Series("c", values)
    table = pl.DataFrame([series, pl.Series("other", range(len(values)))])
    codes, labels = _codes(table, "c", drop)
    assert labels.equals(series.unique().sort(), check_names=False)
    assert codes.dtype == torch.int64
    assert codes.tolist() == (series.rank("dense") - 1).to_list()
    assert table.columns == (["other"] if drop else ["c", "other"])


def test_numeric_parquet_columns_are_read_whole_into_one_array_each(tmp_path):
    frame = pl.DataFrame(
        {
            "case": [1, 1, 2, 2, 3, 3, 4],
            "item": ["a", "b", "a", "b", "a", "b", "a"],
            "choice": pl.Series([1, 0, 0, 1, 1, 0, 1], dtype=pl.Int8),
            "x": [0.5, float("nan"), 1.5, -2.0, 3.0, 0.0, 1.0],
            "n": pl.Series([1, None, 3, 4, 5, 6, 7], dtype=pl.Int32),
            "u": pl.Series([1, 2, 3, 4, 5, 6, 7], dtype=pl.UInt16),
            "f": pl.Series([1, 2, 3, 4, 5, 6, 7], dtype=pl.Float32),
            "flag": [True, False, True, True, False, True, False],
        }
    )
    path = tmp_path / "t.parquet"
    frame.write_parquet(path, row_group_size=2)  # four row groups
    read, _ = read_table(str(path))
    assert read.equals(frame) and read.schema == frame.schema  # nulls, NaN and types kept
    for name in ("case", "choice", "x", "u", "f"):  # read into one array, not row-group pieces
        assert read.get_column(name).n_chunks() == 1
    picked, _ = read_table(str(path), select=lambda names: ["x", "item", "n"])
    assert picked.equals(frame.select("x", "item", "n"))


def test_a_parquet_file_is_read_for_the_used_columns_only(tmp_path):
    path = tmp_path / "t.parquet"
    long_table(n_cases=50).write_parquet(path)
    spec = ModelSpec(FORMULA, ROLES)
    frame, digest = read_table(str(path), select=lambda names: table_columns(spec, names))
    assert frame.columns == ["case", "item", "choice", "x", "z"]
    assert digest == read_table(str(path))[1]
    # a name that does not resolve keeps every column, so the error can list them
    typo = ModelSpec("(1|item) + (xx|constant)", ROLES)
    frame, _ = read_table(str(path), select=lambda names: table_columns(typo, names))
    assert "unused" in frame.columns


def test_weights_users_and_rows_stay_with_their_cases_when_single_alternative_cases_go():
    """load_choice_data in steps: shuffled rows, cases of one alternative dropped, and each
    kept case's weight, user, choice and input row still its own."""
    frame = long_table(n_cases=60, n_items=3)
    frame = frame.with_columns(
        weight=(pl.col("case") % 7 + 1).cast(pl.Float64),
        user=pl.format("u{}", pl.col("case") % 5),
    )
    single = frame.filter(pl.col("case") % 4 == 0).group_by("case").agg(pl.all().first())
    frame = pl.concat([frame.filter(pl.col("case") % 4 != 0), single.select(frame.columns)])
    frame = frame.with_columns(pl.when(pl.col("case") % 4 == 0).then(1).otherwise("choice")
                               .alias("choice"))  # fmt: skip
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=5)
    roles = Roles(case="case", item="item", choice="choice", user="user", weights="weight")
    data = load_choice_data(shuffled, roles, ["x"], where="t")
    assert data.n_cases == 45 and "dropped 15 cases with a single alternative" in data.warnings[0]
    cases = torch.tensor(data.case_labels.to_list())  # (N,)
    assert data.case_weights.tolist() == ((cases % 7) + 1).double().tolist()
    assert [data.user_labels[u] for u in data.user_of_case.tolist()] == [
        f"u{c % 5}" for c in cases.tolist()
    ]
    source = shuffled[data.source_row.numpy()]
    assert source.get_column("case").to_list() == cases[data.case_index].tolist()
    assert data.columns["x"].tolist() == source.get_column("x").to_list()
    assert data.chosen.tolist() == source.get_column("choice").cast(pl.Float64).to_list()
