"""Never destroy what is not ours: the model directory, -o destinations, one fit identity.

Through the real CLI (CliRunner in-process, and the installed `choice` in subprocesses), each
test states what is on disk before and after: foreign files in a model directory, the working
directory or a parent of the input as --model, -o to a symlink, a FIFO, a device or a model
file, files of two fits mixed, non-finite parameters, unbounded model files, two fits at once,
a reader during a swap, a full disk, and the mode of every model file.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import threading
import time
from dataclasses import fields
from pathlib import Path

import polars as pl
import pytest
from reliability_helpers import (
    CHOICE,
    FORMULA,
    error_line,
    fit,
    invoke,
    leftovers,
    listing,
    long_table,
    model_document,
    snapshot,
    subprocess_env,
    write,
)
from safetensors import safe_open
from safetensors.torch import save_file

from choicecli.data import Roles
from choicecli.loader import load_result
from choicecli.problem import ModelSpec
from choicecli.spec import spec_document, spec_from_document

READERS = ["coef", "predict", "plot"]
FILES = ["coefficients.parquet", "model.json", "params.safetensors"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The data, one fitted model, and a second fit of the same formula (same parameters)."""
    root = tmp_path_factory.mktemp("fitted")
    data = write(long_table(), root / "data.csv")
    model, twin = root / "model", root / "twin"
    for target in (model, twin):
        result = fit(data, target)
        assert result.exit_code == 0, result.stderr
    return data, model, twin


@pytest.fixture
def data(fitted) -> Path:
    return fitted[0]


@pytest.fixture
def model(tmp_path, fitted) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(fitted[1], copy)
    return copy


@pytest.fixture
def twin(fitted) -> Path:
    return fitted[2]


def run_reader(command: str, model: Path, data: Path, out: Path, *extra):
    if command == "coef":
        return invoke("coef", "--model", model, "--format", "csv", "-o", out / "c.csv", *extra)
    if command == "predict":
        return invoke("predict", data, "--model", model, "-o", out / "p.csv", *extra)
    return invoke("plot", "--model", model, "-o", out / "chart.png", *extra)


def assert_refused(command: str, model: Path, data: Path, tmp_path: Path, *needles) -> str:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    before = snapshot(model)
    line = error_line(run_reader(command, model, data, out), *needles, strip=tmp_path)
    assert listing(out) == [], "a refused model must not produce any output"
    assert snapshot(model) == before
    return line


def rewrite_tensors(model: Path, edit) -> None:
    """Change params.safetensors' tensors, keeping its metadata (and so its fit id)."""
    path = model / "params.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


# --------------------------------------------------------------------------------------------
# The model directory: a fit replaces only what is ours
# --------------------------------------------------------------------------------------------


def test_fit_into_a_directory_of_other_files_refuses_and_touches_nothing(tmp_path, data):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "notes.txt").write_text("notes\n")
    shutil.copy(data, project / "other.csv")
    before = snapshot(project)
    line = error_line(fit(data, project), "proj", "notes.txt", "other.csv", strip=tmp_path)
    assert "not a choice model directory" in line
    assert snapshot(project) == before
    assert listing(tmp_path) == ["proj"]  # no temporary beside it either


def test_choice_model_variable_gets_the_same_refusal(tmp_path, data):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "notes.txt").write_text("notes\n")
    result = invoke("fit", data, "--formula", FORMULA, "--device", "cpu",
                    env={"CHOICE_MODEL": str(project)})  # fmt: skip
    error_line(result, "proj", "notes.txt", strip=tmp_path)
    assert listing(project) == ["notes.txt"]


@pytest.mark.parametrize(
    "intruder",
    [
        pytest.param(lambda m: (m / "notes.txt").write_text("mine\n"), id="extra-file"),
        pytest.param(lambda m: (m / "runs").mkdir(), id="sub-directory"),
        pytest.param(lambda m: (m / "model.json").write_text('{"a": 1}'), id="foreign-json"),
        pytest.param(lambda m: (m / "model.json").unlink(), id="no-model-json"),
    ],
)
def test_a_model_directory_with_anything_else_in_it_is_refused(model, data, tmp_path, intruder):
    intruder(model)
    before = snapshot(model)
    entries = listing(model)
    error_line(fit(data, model), str(model.name), strip=tmp_path)
    assert snapshot(model) == before and listing(model) == entries
    assert leftovers(model) == []


