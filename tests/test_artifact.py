"""The model directory and every output file: atomic writes, and loading that never runs code.

A model directory is model.json (with a schema version), params.safetensors and
coefficients.parquet. Loading a directory that is missing, truncated, edited, written by a newer
version, or whose parameter file was swapped (for a pickle, or another model's) is one clear
error line and exit code 1, from every command that reads it. Outputs (Parquet, CSV, JSON, PNG)
are written through a temporary file: a write that fails or is interrupted leaves the previous
file as it was and no temporary behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import pathlib
import pickle
import shutil
import struct
from pathlib import Path

import polars as pl
import pytest
import torch
from reliability_helpers import (
    FORMULA,
    error_line,
    fit,
    invoke,
    listing,
    long_table,
    model_document,
    snapshot,
    write,
)
from safetensors.torch import load_file, save_file

from choicecli.errors import ArtifactError
from choicecli.loader import load_result
from choicecli.results import SCHEMA_VERSION

READERS = ["coef", "predict", "plot"]


def product_bug(reason: str):
    return pytest.mark.xfail(reason=f"product bug: {reason}", strict=True)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """One fitted model (and its data), copied by each test that alters it."""
    root = tmp_path_factory.mktemp("fitted")
    data = write(long_table(), root / "data.csv")
    model = root / "model"
    result = fit(data, model)
    assert result.exit_code == 0, result.stderr
    return data, model


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, fitted) -> Path:
    """A model of the same data with a different formula (fewer parameters)."""
    data, _ = fitted
    model = tmp_path_factory.mktemp("other") / "model"
    assert fit(data, model, formula="(price|constant)").exit_code == 0
    return model


@pytest.fixture
def model(tmp_path, fitted) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(fitted[1], copy)
    return copy


@pytest.fixture
def data(fitted) -> Path:
    return fitted[0]


def read_with(command: str, model: Path, data: Path, tmp_path: Path):
    """Run one reading command against `model`; outputs go to tmp_path/out.*."""
    if command == "coef":
        return invoke("coef", "--model", model, "--format", "csv")
    if command == "predict":
        return invoke("predict", data, "--model", model, "-o", tmp_path / "out.csv")
    return invoke("plot", "--model", model, "-o", tmp_path / "out.png")


def assert_refused(command, model, data, tmp_path, *needles) -> str:
    before = listing(tmp_path)
    result = read_with(command, model, data, tmp_path)
    line = error_line(result, *needles, strip=tmp_path)
    assert listing(tmp_path) == before, "a refused model must not produce any output"
    return line


def edit_document(model: Path, edit) -> None:
    path = model / "model.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


# --------------------------------------------------------------------------------------------
# What a fit writes
# --------------------------------------------------------------------------------------------


def test_model_directory_is_json_safetensors_and_parquet_with_a_schema_version(model):
    assert sorted(p.name for p in model.iterdir()) == [
        "coefficients.parquet",
        "model.json",
        "params.safetensors",
    ]
    document = model_document(model)
    assert document["schema_version"] == SCHEMA_VERSION and isinstance(SCHEMA_VERSION, int)
    raw = (model / "params.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 length, JSON header
    header = json.loads(raw[8 : 8 + header_length])
    assert {"estimate", "std_error", "covariance"} <= set(header)
    for path in model.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), f"{path.name} looks like a pickle"
    assert (model / "coefficients.parquet").read_bytes()[:4] == b"PAR1"


def test_loading_never_unpickles(model, data, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("loading a model must not unpickle anything")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    result = load_result(model)
    assert len(result.parameters) == 4
    for command in READERS:
        outcome = read_with(command, model, data, tmp_path)
        assert outcome.exit_code == 0, (command, outcome.stderr)


# --------------------------------------------------------------------------------------------
# A parameter file replaced by a pickle (or torch.save output) is refused, never executed.
# --------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this touches `marker`: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("command", READERS)
def test_parameter_file_replaced_by_a_pickle_is_refused(model, data, tmp_path, command):
    marker = tmp_path.parent / f"{tmp_path.name}-unpickled"
    payload = pickle.dumps({"estimate": _Trap(marker), "std_error": _Trap(marker)})
    pickle.loads(payload)  # the trap is live: unpickling it does touch the marker
    assert marker.exists()
    marker.unlink()
    (model / "params.safetensors").write_bytes(payload)
    assert_refused(command, model, data, tmp_path, "params.safetensors")
    assert not marker.exists(), "the parameter file was unpickled"
    with pytest.raises(ArtifactError):
        load_result(model)
    assert not marker.exists()


def test_parameter_file_written_by_torch_save_is_refused(model, data, tmp_path):
    torch.save({"estimate": torch.zeros(4)}, model / "params.safetensors")
    assert_refused("predict", model, data, tmp_path, "params.safetensors")


# --------------------------------------------------------------------------------------------
# Missing, truncated, edited, newer, mismatched.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", READERS)
def test_missing_model_directory_is_one_line(tmp_path, data, command):
    assert_refused(command, tmp_path / "nowhere", data, tmp_path, "no model", "choice fit")


@pytest.mark.parametrize("command", READERS)
def test_model_from_a_newer_version_is_refused(model, data, tmp_path, command):
    edit_document(model, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    assert_refused(command, model, data, tmp_path, "model.json", "newer", "upgrade")


def test_model_json_without_schema_version_is_refused(model, data, tmp_path):
    edit_document(model, lambda d: d.pop("schema_version"))
    assert_refused("coef", model, data, tmp_path, "model.json", "schema_version")


def test_model_json_with_a_non_integer_schema_version_is_called_edited(model, data, tmp_path):
    edit_document(model, lambda d: d.update(schema_version="1"))
    line = assert_refused("coef", model, data, tmp_path, "model.json", "schema_version")
    assert "newer" not in line


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        pytest.param(lambda m: _truncate(m / "model.json"), "model.json", id="truncated-json"),
        pytest.param(
            lambda m: (m / "model.json").write_bytes(b"\xff\xfe\x00\x01"), "model.json", id="binary"
        ),
        pytest.param(lambda m: (m / "model.json").write_text("[1, 2]"), "model.json", id="list"),
        pytest.param(lambda m: (m / "model.json").write_text(""), "model.json", id="empty-json"),
        pytest.param(
            lambda m: _truncate(m / "params.safetensors"), "params.safetensors", id="truncated"
        ),
        pytest.param(
            lambda m: (m / "params.safetensors").write_bytes(b""), "params.safetensors", id="empty"
        ),
        pytest.param(
            lambda m: (m / "params.safetensors").unlink(), "params.safetensors", id="missing"
        ),
        pytest.param(
            lambda m: _replace_by_directory(m / "params.safetensors"),
            "params.safetensors",
            id="params-is-a-directory",
        ),  # fmt: skip
    ],
)
@pytest.mark.parametrize("command", READERS)
def test_damaged_model_is_one_line_from_every_reader(
    model, data, tmp_path, command, damage, needle
):
    damage(model)
    assert_refused(command, model, data, tmp_path, needle)


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize("command", ["coef", "plot"])
@pytest.mark.parametrize("how", ["truncated", "other-model"])
def test_damaged_coefficient_table_is_refused(model, data, tmp_path, other_model, command, how):
    target = model / "coefficients.parquet"
    if how == "truncated":
        _truncate(target)
    else:
        shutil.copy(other_model / "coefficients.parquet", target)
    assert_refused(command, model, data, tmp_path, "coefficients.parquet")


@pytest.mark.parametrize("command", READERS)
def test_parameter_file_of_another_model_is_refused(model, data, tmp_path, other_model, command):
    shutil.copy(other_model / "params.safetensors", model / "params.safetensors")
    assert_refused(command, model, data, tmp_path, "params.safetensors", "model.json")


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d["parameters"].pop(), id="parameter-removed"),
        pytest.param(lambda d: d["parameters"][0].update(bogus=1), id="unknown-key"),
        pytest.param(lambda d: d["parameters"][0].pop("term"), id="key-removed"),
        pytest.param(lambda d: d.pop("fit"), id="fit-removed"),
    ],
)
def test_edited_parameter_list_is_refused(model, data, tmp_path, edit):
    edit_document(model, edit)
    line = assert_refused("predict", model, data, tmp_path)
    assert "model.json" in line or "params.safetensors" in line
    assert "internal error" not in line


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda d: d.update(spec=None), id="spec-null"),
        pytest.param(lambda d: d["spec"].pop("roles"), id="roles-removed"),
        pytest.param(lambda d: d["labels"].update(items="abc"), id="labels-not-a-list"),
    ],
)
def test_edited_spec_is_an_artifact_error(model, data, tmp_path, edit):
    edit_document(model, edit)
    line = assert_refused("predict", model, data, tmp_path, "model.json")
    assert "internal error" not in line


def test_parameters_that_do_not_match_the_spec_are_refused(model, data, tmp_path):
    edit_document(model, lambda d: d["spec"].update(formula="(price|constant)"))
    assert_refused("predict", model, data, tmp_path, "model.json")


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(
            lambda t: t.update(covariance=torch.zeros(7, 7, dtype=torch.float64)),
            id="covariance-shape",
        ),  # fmt: skip
        pytest.param(lambda t: t.update(estimated_index=torch.tensor([0, 5, 99])), id="index"),
    ],
)
def test_inconsistent_tensors_are_refused(model, data, tmp_path, edit):
    tensors = load_file(str(model / "params.safetensors"))
    edit(tensors)
    save_file(tensors, str(model / "params.safetensors"))
    assert_refused("predict", model, data, tmp_path, "params.safetensors")


@pytest.mark.parametrize("name", ["estimate", "covariance", "identified"])
def test_parameter_file_missing_a_tensor_is_refused(model, data, tmp_path, name):
    tensors = load_file(str(model / "params.safetensors"))
    tensors.pop(name)
    save_file(tensors, str(model / "params.safetensors"))
    line = assert_refused("predict", model, data, tmp_path, name)
    assert "internal error" not in line


def test_model_path_that_is_a_file_is_refused_and_left_alone(tmp_path, data):
    target = tmp_path / "model"
    target.write_text("not a directory\n")
    result = fit(data, target)
    error_line(result, "model", strip=tmp_path)
    assert target.read_text() == "not a directory\n"
    assert listing(tmp_path) == ["model"]


# --------------------------------------------------------------------------------------------
# Atomic outputs: a failed or interrupted write leaves the previous file and no temporary.
# --------------------------------------------------------------------------------------------


def _half_then_interrupt(where, payload: bytes) -> None:
    """Write `payload` (half a file) to a path or an open stream, then act as Ctrl-C."""
    if hasattr(where, "write"):
        where.write(payload)
    else:
        Path(where).write_bytes(payload)
    raise KeyboardInterrupt


def _interrupt_parquet(monkeypatch) -> None:
    import pyarrow.parquet as pq

    def half_then_interrupt(table, where, *args, **kwargs):
        _half_then_interrupt(where, b"PAR1 half a file")

    monkeypatch.setattr(pq, "write_table", half_then_interrupt)


def _interrupt_text(monkeypatch) -> None:
    """Ctrl-C once the whole text is in the temporary, before it is renamed into place."""
    import choicecli.output

    real = choicecli.output.atomic_file

    @contextlib.contextmanager
    def half_then_interrupt(path):
        with real(path) as temp:
            yield temp
            temp.write_bytes(temp.read_bytes()[: temp.stat().st_size // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(choicecli.output, "atomic_file", half_then_interrupt)


def _interrupt_png(monkeypatch) -> None:
    import matplotlib.figure

    def half_then_interrupt(self, where, *args, **kwargs):
        _half_then_interrupt(where, b"\x89PNG\r\n\x1a\n half")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_interrupt)


OUTPUTS = [
    pytest.param("predict", "out.parquet", _interrupt_parquet, id="predict-parquet"),
    pytest.param("predict", "out.csv", _interrupt_text, id="predict-csv"),
    pytest.param("predict", "out.json", _interrupt_text, id="predict-json"),
    pytest.param("coef", "coef.csv", _interrupt_text, id="coef-csv"),
    pytest.param("coef", "coef.json", _interrupt_text, id="coef-json"),
    pytest.param("coef", "coef.parquet", _interrupt_parquet, id="coef-parquet"),
    pytest.param("plot", "chart.png", _interrupt_png, id="plot-png"),
]


def _write_output(command: str, name: str, model: Path, data: Path, tmp_path: Path):
    target = tmp_path / name
    if command == "predict":
        return invoke("predict", data, "--model", model, "-o", target)
    if command == "coef":
        return invoke("coef", "--model", model, "-o", target)
    return invoke("plot", "--model", model, "-o", target)


@pytest.mark.parametrize(("command", "name", "interrupt"), OUTPUTS)
def test_interrupted_output_write_keeps_the_previous_file(
    model, data, tmp_path, monkeypatch, command, name, interrupt
):
    first = _write_output(command, name, model, data, tmp_path)
    assert first.exit_code == 0, first.stderr
    before = (tmp_path / name).read_bytes()
    entries = listing(tmp_path)
    with monkeypatch.context() as patch:
        interrupt(patch)
        result = _write_output(command, name, model, data, tmp_path)
    assert result.exit_code == 130, (result.stderr, result.exception)
    assert "Traceback" not in result.output
    assert (tmp_path / name).read_bytes() == before
    assert listing(tmp_path) == entries, "a temporary was left behind"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["predict", "{bad}", "-o", "{out}/scores.parquet"], "'price'", id="predict"),
        pytest.param(["coef", "nope[item]", "-o", "{out}/coef.csv"], "nope[item]", id="coef"),
        pytest.param(["plot", "nope[item]", "-o", "{out}/chart.png"], "nope[item]", id="plot"),
    ],
)
def test_failed_command_creates_no_output_file(model, tmp_path, args, needle):
    bad = tmp_path / "bad.csv"
    write(long_table().drop("price"), bad)
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(bad=bad, out=out) for a in args] + ["--model", str(model)]
    error_line(invoke(*argv), needle, strip=tmp_path)
    assert listing(out) == []


def _disk_full(monkeypatch) -> None:
    """The parameter file's write finds the disk full (model.json is already written)."""
    import choicecli.results

    real = choicecli.results._write_file

    def no_space(path, payload):
        if Path(path).name == "params.safetensors":
            Path(path).write_bytes(payload[: len(payload) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(choicecli.results, "_write_file", no_space)


def test_disk_full_while_saving_keeps_the_previous_model(model, data, monkeypatch):
    before = snapshot(model)
    _disk_full(monkeypatch)
    result = fit(data, model, formula="(price|constant)")
    error_line(result, "No space left on device")
    assert snapshot(model) == before
    assert listing(model.parent) == ["model"]


def test_disk_full_is_reported_as_a_write_error_not_an_internal_error(model, data, monkeypatch):
    _disk_full(monkeypatch)
    line = error_line(fit(data, model, formula=FORMULA), "No space left on device")
    assert "internal error" not in line and "report it" not in line
    assert str(model) in line


def test_written_tables_carry_the_spec_in_parquet_metadata(model):
    import pyarrow.parquet as pq

    metadata = pq.read_schema(model / "coefficients.parquet").metadata
    spec = json.loads(metadata[b"choice.spec"])
    assert spec["formula"] == FORMULA
    assert pl.read_parquet(model / "coefficients.parquet").height == 4
