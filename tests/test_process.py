"""Process plumbing: signals held over a swap, interruptions as exit codes, closed and full streams.

The stream scenarios run the installed console script through bash with the redirection a
user would type (`>&-`, `2>/dev/full`, `<&-`), all started at once when the module starts,
and check the exit code, every stderr line and what is on disk.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from reliability_helpers import (
    CHOICE,
    FORMULA,
    fit,
    leftovers,
    listing,
    long_table,
    model_document,
    subprocess_env,
    write,
)

from choicecli import process
from choicecli.errors import OutputError

MODEL_FILES = ["coefficients.parquet", "model.json", "params.safetensors"]
CLOSED_STDOUT = "Error: cannot write to standard output: it is closed"
FULL_STDOUT = "Error: cannot write to standard output: No space left on device"
CLOSED_STDIN = (
    "Error: standard input is closed; pass the table's file name instead of -, or pipe it in"
)
needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")


# --------------------------------------------------------------------------------------------
# Signals and interruptions, in-process
# --------------------------------------------------------------------------------------------


@pytest.fixture
def recorded_sigterm():
    """A recording SIGTERM handler for the test's duration (pytest runs in the main thread)."""
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    yield received
    signal.signal(signal.SIGTERM, previous)


def test_deferred_signals_hold_a_signal_until_the_block_is_done(recorded_sigterm):
    with process.deferred_signals():
        signal.raise_signal(signal.SIGTERM)  # handled at once if nothing held it
        assert recorded_sigterm == []
    assert recorded_sigterm == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the handler is back


def test_deferred_signals_act_on_the_first_and_keep_ignored_signals_ignored(recorded_sigterm):
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with process.deferred_signals():
            signal.raise_signal(signal.SIGHUP)  # ignored: neither recorded nor acted on
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        assert recorded_sigterm == [signal.SIGTERM]  # the first, once
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_deferred_signals_run_the_block_as_is_outside_the_main_thread():
    import threading

    done = []
    thread = threading.Thread(target=lambda: done.append(_in_deferred_block()))
    thread.start()
    thread.join()
    assert done == ["ran"]


def _in_deferred_block() -> str:
    with process.deferred_signals():
        return "ran"


def test_reached_does_nothing_unless_asked_to_stop_there(monkeypatch, tmp_path):
    monkeypatch.setenv(process.STOP_AT_VARIABLE, "swap")
    monkeypatch.setenv(process.STOP_FILE_VARIABLE, str(tmp_path / "stage.txt"))
    process.reached("read")
    assert not (tmp_path / "stage.txt").exists()


def test_a_signal_raised_during_a_wait_at_a_stage_ends_it(monkeypatch, tmp_path):
    """The wait at a stage ends with the handler's exception (the main thread signals itself
    from a timer thread once the stage file is there)."""
    import threading

    stage_file = tmp_path / "stage.txt"
    monkeypatch.setenv(process.STOP_AT_VARIABLE, "read")
    monkeypatch.setenv(process.STOP_FILE_VARIABLE, str(stage_file))

    def signal_when_waiting() -> None:
        while not (stage_file.exists() and stage_file.read_text() == "read"):
            threading.Event().wait(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, process._raise_interrupted)
    try:
        sender = threading.Thread(target=signal_when_waiting)
        sender.start()
        with pytest.raises(process.Interrupted) as stopped:
            process.reached("read")
        sender.join()
    finally:
        signal.signal(signal.SIGTERM, previous)  # the handler had set the default
    assert stopped.value.number == signal.SIGTERM and stopped.value.exit_code == 143


