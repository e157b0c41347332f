"""Writing outputs: where `-o PATH` goes, in which format, and never over what is not ours.

A destination is one of:
- `-`: standard output;
- a regular file, or nothing yet: written to a temporary beside it (`.NAME.<pid>.<random>.tmp`,
  named per process so no other run removes it) and renamed over it only once complete;
- anything else that can be written (a character device such as /dev/null, a FIFO, a symbolic
  link, /dev/stdout): written through, opened and written like a shell's `>`, never renamed over
  (a link keeps pointing where it did and its target gets the content).
A path inside a choice model directory is refused: the model's files belong to its fit.

The format follows `--format`, else the suffix; a suffix that names another format than the
one asked for is a usage error.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import polars as pl

from choicecli.errors import OutputError, UsageError

TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}
CHART_SUFFIXES = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def output_format(destination: str | Path, declared: str | None, default: str) -> str:
    """A table's format from --format, else the destination's suffix, else `default`.

    `-o c.csv --format parquet` is a usage error: one of the two is a mistake.
    """
    suffix = Path(str(destination)).suffix.lower()
    named = TABLE_SUFFIXES.get(suffix) if str(destination) != "-" else None
    if declared and named and named != declared:
        raise UsageError(
            f"-o {destination} names a {named} file but --format is {declared}; "
            f"change the suffix or drop --format"
        )
    return declared or named or default


def chart_format(destination: str | Path) -> str:
    """png, svg or pdf from the suffix of -o (png without one); any other suffix is a usage
    error."""
    suffix = Path(str(destination)).suffix.lower()
    if str(destination) == "-" or not suffix:
        return "png"
    if suffix not in CHART_SUFFIXES:
        raise UsageError(
            f"-o {destination}: charts are written as .png, .svg or .pdf, not {suffix}; "
            "change the suffix"
        )
    return CHART_SUFFIXES[suffix]


def check_destination(destination: str | Path) -> None:
    """Refuse, before any work, a destination that is a directory or inside a model directory."""
    if str(destination) == "-":
        return
    path = Path(destination)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory; give -o a file name")
    from choicecli.modeldir import is_choice_model

    try:
        parent = path.resolve().parent  # through links: where the bytes would land
    except (OSError, RuntimeError):  # a loop of links: opening it will say so
        return
    if is_choice_model(parent):
        raise OutputError(
            f"-o {path}: is inside the model directory {parent}, whose files belong to its "
            "fit; write the output elsewhere"
        )


@contextlib.contextmanager
def output_stream(destination: str | Path) -> Iterator[BinaryIO]:
    """A binary stream for an -o destination (see the module docstring).

    Written-through destinations get the bytes only once the block has succeeded, so a failed
    render never truncates a file behind a link or feeds half a file to a FIFO's reader.
    """
    if str(destination) == "-":
        buffer = io.BytesIO()
        yield buffer
        write_stdout(buffer.getvalue())
        return
    path = Path(destination)
    check_destination(path)
    if _written_through(path):
        buffer = io.BytesIO()
        yield buffer
        try:
            with open(path, "wb") as handle:  # a FIFO: waits here for its reader
                handle.write(buffer.getbuffer())
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return
    with atomic_file(path) as temp, open(temp, "wb") as handle:
        yield handle


def write_stdout(payload: bytes | str) -> None:
    """Bytes or text to standard output, after whatever text went there before."""
    stream = sys.stdout
    if stream is None:
        raise OutputError("cannot write to standard output: it is closed; use -o FILE")
    if isinstance(payload, str):
        stream.write(payload)
        stream.flush()
        return
    binary = getattr(stream, "buffer", None)
    if binary is None:
        raise OutputError("standard output takes only text here; use -o FILE")
    stream.flush()
    binary.write(payload)
    binary.flush()


def write_bytes(destination: str | Path, payload: bytes) -> None:
    with output_stream(destination) as handle:
        handle.write(payload)


def write_text(destination: str | Path, text: str) -> None:
    """Text to an -o destination: as text to stdout ('-'), as UTF-8 bytes elsewhere."""
    if str(destination) == "-":
        write_stdout(text)
    else:
        write_bytes(destination, text.encode())


def write_table(
    frame: pl.DataFrame, destination: str | Path, fmt: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a frame as parquet, csv or json to an -o destination ('-': stdout)."""
    if fmt == "parquet":
        with output_stream(destination) as handle:
            write_parquet(frame, handle, metadata or {})
        return
    write_text(destination, render_table_text(frame, fmt))


def render_table_text(frame: pl.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return frame.write_csv()
    if fmt == "json":
        return json.dumps(frame.to_dicts(), indent=2, default=str) + "\n"
    raise UsageError(f"cannot write format {fmt!r} as text; use csv or json")


def write_parquet(frame: pl.DataFrame, where: Path | BinaryIO, metadata: dict[str, str]) -> None:
    """Write Parquet with key-value metadata (not atomic: use inside atomic_file/directory)."""
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    existing = table.schema.metadata or {}
    merged = {**existing, **{key.encode(): value.encode() for key, value in metadata.items()}}
    pq.write_table(table.replace_schema_metadata(merged), where)


def _written_through(path: Path) -> bool:
    """Whether `path` is written through: anything that exists but a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return not stat.S_ISREG(mode)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    The new file keeps the mode of the file it replaces (else the usual 0666 less the umask).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=temporary_prefix(path), suffix=".tmp",
                                             dir=path.parent)  # fmt: skip
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    temp = Path(temp_name)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else 0o666 & ~umask()
        temp.chmod(mode)  # mkstemp makes 0600
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, BrokenPipeError):
            raise
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def temporary_prefix(path: Path) -> str:
    """`.NAME.<pid>.`: a temporary's owner is in its name, so a run only removes its own or
    those of processes that are gone."""
    return f".{path.name}.{os.getpid()}."


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
