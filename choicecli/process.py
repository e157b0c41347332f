"""Process plumbing: signals held during a swap, and the named stages tests can stop at."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

# Signals that end a command: Ctrl-C, `timeout`/Slurm/Kubernetes, a closed terminal
ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Test hook: a command whose environment names a stage in STOP_AT_VARIABLE writes the stage's
# name to the file named in STOP_FILE_VARIABLE when it gets there, then waits for a signal
STOP_AT_VARIABLE = "CHOICE_STOP_AT"
STOP_FILE_VARIABLE = "CHOICE_STOP_FILE"


def reached(stage: str) -> None:
    """Mark a named stage of a command (e.g. 'read', 'optimiser', 'swap'); a no-op unless a test
    asked to stop here, in which case it says so through a file and waits to be signalled."""
    if os.environ.get(STOP_AT_VARIABLE) != stage:
        return
    report = os.environ.get(STOP_FILE_VARIABLE)
    if report:
        Path(report).write_text(stage)
    while True:  # a signal's handler raises out of the sleep; SIGKILL ends the process
        time.sleep(60)


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
