"""The model directory: which directories a fit may replace, its lock, and the swap.

Ownership: a fit replaces DIR only when DIR is absent, empty, or a choice model (a model.json
with our schema and nothing but the model's three files). It never takes the working directory
or one that holds it (`-m .`, `-m ''`, `-m ..`), nor a directory that holds its input file. A
symbolic link to a directory is followed: the directory it points to is replaced.

Lock: `flock` on DIR's parent directory (no lock file to leave behind). A fit holds it
exclusively while it checks ownership, repairs an interrupted swap and swaps; readers hold it
shared while they read the files. Filesystems without flock run unlocked.

Swap: the new model is written to `.DIR.<pid>.<random>.tmp` beside DIR; under the lock the old
DIR is moved to `.DIR.<pid>.<random>.old/previous`, the new one renamed into place, and the old
one removed. Signals are held between the two renames; only a SIGKILL (or power loss) can leave
DIR absent with the old model in `.old/previous`. Readers then read it there without moving
anything; the next fit puts it back under the lock. Temporaries carry their writer's pid: a fit
removes those of processes that are gone, never another live run's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from choicecli import process
from choicecli.errors import ArtifactError, OutputError, UsageError
from choicecli.output import temporary_prefix, umask

MODEL_FILE = "model.json"
PARAMS_FILE = "params.safetensors"
COEFFICIENTS_FILE = "coefficients.parquet"
MODEL_FILES = (MODEL_FILE, PARAMS_FILE, COEFFICIENTS_FILE)
MAX_MODEL_JSON_BYTES = 64 << 20  # a model.json of a million parameters is about 300 MB less
LOCK_WAIT_SECONDS = 300.0
LOCK_POLL_SECONDS = 0.02


def read_bounded(path: Path, limit: int, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else is an ArtifactError.

    Checked before reading: /dev/zero, a FIFO or a directory never hang or fill memory.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; refit the model") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"{path}: not a regular file; refit the model")
        if info.st_size > limit:
            raise ArtifactError(
                f"{path}: {info.st_size:,} bytes, more than a {what} can hold "
                f"({limit:,}); it is not a choice model file"
            )
        try:
            payload = handle.read(limit + 1)
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(payload) > limit:
        raise ArtifactError(f"{path}: larger than a {what} can be; it is not a choice model file")
    return payload


def parse_model_json(path: Path) -> object:
    """model.json parsed, bounded in size and depth; damage is one ArtifactError line."""
    raw = read_bounded(path, MAX_MODEL_JSON_BYTES, "model.json")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: damaged (not UTF-8 text); refit the model") from exc
    except RecursionError:
        raise ArtifactError(f"{path}: damaged (nested too deeply); refit the model") from None
    except ValueError as exc:  # JSONDecodeError, and integers of more than 4300 digits
        reason = str(exc).splitlines()[0][:120]
        raise ArtifactError(f"{path}: damaged ({reason}); refit the model") from exc


def is_choice_document(document: object) -> bool:
    """A parsed model.json that a choice fit wrote (of any schema version)."""
    if not isinstance(document, dict):
        return False
    version = document.get("schema_version")
    return (
        isinstance(version, int)
        and not isinstance(version, bool)
        and version >= 1
        and isinstance(document.get("spec"), dict)
        and isinstance(document.get("parameters"), list)
    )


def is_choice_model(directory: Path) -> bool:
    """Whether `directory` holds a choice model's model.json (cheap, never raises)."""
    candidate = Path(directory) / MODEL_FILE
    try:
        if not candidate.is_file():
            return False
        return is_choice_document(parse_model_json(candidate))
    except (ArtifactError, OSError):
        return False


# ---------------------------------------------------------------------------------------------
# Which directories a fit may replace


def model_target(model: Path) -> Path:
    """The directory a fit writes: `model` made absolute, through symbolic links."""
    return Path(model).resolve()


def check_fit_path(model: Path, inputs: Sequence[str] = ()) -> None:
    """Refuse, before anything is read, a --model that holds the working directory or an input."""
    target = model_target(model)
    shown = str(model) if str(model) not in ("", ".") else "."
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UsageError(
            f"--model {shown!r} is the working directory or holds it; a fit replaces the whole "
            "model directory, so give it one of its own (e.g. --model choice_model)"
        )
    for source in inputs:
        if source == "-":
            continue
        if target in Path(source).resolve().parents:
            raise UsageError(
                f"--model {shown!r} holds the input file {source}; a fit replaces the whole "
                f"model directory, so give it one of its own (e.g. --model {shown}/model)"
            )


def check_owned(model: Path) -> None:
    """Refuse a directory a fit may not replace: anything but absent, empty or a choice model."""
    target = model_target(model)
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise OutputError(f"{model}: exists and is not a directory; choose another --model")
    try:
        entries = sorted(os.listdir(target))
    except OSError as exc:
        raise OutputError(f"cannot write {model}: {exc.strerror or exc}") from exc
    foreign = [name for name in entries if name not in MODEL_FILES or not _regular(target / name)]
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        listed = ", ".join(foreign[:3]) + more
        raise OutputError(
            f"{model}: not a choice model directory (it holds {listed}); a fit replaces the "
            "whole directory, so choose a new or empty one, or move those files"
        )
    if entries and not is_choice_model(target):
        raise OutputError(
            f"{model}: its {MODEL_FILE} is not a choice model's; a fit replaces the whole "
            "directory, so choose a new or empty one"
        )


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The lock