@pytest.mark.parametrize(
    ("number", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
)
def test_an_interrupted_fit_exits_128_plus_the_signal_with_one_line(
    tmp_path, monkeypatch, number, code
):
    data = write(long_table(), tmp_path / "data.csv")
    model = tmp_path / "m"
    assert fit(data, model).exit_code == 0
    before = {name: (model / name).read_bytes() for name in listing(model)}

    def interrupted(*args, **kwargs):
        raise process.Interrupted(number)

    monkeypatch.setattr("choicecli.fit.maximise", interrupted)
    result = fit(data, model, formula="(price|constant)")
    assert result.exit_code == code
    name = signal.Signals(number).name
    assert result.stderr == f"Interrupted by {name}; no half-written file was left.\n"
    assert result.stdout == ""
    assert {name: (model / name).read_bytes() for name in listing(model)} == before
    assert leftovers(model) == []


# --------------------------------------------------------------------------------------------
# The guarded output streams, in-process
# --------------------------------------------------------------------------------------------


def _guarded(descriptor: int | None, strict: bool) -> io.TextIOWrapper:
    return process._wrap_output(None, descriptor, "standard output", strict)


@needs_dev_full
def test_a_full_stdout_fails_once_with_a_named_error_then_drops_what_follows():
    descriptor = os.open("/dev/full", os.O_WRONLY)
    try:
        stream = _guarded(descriptor, strict=True)
        stream.write("a,b\n")
        with pytest.raises(OutputError, match="^cannot write to standard output: No space left"):
            stream.flush()
        stream.write("more\n")
        stream.flush()  # reported once: the rest is dropped
    finally:
        os.close(descriptor)


def test_a_closed_stdout_fails_with_a_named_error():
    stream = _guarded(None, strict=True)
    assert not stream.isatty()
    stream.write("x")
    with pytest.raises(OutputError, match="^cannot write to standard output: it is closed$"):
        stream.flush()


def test_a_gone_reader_stays_a_broken_pipe():
    reader, writer = os.pipe()
    os.close(reader)
    try:
        stream = _guarded(writer, strict=True)
        stream.write("x\n")
        with pytest.raises(BrokenPipeError):
            stream.flush()
    finally:
        os.close(writer)


@needs_dev_full
def test_stderr_failures_are_ignored():
    descriptor = os.open("/dev/full", os.O_WRONLY)
    try:
        stream = _guarded(descriptor, strict=False)
        stream.write("Warning: something\n")  # line-buffered: written (and failing) here
        stream.flush()
    finally:
        os.close(descriptor)
    _guarded(None, strict=False).write("closed\n")


# --------------------------------------------------------------------------------------------
# Closed and full streams through the console script
# --------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    process: subprocess.Popen
    folder: Path
    model: Path

    def finish(self) -> tuple[int, str, str]:
        returncode = self.process.wait(timeout=240)
        stdout = (self.folder / "stdout.txt").read_text()
        stderr = (self.folder / "stderr.txt").read_text()
        assert "Traceback" not in stdout + stderr, stdout + stderr
        return returncode, stdout, stderr


FIT = ["fit", "{data}", "--formula", FORMULA, "--device", "cpu", "--model", "{folder}/m"]
COEF = ["coef", "--model", "{model}", "--format", "csv"]
STREAM_SCENARIOS = {
    "fit-stdout-closed": (FIT, ">&-"),
    "fit-stdout-full": (FIT, ">/dev/full"),
    "fit-stderr-closed": (FIT, "2>&-"),
    "fit-stderr-full": (FIT, "2>/dev/full"),
    "fit-stdin-closed": (["fit", "-", "--formula", FORMULA, "--model", "{folder}/m"], "<&-"),
    "coef-stdout-closed": (COEF, ">&-"),
    "coef-stdout-full": (COEF, ">/dev/full"),
    "coef-parquet-stdout-full": (["coef", "--model", "{model}", "--format", "parquet"],
                                 ">/dev/full"),
    "coef-both-closed": (COEF, ">&- 2>&-"),
    "coef-to-a-file-stdout-closed": (["coef", "--model", "{model}", "-o", "{folder}/c.csv"],
                                     ">&-"),
    "predict-stdout-closed": (["predict", "{data}", "--model", "{model}"], ">&-"),
    "help-stdout-closed": (["--help"], ">&-"),
}  # fmt: skip


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, Scenario]:
    """Every stream scenario, started at once (each imports torch: they overlap)."""
    root = tmp_path_factory.mktemp("streams")
    data = write(long_table(), root / "data.csv")
    model = root / "model"
    assert fit(data, model).exit_code == 0
    scenarios: dict[str, Scenario] = {}
    handles = []
    for name, (arguments, redirection) in STREAM_SCENARIOS.items():
        if "/dev/full" in redirection and not Path("/dev/full").exists():
            continue
        folder = root / name
        folder.mkdir()
        values = {"data": data, "model": model, "folder": folder}
        command = [str(CHOICE), *(part.format(**values) for part in arguments)]
        stdout = (folder / "stdout.txt").open("wb")
        stderr = (folder / "stderr.txt").open("wb")
        handles += [stdout, stderr]
        shell = ["bash", "-c", f'exec "$@" {redirection}', "bash", *command]
        started = subprocess.Popen(
            shell, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=subprocess_env()
        )
        scenarios[name] = Scenario(started, folder, folder / "m")
    yield scenarios
    for scenario in scenarios.values():
        if scenario.process.poll() is None:
            scenario.process.kill()
            scenario.process.wait()
    for handle in handles:
        handle.close()


