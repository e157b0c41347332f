"""Process plumbing: the allocator variable, signals, the standard streams, the fast exit.

Everything here acts on the process as a whole, so only the console-script entry point
(`cli.main`) calls the setup functions; commands run in-process (tests, CliRunner) leave the
caller's handlers and streams alone. `deferred_signals` and `reached` are used by the library.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from choicecli.errors import DataError, OutputError

# Signals that end a command: Ctrl-C, `timeout`/Slurm/Kubernetes, a closed terminal
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # 141, as a shell reports a command SIGPIPE stopped
# Test hook: a command whose environment names a stage in STOP_AT_VARIABLE writes the stage's
# name to the file named in STOP_FILE_VARIABLE when it gets there, then waits for a signal
STOP_AT_VARIABLE = "CHOICE_STOP_AT"
STOP_FILE_VARIABLE = "CHOICE_STOP_FILE"
# polars' allocator (jemalloc) hands the pages it frees back to the system only after 0.5 s,
# and then lazily (they count as resident until the system runs short): its background thread
# hands them back within 0.1 s and for good, at no cost to the command's own thread
ALLOCATOR_VARIABLE = "_RJEM_MALLOC_CONF"
ALLOCATOR_SETTINGS = "background_thread:true,dirty_decay_ms:100,muzzy_decay_ms:0"
# polars, when imported, writes its defaults before the variable's value and leaves them in the
# environment: a parent process that imported polars (a Python pipeline) passes them on, and
# after ours they would win. Seen at the start of an inherited value, they are polars', not
# the user's. At 10M rows they added about 100 MB to the peak.
POLARS_ALLOCATOR_DEFAULTS = "dirty_decay_ms:500,muzzy_decay_ms:1000"


# --------------------------------------------------------------------------------------------
# The allocator variable
# --------------------------------------------------------------------------------------------


def allocator_settings(inherited: str | None) -> str:
    """Our settings for polars' allocator followed by the user's own, which win where they
    overlap (the last value of an option counts); polars' defaults that a parent process left
    at the start of the inherited value are dropped."""
    own = inherited or ""
    while own == POLARS_ALLOCATOR_DEFAULTS or own.startswith(POLARS_ALLOCATOR_DEFAULTS + ","):
        own = own[len(POLARS_ALLOCATOR_DEFAULTS) + 1 :]  # one copy per parent that imported it
    return ",".join(part for part in (ALLOCATOR_SETTINGS, own) if part)


def configure_allocator() -> None:
    """Set polars' allocator to hand freed memory back; only before polars loads (it reads
    the settings then), so a command that imports polars later gets them."""
    if "polars" not in sys.modules:
        os.environ[ALLOCATOR_VARIABLE] = allocator_settings(os.environ.get(ALLOCATOR_VARIABLE))


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class Interrupted(BaseException):
    """A signal that ends the command (SIGINT, SIGTERM, SIGHUP), raised in the main thread.

    A BaseException, like KeyboardInterrupt, so `except Exception` never swallows it and every
    `finally` and context manager on the way out (the temporary directories) cleans up.
    """

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a command the signal stopped."""
        return 128 + self.number


def signal_name(number: int) -> str:
    return signal.Signals(number).name


def interruption_message(number: int) -> str:
    """The one line an interrupted command prints. Outputs are written to temporaries and
    renamed into place (a signal during the model swap waits for the swap), so every output
    file is either as it was before the command or complete."""
    return f"Interrupted by {signal_name(number)}; no half-written file was left."


def _raise_interrupted(number: int, frame: object) -> None:
    # A second signal while the first one's cleanup runs ends the process at once (the
    # system's default action), as a second Ctrl-C does in most tools.
    for ending in ENDING_SIGNALS:
        if signal.getsignal(ending) is _raise_interrupted:
            signal.signal(ending, signal.SIG_DFL)
    raise Interrupted(number)