@contextlib.contextmanager
def model_lock(model: Path, exclusive: bool) -> Iterator[None]:
    """Hold the lock of `model` (flock on its parent directory) for the block."""
    parent = model_target(model).parent
    try:
        descriptor = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # no parent (so no model), or one we may not open: nothing to lock
        yield
        return
    try:
        _acquire(descriptor, exclusive, model)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _acquire(descriptor: int, exclusive: bool, model: Path) -> None:
    operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(descriptor, operation)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise (OutputError if exclusive else ArtifactError)(
                    f"{model}: another choice command has held its lock for "
                    f"{LOCK_WAIT_SECONDS:.0f} s (a fit stopped while writing?); try again"
                ) from None
            time.sleep(LOCK_POLL_SECONDS)
        except OSError as exc:  # no flock here (some network filesystems): go on unlocked
            if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EBADF, errno.EOPNOTSUPP):
                return
            raise


# ---------------------------------------------------------------------------------------------
# Temporaries, repair, the swap


def _temporaries(target: Path, suffix: str) -> list[tuple[Path, int]]:
    """This model's own temporaries `.NAME.<pid>.<8 characters>.<suffix>` with their pids."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.([0-9]+)\.[a-z0-9_]{{8}}\.{suffix}$")
    found = []
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    for name in names:
        match = pattern.match(name)
        if match:
            found.append((target.parent / name, int(match.group(1))))
    return found


def interrupted_previous(model: Path) -> Path | None:
    """The model a swap killed between its renames left aside, when DIR itself is absent."""
    target = model_target(model)
    if os.path.lexists(target):
        return None
    aside = [path / "previous" for path, _ in _temporaries(target, "old")]
    aside = [path for path in aside if path.is_dir()]
    return max(aside, key=lambda path: path.stat().st_mtime) if aside else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # an earlier process with our pid: gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _repair(target: Path, keep: Path | None = None) -> None:
    """Under the exclusive lock: put back a model a killed swap left aside, remove what killed
    runs left (their .old, the .tmp of processes that are gone; never `keep`, our own)."""
    previous = interrupted_previous(target)
    if previous is not None:
        os.replace(previous, target)
    for path, _ in _temporaries(target, "old"):
        shutil.rmtree(path, ignore_errors=True)
    for path, pid in _temporaries(target, "tmp"):
        if path != keep and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def prepare_fit(model: Path, inputs: Sequence[str] = ()) -> None:
    """Before a fit reads anything: the path is one a fit may write, an interrupted swap is
    repaired, and the directory is ours."""
    check_fit_path(model, inputs)
    target = model_target(model)
    if not target.parent.is_dir():
        return
    try:
        with model_lock(model, exclusive=True):
            _repair(target)
            check_owned(model)
    except OSError as exc:
        raise OutputError(f"cannot write {model}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def replacing_model(model: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `model`; swap it in only if the block succeeds.

    An interrupted or failed write leaves the previous model (or none) and removes its own
    temporary; the swap holds signals between its two renames.
    """
    check_fit_path(model)
    target = model_target(model)
    check_owned(model)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), suffix=".tmp",
                                     dir=target.parent))  # fmt: skip
    except OSError as exc:
        raise OutputError(f"cannot write {model}: {exc.strerror or exc}") from exc
    try:
        temp.chmod(0o777 & ~umask())  # mkdtemp makes 0700
        yield temp
        with model_lock(model, exclusive=True):
            _repair(target, keep=temp)
            check_owned(model)  # another process may have put something there meanwhile
            _swap(temp, target)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"cannot write {model}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _swap(temp: Path, target: Path) -> None:
    """Move the old model aside, the new one in, then remove the old (under the lock).

    A signal that comes during the renames is acted on once both are done and the old model
    is removed; the old model is never removed while the new one is not in place.
    """
    aside = None
    try:
        with process.deferred_signals():
            if os.path.lexists(target):
                aside = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), suffix=".old",
                                              dir=target.parent))  # fmt: skip
                os.replace(target, aside / "previous")
            process.reached("swap")
            try:
                os.replace(temp, target)
            except OSError:
                if aside is not None:  # put the old model back before saying so
                    os.replace(aside / "previous", target)
                raise
    finally:
        if aside is not None and (os.path.lexists(target) or not (aside / "previous").exists()):
            shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def reading_model(model: Path) -> Iterator[Path]:
    """Hold the model's lock shared and yield the directory to read: `model`, or the previous
    model a killed swap left aside (read where it is; readers never move directories)."""
    with model_lock(model, exclusive=False):
        previous = interrupted_previous(model)
        yield previous if previous is not None else Path(model)