def test_an_empty_directory_and_an_existing_model_are_replaced(tmp_path, model, data):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert fit(data, empty).exit_code == 0
    assert listing(empty) == FILES
    old_id = model_document(model)["fit_id"]
    assert fit(data, model, formula="(price|constant)").exit_code == 0
    assert model_document(model)["fit_id"] != old_id
    assert listing(model) == FILES and leftovers(model) == []


@pytest.mark.parametrize("name", [".", "", "..", "{cwd}"])
def test_the_working_directory_or_its_parent_is_never_a_model(tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    data = write(long_table(), work / "data.csv")
    (work / "notes.txt").write_text("notes\n")
    monkeypatch.chdir(work)
    before_work, before_root = snapshot(work), listing(tmp_path)
    target = name.format(cwd=work)
    line = error_line(fit(data, target), "working directory", code=2, strip=tmp_path)
    assert "--model" in line
    assert snapshot(work) == before_work and listing(work) == ["data.csv", "notes.txt"]
    assert listing(tmp_path) == before_root  # no ..XXXX.old beside it


@pytest.mark.parametrize("depth", ["data.csv", "raw/2026/data.csv"])
def test_a_directory_holding_the_input_is_never_a_model(tmp_path, depth):
    project = tmp_path / "proj"
    data = project / depth
    data.parent.mkdir(parents=True)
    write(long_table(), data)
    before = snapshot(project)
    error_line(fit(data, project), "holds the input file", code=2, strip=tmp_path)
    assert snapshot(project) == before


def test_a_symlinked_model_directory_is_replaced_where_it_points(tmp_path, model, data):
    link = tmp_path / "current"
    link.symlink_to(model, target_is_directory=True)
    old_id = model_document(model)["fit_id"]
    assert fit(data, link).exit_code == 0
    assert link.is_symlink() and link.resolve() == model.resolve()
    assert model_document(model)["fit_id"] != old_id
    assert listing(model) == FILES


# --------------------------------------------------------------------------------------------
# -o: replaced atomically when a regular file, written through otherwise, never into a model
# --------------------------------------------------------------------------------------------


def coef_csv(model: Path) -> str:
    result = invoke("coef", "--model", model, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    return result.stdout


def test_output_to_a_symlink_writes_its_target_and_keeps_the_link(tmp_path, model):
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    result = invoke("coef", "--model", model, "-o", link)
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == coef_csv(model)


def test_output_to_a_fifo_feeds_its_reader_and_leaves_a_fifo(tmp_path, model):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = invoke("coef", "--model", model, "--format", "csv", "-o", fifo)
    reader.join(timeout=60)
    assert result.exit_code == 0, result.stderr
    assert not reader.is_alive(), "the FIFO's reader never got an end of file"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received == [coef_csv(model).encode()]


def private_device(path: Path, minor: int) -> Path:
    """A character device of the memory driver (1, minor) of our own: 3 is null, 7 is full.
    The machine's /dev/null is never put at risk by a regression."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
        with path.open("wb") as handle:
            handle.write(b"")
    except OSError:
        pytest.skip("cannot make a device file here (not root, or a nodev mount)")
    return path


def test_output_to_a_device_writes_through_it(tmp_path, model):
    null = private_device(tmp_path / "null", 3)
    for command in (["coef", "--format", "csv"], ["plot"], ["coef", "--format", "parquet"]):
        result = invoke(*command, "--model", model, "-o", null)
        assert result.exit_code == 0, result.stderr
        assert stat.S_ISCHR(os.lstat(null).st_mode)
        assert listing(tmp_path) == ["model", "null"], "a temporary was left beside it"


def test_output_to_a_full_device_is_cannot_write(tmp_path, model):
    full = private_device(tmp_path / "full", 7)
    line = error_line(invoke("coef", "--model", model, "--format", "csv", "-o", full),
                      "cannot write", "No space left on device", strip=tmp_path)  # fmt: skip
    assert "full" in line
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_output_to_dev_stdout_goes_to_standard_output(tmp_path, model):
    captured = tmp_path / "captured.csv"
    with captured.open("wb") as handle:
        done = subprocess.run(
            [CHOICE, "coef", "--model", model, "--format", "csv", "-o", "/dev/stdout"],
            stdout=handle, stderr=subprocess.PIPE, env=subprocess_env(), timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert captured.read_text() == coef_csv(model)
    assert Path("/dev/stdout").is_symlink()


def test_replacing_a_regular_file_keeps_its_mode_and_leaves_no_temporary(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "c.csv"
    target.write_text("old\n")
    target.chmod(0o600)
    assert invoke("coef", "--model", model, "-o", target).exit_code == 0
    assert target.read_text() == coef_csv(model)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert listing(out) == ["c.csv"]


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("name", ["model.json", "notes.csv"])
def test_output_inside_a_model_directory_is_refused(model, data, tmp_path, command, name):
    before = snapshot(model)
    target = model / name
    if command == "coef":
        result = invoke("coef", "--model", model, "-o", target)
    elif command == "predict":
        result = invoke("predict", data, "--model", model, "-o", target)
    else:
        result = invoke("plot", "--model", model, "-o", target.with_suffix(".png"))
    error_line(result, "inside the model directory", strip=tmp_path)
    assert snapshot(model) == before and listing(model) == FILES


def test_output_that_is_a_directory_is_refused(model, tmp_path):
    error_line(invoke("coef", "--model", model, "-o", tmp_path), "is a directory", strip=tmp_path)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["coef", "-o", "{out}/c.csv", "--format", "parquet"], id="coef-csv-parquet"),
        pytest.param(["coef", "-o", "{out}/c.json", "--format", "csv"], id="coef-json-csv"),
        pytest.param(
            ["predict", "{data}", "-o", "{out}/p.parquet", "--format", "json"],
            id="predict-parquet-json",
        ),  # fmt: skip
        pytest.param(["plot", "-o", "{out}/chart.jpg"], id="plot-jpg"),
        pytest.param(["plot", "-o", "{out}/chart.txt"], id="plot-txt"),
    ],
)
def test_a_suffix_naming_another_format_is_a_usage_error(model, data, tmp_path, args):
    out = tmp_path / "out"
    out.mkdir()
    argv = [a.format(out=out, data=data) for a in args] + ["--model", str(model)]
    error_line(invoke(*argv), "-o", code=2, strip=tmp_path)
    assert listing(out) == []


@pytest.mark.parametrize(("suffix", "magic"), [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_plot_writes_svg_and_pdf_by_suffix_the_same_bytes_each_time(model, tmp_path, suffix, magic):
    first, second = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    for target in (first, second):
        result = invoke("plot", "--model", model, "-o", target)
        assert result.exit_code == 0, result.stderr
    assert first.read_bytes().startswith(magic)
    assert first.read_bytes() == second.read_bytes()


def test_plot_writes_png_by_default_suffix_and_format_agree(model, tmp_path):
    assert invoke("plot", "--model", model, "-o", tmp_path / "c.png").exit_code == 0
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


# --------------------------------------------------------------------------------------------
# One fit, one id: mixed, non-finite and legacy files are refused
# --------------------------------------------------------------------------------------------


def test_every_file_of_a_fit_carries_its_fit_id(model, twin):
    import pyarrow.parquet as pq

    fit_id = model_document(model)["fit_id"]
    assert len(fit_id) == 32 and int(fit_id, 16) >= 0
    with safe_open(str(model / "params.safetensors"), framework="pt") as handle:
        assert handle.metadata()["choice.fit_id"] == fit_id
    parquet = pq.read_schema(model / "coefficients.parquet").metadata
    assert parquet[b"choice.fit_id"] == fit_id.encode()
    assert model_document(twin)["fit_id"] != fit_id


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize("name", ["params.safetensors", "coefficients.parquet"])
def test_a_file_of_another_fit_is_refused(model, twin, data, tmp_path, command, name):
    assert len(model_document(twin)["parameters"]) == len(model_document(model)["parameters"])
    shutil.copy(twin / name, model / name)
    line = assert_refused(command, model, data, tmp_path, name)
    assert "do not belong together" in line


def test_coef_reads_the_estimates_from_the_parameter_file(model):
    rewrite_tensors(model, lambda t: t["estimate"].mul_(2.0))
    estimates = pl.read_csv(coef_csv(model).encode()).get_column("estimate").to_list()
    stored = pl.read_parquet(model / "coefficients.parquet").get_column("estimate").to_list()
    assert [e for e in estimates if e] == [2.0 * s for s in stored if s]


@pytest.mark.parametrize("command", READERS)
@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        pytest.param(lambda t: t["estimate"].__setitem__(1, float("inf")), "inf", id="inf"),
        pytest.param(lambda t: t["estimate"].__setitem__(1, float("nan")), "nan", id="nan"),
        pytest.param(
            lambda t: t["covariance"].__setitem__((0, 0), float("inf")),
            "covariance",
            id="covariance-inf",
        ),  # fmt: skip
        pytest.param(
            lambda t: t["std_error"].__setitem__(0, float("-inf")),
            "standard errors",
            id="std-error-inf",
        ),  # fmt: skip
    ],
)
def test_non_finite_parameters_are_refused(model, data, tmp_path, command, edit, needle):
    rewrite_tensors(model, edit)
    assert_refused(command, model, data, tmp_path, "params.safetensors", needle)


def test_a_not_estimated_parameter_may_be_nan(model, data, tmp_path):
    def unidentify(tensors):
        tensors["identified"][1] = 0
        tensors["estimate"][1] = float("nan")

    rewrite_tensors(model, unidentify)
    assert load_result(model).estimate[1].isnan()
    result = invoke("predict", data, "--model", model, "-o", tmp_path / "p.csv")
    assert result.exit_code == 0, result.stderr


def test_estimates_that_overflow_never_give_nan_probabilities(model, data, tmp_path):
    rewrite_tensors(model, lambda t: t["estimate"].__setitem__(0, 1e308))
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("predict", data, "--model", model, "-o", out / "p.csv")
    error_line(result, "finite utility", strip=tmp_path)
    assert listing(out) == []


def test_a_model_without_a_fit_id_is_refused_with_refit(model, data, tmp_path):
    path = model / "model.json"
    document = json.loads(path.read_text())
    document.pop("fit_id")
    path.write_text(json.dumps(document))
    assert_refused("coef", model, data, tmp_path, "model.json", "fit id", "refit")


# --------------------------------------------------------------------------------------------
# Bounded reads of the model files
# --------------------------------------------------------------------------------------------


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("make", [_fifo, _dev_zero], ids=["fifo", "dev-zero"])
def test_a_model_file_that_is_not_a_regular_file_is_one_line(model, data, tmp_path, name, make):
    make(model / name)
    for command in READERS:
        assert_refused(command, model, data, tmp_path, name, "regular file")


def test_an_oversized_model_json_is_refused_unread(model, data, tmp_path):
    with (model / "model.json").open("r+b") as handle:
        handle.truncate((64 << 20) + 1)  # sparse: nothing is written
    assert_refused("coef", model, data, tmp_path, "model.json", "bytes")


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        pytest.param("[" * 200_000 + "]" * 200_000, ["nested too deeply"], id="deep"),
        pytest.param('{"schema_version": 1, "fit": ' + "9" * 5000 + "}", ["damaged"], id="digits"),
    ],
)
def test_deeply_nested_or_huge_number_model_json_is_one_line(model, data, tmp_path, text, needles):
    (model / "model.json").write_text(text)
    assert_refused("coef", model, data, tmp_path, "model.json", *needles)


def test_an_infinite_lambda_in_model_json_is_refused(model, data, tmp_path):
    path = model / "model.json"
    path.write_text(path.read_text().replace('"lambda_init": 1.0', '"lambda_init": 1e999'))
    assert_refused("predict", model, data, tmp_path, "model.json", "lambda_init")


# --------------------------------------------------------------------------------------------
# Writing the model: modes, a full disk
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_every_model_file_gets_the_same_mode_under_the_umask(tmp_path, data, mask):
    previous = os.umask(mask)
    try:
        result = fit(data, tmp_path / "m")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.stderr
    modes = {name: stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) for name in FILES}
    assert set(modes.values()) == {0o666 & ~mask}, modes
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o777 & ~mask


def test_disk_full_while_writing_the_parameters_is_cannot_write(model, data, monkeypatch):
    import choicecli.results

    def no_space(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(choicecli.results, "_write_file", no_space)
    before = snapshot(model)
    line = error_line(fit(data, model, formula="(price|constant)"), "No space left on device")
    assert line.startswith(f"Error: cannot write {model}: ")
    assert snapshot(model) == before and leftovers(model) == []


def test_a_real_write_failure_while_saving_is_cannot_write(tmp_path, model):
    """The installed command with its files limited to 24 kB: model.json (about 18 kB for 60
    parameters) is written, the parameter file (a 60 x 60 covariance, 31 kB) fails for real."""
    before = snapshot(model)

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (24 << 10, 24 << 10))

    items = tuple(f"i{n:02d}" for n in range(60))
    wide = write(long_table(n_cases=400, items=items), tmp_path / "wide.csv")
    done = subprocess.run(
        [CHOICE, "fit", wide, "--formula", "(price|constant) + (1|item)", "--model", model,
         "--device", "cpu"],
        capture_output=True, text=True, env=subprocess_env(), preexec_fn=limit_files,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write {model}: "), lines
    assert "File too large" in lines[0]
    assert snapshot(model) == before and leftovers(model) == []


# --------------------------------------------------------------------------------------------
# Concurrency: two fits at once, a reader during a swap
# --------------------------------------------------------------------------------------------


def test_two_fits_into_one_model_at_once_leave_one_complete_model(tmp_path, model, data):
    formulas = ["(price|constant)", FORMULA, "(price|constant) + (1|item-full)"]
    runs = [
        subprocess.Popen(
            [CHOICE, "fit", data, "--formula", formula, "--model", model, "--device", "cpu"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )  # fmt: skip
        for formula in formulas
    ]
    outcomes = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for code, stderr in outcomes:
        assert code in (0, 1), stderr
        assert "internal error" not in stderr and "Safetensor" not in stderr, stderr
        if code:
            assert len(stderr.splitlines()) == 1 and stderr.startswith("Error: "), stderr
    assert any(code == 0 for code, _ in outcomes)
    assert listing(model) == FILES and leftovers(model) == []
    result = load_result(model)  # one fit's files: the loader checks the ids agree
    assert result.spec["formula"] in formulas


def _stopped_fit(data: Path, model: Path, stop_file: Path) -> subprocess.Popen:
    """A fit that stops between the two renames of its swap (the 'swap' stage) and says so."""
    env = {**subprocess_env(), "CHOICE_STOP_AT": "swap", "CHOICE_STOP_FILE": str(stop_file)}
    process = subprocess.Popen(
        [CHOICE, "fit", data, "--formula", "(price|constant)", "--model", model,
         "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not stop_file.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "the fit never reached its swap"
        time.sleep(0.05)
    return process


def test_a_reader_during_a_swap_moves_nothing_and_reads_the_previous_model(tmp_path, model, data):
    before = snapshot(model)
    expected = coef_csv(model)
    writer = _stopped_fit(data, model, tmp_path / "stopped")
    aside = listing(tmp_path)
    assert "model" not in aside and len(leftovers(model)) == 2  # old aside, new not yet in
    reader = subprocess.Popen(
        [CHOICE, "coef", "--model", model, "--format", "csv"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
    )  # fmt: skip
    writer.send_signal(signal.SIGKILL)  # the swap never finishes; its lock goes with it
    assert writer.wait(timeout=60) == -signal.SIGKILL
    stdout, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 0, stderr
    assert stdout == expected  # the previous model, read where the swap left it
    assert listing(tmp_path) == aside, "a reader moved a directory"

    assert fit(data, model, formula="(price|constant)").exit_code == 0  # repairs, then swaps
    assert leftovers(model) == [] and listing(model) == FILES
    assert snapshot(model) != before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_between_the_renames_waits_for_the_swap_to_finish(
    tmp_path, model, data, monkeypatch, sig
):
    """The signal lands between the two renames; it is acted on once the new model is in
    place and the old one removed: never a missing directory, never a leftover."""
    import choicecli.process

    def signal_here(stage: str) -> None:
        if stage == "swap":
            assert not model.exists()  # the old model is aside, the new one not yet in
            os.kill(os.getpid(), sig)

    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: caught.append(number))
    monkeypatch.setattr(choicecli.process, "reached", signal_here)
    try:
        result = fit(data, model, formula="(price|constant)")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if sig == signal.SIGINT:
        assert result.exit_code == 130, result.stderr
    else:
        assert result.exit_code == 0 and caught == [signal.SIGTERM], result.stderr
    assert listing(model) == FILES and leftovers(model) == []
    assert model_document(model)["spec"]["formula"] == "(price|constant)"
    assert load_result(model).fit_id == model_document(model)["fit_id"]


def test_a_fit_removes_the_temporaries_of_dead_runs_only(tmp_path, data):
    """Another live run's temporary survives a fit's clean-up; a dead run's goes."""
    model = tmp_path / "m"
    assert fit(data, model).exit_code == 0
    live = tmp_path / f".m.{os.getppid()}.l1v3l1v3.tmp"
    dead = tmp_path / ".m.4194305.d3add3ad.tmp"
    for path in (live, dead):
        path.mkdir()
        (path / "model.json").write_text("{}")
    assert fit(data, model).exit_code == 0
    assert live.is_dir() and not dead.exists()


# --------------------------------------------------------------------------------------------
# The spec: ModelSpec to model.json and back, every field
# --------------------------------------------------------------------------------------------


def full_spec() -> ModelSpec:
    """A ModelSpec with no field at its default."""
    roles = Roles(case="c", item="i", choice="y", user="u", session="s", available="a",
                  weights="w")  # fmt: skip
    return ModelSpec(
        formula="(price|constant)",
        roles=roles,
        nest_formula="(1|item)",
        nests={"p": ["a", "b"], "q": ["c"]},
        shared_lambda=True,
        lambda_init=0.5,
        lambda_fixed=True,
        lambda_bounds=(0.05, 0.95),
        base="b",
        missing="drop",
        random=(("price[constant]", "lognormal"),),
        correlated=True,
        draws=77,
        draw_kind="sobol",
        seed=5,
    )


def test_spec_round_trips_through_model_json_on_every_field():
    spec = full_spec()
    defaults = ModelSpec(formula="", roles=Roles())
    for field in fields(ModelSpec):
        assert getattr(spec, field.name) != getattr(defaults, field.name), field.name
    for field in fields(Roles):
        assert getattr(spec.roles, field.name) != getattr(Roles(), field.name), field.name
    document = json.loads(json.dumps(spec_document(spec, terms=[], options={"tol": 1e-7})))
    assert spec_from_document(document) == spec


def test_a_fitted_spec_keeps_its_lambda_bounds(tmp_path, data):
    model = tmp_path / "m"
    result = fit(data, model, "--nests", "p=a,b;q=c", "--lambda-bounds", "0.05,0.95",
                 "--shared-lambda", "--lambda-init", "0.5", formula="(price|constant)")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    spec = spec_from_document(load_result(model).spec)
    assert spec.lambda_bounds == (0.05, 0.95) and spec.lambda_init == 0.5
    assert spec.shared_lambda and spec.nests == {"p": ["a", "b"], "q": ["c"]}
    assert spec.base == "a" and spec.roles == Roles(case="case", item="item", choice="choice")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        pytest.param(lambda s: s.update(lambda_bounds=[0.9, 0.1]), "lambda_bounds", id="bounds"),
        pytest.param(lambda s: s.update(lambda_bounds=[0.1]), "lambda_bounds", id="one-bound"),
        pytest.param(lambda s: s.update(lambda_init=-1), "lambda_init", id="init"),
        pytest.param(lambda s: s.update(shared_lambda="yes"), "shared_lambda", id="flag"),
        pytest.param(lambda s: s.update(missing="maybe"), "missing", id="missing"),
        pytest.param(lambda s: s["roles"].update(case=7), "roles", id="roles"),
        pytest.param(lambda s: s.update(nests={"p": []}), "nests", id="empty-nest"),
        pytest.param(lambda s: s.update(base=3), "base", id="base"),
    ],
)
def test_an_edited_spec_is_one_line(model, data, tmp_path, edit, needle):
    path = model / "model.json"
    document = json.loads(path.read_text())
    edit(document["spec"])
    path.write_text(json.dumps(document))
    assert_refused("predict", model, data, tmp_path, "model.json", needle)