def _scenario(streams: dict[str, Scenario], name: str) -> Scenario:
    if name not in streams:
        pytest.skip("no /dev/full")
    return streams[name]


def assert_complete_model(model: Path) -> None:
    assert listing(model) == MODEL_FILES
    assert model_document(model)["spec"]["formula"] == FORMULA
    assert pl.read_parquet(model / "coefficients.parquet").height == 4
    assert leftovers(model) == []


@pytest.mark.parametrize("name", ["fit-stdout-closed", "fit-stdout-full"])
def test_a_fit_with_stdout_closed_or_full_writes_its_model_and_exits_0(streams, name):
    scenario = _scenario(streams, name)
    returncode, _, stderr = scenario.finish()
    assert returncode == 0, stderr
    assert stderr.splitlines()[-1] == f"model written to {scenario.model}/"
    assert_complete_model(scenario.model)


@pytest.mark.parametrize("name", ["fit-stderr-closed", "fit-stderr-full"])
def test_a_fit_with_stderr_closed_or_full_writes_its_model_and_exits_0(streams, name):
    scenario = _scenario(streams, name)
    returncode, stdout, stderr = scenario.finish()
    assert (returncode, stdout, stderr) == (0, "", "")
    assert_complete_model(scenario.model)


def test_a_fit_reading_a_closed_stdin_is_one_line(streams):
    scenario = streams["fit-stdin-closed"]
    returncode, stdout, stderr = scenario.finish()
    assert (returncode, stdout, stderr) == (1, "", CLOSED_STDIN + "\n")
    assert not scenario.model.exists()
    assert leftovers(scenario.model) == []


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("coef-stdout-closed", CLOSED_STDOUT),
        ("coef-stdout-full", FULL_STDOUT),
        ("coef-parquet-stdout-full", FULL_STDOUT),
        ("help-stdout-closed", CLOSED_STDOUT),
    ],
)
def test_a_command_whose_output_cannot_be_written_fails_with_one_line(streams, name, line):
    returncode, stdout, stderr = _scenario(streams, name).finish()
    assert (returncode, stdout, stderr) == (1, "", line + "\n")


def test_predict_to_a_closed_stdout_reports_then_fails_with_one_error_line(streams):
    returncode, stdout, stderr = streams["predict-stdout-closed"].finish()
    assert returncode == 1
    lines = stderr.splitlines()
    assert lines[-1] == CLOSED_STDOUT
    assert [line for line in lines if line.startswith("Error")] == [CLOSED_STDOUT]
    assert lines[0].startswith("log-likelihood")  # the report on stderr came first


def test_a_failure_with_both_streams_closed_is_silent_with_exit_1(streams):
    assert streams["coef-both-closed"].finish() == (1, "", "")


def test_an_output_file_is_written_whatever_stdout_is(streams):
    scenario = streams["coef-to-a-file-stdout-closed"]
    assert scenario.finish() == (0, "", "")
    table = pl.read_csv(scenario.folder / "c.csv")
    assert table["term"].to_list() == ["price[constant]", *["intercept[item]"] * 3]