def install_signal_handlers() -> None:
    """Make SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread.

    A signal the parent set to be ignored stays ignored (`nohup` ignores SIGHUP; a shell
    ignores SIGINT for a background job in a script).
    """
    for number in ENDING_SIGNALS:
        if signal.getsignal(number) != signal.SIG_IGN:
            signal.signal(number, _raise_interrupted)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block is done, then act on the first that came.

    Python runs signal handlers in the main thread between bytecodes, so a Ctrl-C could land
    between two renames that must happen together; here the handlers only record the signal
    while the block runs. Outside the main thread (no handlers can be set) the block runs as is.
    """
    try:
        previous = {
            number: signal.getsignal(number) or signal.SIG_DFL for number in ENDING_SIGNALS
        }  # None: a handler set outside Python
        received: list[int] = []
        for number in ENDING_SIGNALS:
            if previous[number] != signal.SIG_IGN:
                signal.signal(number, lambda got, frame: received.append(got))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:  # acted on now, by the handler that was in place before
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler != signal.SIG_IGN:
                os.kill(os.getpid(), received[0])


def reached(stage: str) -> None:
    """Mark a named stage of a command (e.g. 'read', 'optimiser', 'swap'); a no-op unless a test
    asked to stop here, in which case it says so through a file and waits to be signalled.

    The wait ends when an ending signal arrives: its handler raises out of it, or, inside
    `deferred_signals`, records it and the command goes on to act on it at the block's end.
    """
    if os.environ.get(STOP_AT_VARIABLE) != stage:
        return
    report = os.environ.get(STOP_FILE_VARIABLE)
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    try:
        # Every signal with a Python handler writes its number to the wakeup pipe, whichever
        # thread the system hands it to; set before the file says we are here, so none is missed.
        previous = signal.set_wakeup_fd(writer)
    except ValueError:  # not the main thread: wait for a signal that ends the process
        os.close(reader)
        os.close(writer)
        if report:
            Path(report).write_text(stage)
        while True:
            time.sleep(60)
    try:
        if report:
            Path(report).write_text(stage)
        while not os.read(reader, 1):
            pass
    finally:
        signal.set_wakeup_fd(previous)
        os.close(reader)
        os.close(writer)


# --------------------------------------------------------------------------------------------
# The standard streams
# --------------------------------------------------------------------------------------------


class _GuardedOutput(io.RawIOBase):
    """A standard output stream whose failures are the user's to fix, not the program's.

    `strict` (stdout, where a command's data goes): a failed write raises OutputError naming
    standard output, once; a reader that went away stays a BrokenPipeError (exit 141).
    Otherwise (stderr, diagnostics only): failures are ignored, since there is nowhere left to
    report them and they must not turn a finished command into a failed one. After a failure,
    or with the stream closed (`>&-`), writes are dropped.
    """

    def __init__(self, descriptor: int | None, name: str, strict: bool) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.stream_name = name
        self.strict = strict
        self.failed = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        if self.descriptor is None:
            raise io.UnsupportedOperation(f"{self.stream_name} is closed")
        return self.descriptor

    def isatty(self) -> bool:
        return self.descriptor is not None and os.isatty(self.descriptor)

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if self.failed:
            return size
        if self.descriptor is None:
            return self._failure("it is closed", size)
        try:
            return os.write(self.descriptor, data)
        except BrokenPipeError:
            self.failed = True
            if self.strict:
                raise
            return size
        except OSError as error:
            return self._failure(error.strerror or str(error), size)

    def _failure(self, reason: str, size: int) -> int:
        self.failed = True
        if self.strict:
            raise OutputError(f"cannot write to {self.stream_name}: {reason}")
        return size


class _ClosedInput(io.RawIOBase):
    """Standard input that was closed when the command started (`<&-`)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise DataError(
            "standard input is closed; pass the table's file name instead of -, or pipe it in"
        )


def _descriptor_is_open(descriptor: int) -> bool:
    try:
        os.fstat(descriptor)
    except OSError:
        return False
    return True


def repair_streams() -> None:
    """Give the standard streams well-defined behaviour when closed, full or gone.

    A closed descriptor 0, 1 or 2 is filled with /dev/null so that no file the command opens
    takes its number (where a library's own prints would land in it). Python sets sys.stdout
    (and the others) to None when the descriptor was closed at start; every command then failed
    with a traceback. Now stdout fails with one line when data must go there, stderr never
    fails a command, and a read of a closed stdin is one line.
    """
    closed = {0: sys.stdin is None, 1: sys.stdout is None, 2: sys.stderr is None}
    for descriptor in (0, 1, 2):
        if not _descriptor_is_open(descriptor):
            opened = os.open(os.devnull, os.O_RDONLY)  # writes fail as on a closed stream
            if opened != descriptor:
                os.dup2(opened, descriptor)
                os.close(opened)
    if closed[0]:
        sys.stdin = io.TextIOWrapper(io.BufferedReader(_ClosedInput()), encoding="utf-8")
    sys.stdout = _wrap_output(sys.stdout, None if closed[1] else 1, "standard output", True)
    sys.stderr = _wrap_output(sys.stderr, None if closed[2] else 2, "standard error", False)


def _wrap_output(stream, descriptor: int | None, name: str, strict: bool) -> io.TextIOWrapper:
    """The stream on a guarded descriptor, keeping its encoding and buffering."""
    if stream is not None:
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    guarded = _GuardedOutput(descriptor, name, strict)
    interactive = guarded.isatty()
    return io.TextIOWrapper(
        io.BufferedWriter(guarded),
        encoding=getattr(stream, "encoding", None) or "utf-8",
        errors=getattr(stream, "errors", None) or ("strict" if strict else "backslashreplace"),
        line_buffering=interactive or not strict,  # stderr: a line at a time, as Python's
    )


def silence_stdout() -> None:
    """After the reader of stdout went away: later flushes go nowhere instead of failing."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# --------------------------------------------------------------------------------------------
# The fast exit
# --------------------------------------------------------------------------------------------


def exit_now(code: int | str | None) -> NoReturn:
    """End the process as `sys.exit(code)` would, without the interpreter's teardown.

    With torch loaded, tearing the interpreter down (freeing every module and tensor, running
    libraries' destructors) took 0.4 to 0.9 s here, about as long as a 100k-case fit; the
    system frees it all at once anyway. Every output file is closed by now (written to a temporary
    file, then renamed); atexit handlers run and the standard streams are flushed here.
    A signal that comes from here on ends the process with the system's default action
    (the same exit status for a shell).
    """
    for number in ENDING_SIGNALS:
        with contextlib.suppress(ValueError):  # not the main thread
            if signal.getsignal(number) is _raise_interrupted:
                signal.signal(number, signal.SIG_DFL)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): the message, then status 1
        _print_error(str(code), prefix="")
        code = 1
    atexit._run_exitfuncs()
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`| head`): as a command killed by SIGPIPE
        code = code or EXIT_BROKEN_PIPE
    except (OSError, OutputError) as error:  # data the command meant to print is lost
        if not code:
            _print_error(str(error))
            code = 1
    except ValueError:  # closed by the command itself: nothing left to flush
        pass
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    os._exit(code)


def _print_error(message: str, prefix: str = "Error: ") -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        print(f"{prefix}{message}", file=sys.stderr)
