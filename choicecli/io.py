"""Reading tables (Parquet, CSV, stdin) and writing every output atomically."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl

from choicecli.errors import DataError, OutputError, UsageError
from choicecli.process import deferred_signals, reached

PARQUET_MAGIC = b"PAR1"
CSV_NULLS = ("", "NA", "NaN", "nan", "null", "NULL")
CSV_TRUE = ("TRUE", "True", "true")
CSV_FALSE = ("FALSE", "False", "false")
# polars' typed CSV reader: the rows it types columns from, and the types it gives that trimmed
# text typed here would give too (it reads "tRuE" as a boolean, for one, and we do not)
CSV_INFER_ROWS = 10_000
CSV_KEPT_TYPES = (pl.Int64, pl.Float64)
READ_BATCH_ROWS = 1 << 16  # numeric Parquet columns are read this many rows at a time
READ_BUFFER_BYTES = 1 << 20  # and their pages streamed through a buffer this size


def input_format(path: str, declared: str | None, head: bytes = b"") -> str:
    """Decide 'parquet' or 'csv' from --input-format, the suffix, or the first bytes."""
    if declared:
        if declared not in ("parquet", "csv"):
            raise UsageError(f"--input-format must be parquet or csv, not {declared!r}")
        return declared
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".txt", ".tsv"):
        return "csv"
    return "parquet" if head.startswith(PARQUET_MAGIC) else "csv"


def read_table(
    path: str,
    declared_format: str | None = None,
    select: Callable[[list[str]], list[str]] | None = None,
) -> tuple[pl.DataFrame, str]:
    """Read a long-format table; returns the frame and the SHA-256 of the bytes read.

    `select` picks, from the table's column names, the ones to keep: a Parquet file reads
    only those (its bytes are never held whole), CSV and stdin are parsed whole first.
    """
    if path == "-":
        raw = sys.stdin.buffer.read()
        where = "<stdin>"
    else:
        file = Path(path)
        if not file.exists():
            raise DataError(f"{path}: no such file")
        if file.is_dir():
            raise DataError(f"{path}: is a directory, expected a Parquet or CSV file")
        if _is_parquet_file(file, declared_format):
            return _read_parquet_file(file, path, select), sha256_file(file)
        raw = file.read_bytes()
        where = path
    if not raw.strip():
        raise DataError(f"{where}: the file is empty")
    digest = hashlib.sha256(raw).hexdigest()
    fmt = input_format(path, declared_format, raw[:4])
    frame = _read_parquet(raw, where) if fmt == "parquet" else _read_csv(raw, where)
    if frame.height == 0:
        raise DataError(f"{where}: the table has no rows")
    return (frame if select is None else frame.select(select(frame.columns))), digest


def scan_table(path: str, declared_format: str | None = None) -> tuple[pl.LazyFrame | None, str]:
    """A lazy scan of a Parquet file (read in pieces later) and its SHA-256; None otherwise.

    CSV and stdin are not scanned: they go through `read_table`, which parses them as R does.
    """
    file = Path(path)
    if path == "-" or not file.is_file():
        return None, ""
    with file.open("rb") as handle:
        head = handle.read(4)
    if input_format(path, declared_format, head) != "parquet":
        return None, ""
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(file)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: cannot read Parquet: {_first_line(exc)}") from exc
    return pl.scan_parquet(file), sha256_file(file)


def _is_parquet_file(file: Path, declared_format: str | None) -> bool:
    """A file that is Parquet by its format and has both magic numbers (else: read whole)."""
    if file.stat().st_size < 2 * len(PARQUET_MAGIC):
        return False
    with file.open("rb") as handle:
        head = handle.read(len(PARQUET_MAGIC))
        handle.seek(-len(PARQUET_MAGIC), os.SEEK_END)
        tail = handle.read()
    fmt = input_format(str(file), declared_format, head)
    return fmt == "parquet" and head == PARQUET_MAGIC and tail == PARQUET_MAGIC


def _read_parquet_file(
    file: Path, where: str, select: Callable[[list[str]], list[str]] | None
) -> pl.DataFrame:
    """A Parquet file straight from disk, only the selected columns.

    Numeric columns come through `_read_numeric_columns` (each into one array of its own, which
    the frame shares), the others through polars.
    """
    try:
        names = list(pl.read_parquet_schema(file))
    except Exception as exc:  # polars/pyarrow raise many types for corrupt files
        raise DataError(f"{where}: cannot read Parquet: {_first_line(exc)}") from exc
    columns = names if select is None else select(names)
    try:
        numeric, n_rows = _read_numeric_columns(file, columns)
        others = [name for name in columns if name not in numeric]
        frame = pl.read_parquet(file, columns=others) if others else None
    except Exception as exc:
        raise DataError(f"{where}: cannot read Parquet: {_first_line(exc)}") from exc
    if (frame.height if frame is not None else n_rows) == 0:
        raise DataError(f"{where}: the table has no rows")
    if not numeric:
        return frame
    return pl.DataFrame(
        [numeric[name] if name in numeric else frame.get_column(name) for name in columns]
    )


def _read_numeric_columns(file: Path, names: list[str]) -> tuple[dict[str, pl.Series], int]:
    """The named integer and float columns without nulls, each read batch by batch into one
    array of its own that the returned series share; and the file's row count.

    A column is then held once, in memory that goes back to the system when it is freed; polars
    would hold it in row-group pieces whose memory its allocator keeps after they are joined.
    A column with nulls is left out (polars reads it).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file, pre_buffer=False, buffer_size=READ_BUFFER_BYTES)
    n_rows = parquet.metadata.num_rows
    schema = parquet.schema_arrow
    found = [name for name in names if schema.get_field_index(name) >= 0]  # -1: absent or twice
    types = {name: schema.field(name).type for name in found}
    arrays = {
        name: np.empty(n_rows, dtype=kind.to_pandas_dtype())  # (R,)
        for name, kind in types.items()
        if pa.types.is_integer(kind) or pa.types.is_float32(kind) or pa.types.is_float64(kind)
    }
    if not arrays:
        return {}, n_rows
    start = 0
    for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=list(arrays)):
        stop = start + batch.num_rows
        for name in list(arrays):
            column = batch.column(name)
            if column.null_count:
                del arrays[name]
            else:
                arrays[name][start:stop] = column.to_numpy(zero_copy_only=True)
        start = stop
    if start != n_rows:
        raise DataError(f"{start} rows read where the footer lists {n_rows}")
    pa.default_memory_pool().release_unused()  # the batches' memory: back to the system
    return {name: pl.Series(name, values) for name, values in arrays.items()}, n_rows


def _read_parquet(raw: bytes, where: str) -> pl.DataFrame:
    if not (raw.startswith(PARQUET_MAGIC) and raw.endswith(PARQUET_MAGIC)):
        raise DataError(f"{where}: not a valid Parquet file (missing or truncated footer)")
    try:
        return pl.read_parquet(io.BytesIO(raw))
    except Exception as exc:  # polars/pyarrow raise many types for corrupt files
        raise DataError(f"{where}: cannot read Parquet: {_first_line(exc)}") from exc


def _check_ragged(raw: bytes, where: str) -> None:
    """Every line holds as many fields as the header (quoted commas do not count)."""
    try:
        lines = pl.read_csv(
            io.BytesIO(raw), has_header=False, separator="\x1f", quote_char=None,
            new_columns=["line"], infer_schema=False,
        ).get_column("line")  # fmt: skip
    except Exception as exc:
        raise DataError(f"{where}: cannot read CSV: {_first_line(exc)}") from exc
    lines = lines.fill_null("")
    if bool((lines.str.count_matches('"') % 2 == 1).any()):
        return  # a quoted cell holds a line break: records are not lines, polars parsed them
    blank = lines.str.strip_chars() == ""
    if bool(blank.all()):
        return
    fields = lines.str.replace_all(r'"[^"]*"', "").str.count_matches(",") + 1
    expected = int(fields[int((~blank).arg_true()[0])])
    bad = (fields != expected) & ~blank
    if bool(bad.any()):
        first = int(bad.arg_true()[0])
        raise DataError(
            f"{where}: line {first + 1} has {int(fields[first])} fields but the header has "
            f"{expected} ({int(bad.sum())} such lines); fix the rows or quote cells with commas"
        )


def _read_csv(raw: bytes, where: str) -> pl.DataFrame:
    """Read CSV as R and pandas do: trim cells, TRUE/FALSE as booleans, empty or NA as null.

    Polars' own typed reader goes first (several times faster, and it never holds every cell
    as text): its integer and float columns are what trimming and typing the text would give,
    and its text columns are trimmed and typed here; a column it typed otherwise (booleans,
    which it reads in any case) is read again as text. Where it fails (a line with too many
    fields) the table is read as text throughout.
    """
    typed = _read_csv_typed(raw)
    if typed is None:
        _check_ragged(raw, where)
        return _typed_text(_read_csv_text(raw, where, None))
    if any(typed.null_count().row(0)):  # a null may be a line with too few fields
        _check_ragged(raw, where)
    dtypes = typed.dtypes
    again = [i for i, dtype in enumerate(dtypes) if dtype not in CSV_KEPT_TYPES + (pl.String,)]
    text = _read_csv_text(raw, where, again) if again else pl.DataFrame()
    columns = []
    for index, (name, dtype) in enumerate(zip(typed.columns, dtypes, strict=True)):
        series = typed.to_series(index)
        if dtype == pl.String:
            series = _typed_text(series.to_frame()).to_series()
        elif index in again:
            series = _typed_text(text.select(pl.nth(again.index(index)))).to_series()
        columns.append(series.alias(name if name else "_row"))
    return pl.DataFrame(columns)


def _read_csv_typed(raw: bytes) -> pl.DataFrame | None:
    """Polars' typed read (nulls: CSV_NULLS) with types from the first rows, else (a later value
    they do not hold) from all rows; None where both fail."""
    for infer_rows in (CSV_INFER_ROWS, None):
        try:
            return pl.read_csv(io.BytesIO(raw), infer_schema_length=infer_rows,
                               null_values=list(CSV_NULLS))  # fmt: skip
        except Exception:  # polars raises several types; the text read reports what is wrong
            continue
    return None


def _read_csv_text(raw: bytes, where: str, columns: list[int] | None) -> pl.DataFrame:
    """Every cell (of the columns at these places, or of all) as the text in the file."""
    try:
        return pl.read_csv(io.BytesIO(raw), infer_schema=False, null_values=None, columns=columns)
    except Exception as exc:
        raise DataError(f"{where}: cannot read CSV: {_first_line(exc)}") from exc


def _typed_text(text: pl.DataFrame) -> pl.DataFrame:
    """Text columns trimmed, CSV_NULLS as null, each given the narrowest type of its values."""
    columns = []
    for name in text.columns:
        cleaned = pl.col(name).str.strip_chars()
        cleaned = pl.when(cleaned.is_in(CSV_NULLS)).then(None).otherwise(cleaned)
        columns.append(cleaned.alias(name if name else "_row"))
    trimmed = text.select(columns)
    return trimmed.select([_typed_column(trimmed.get_column(c)) for c in trimmed.columns])


def _typed_column(series: pl.Series) -> pl.Series:
    """Give a trimmed string column the narrowest type that holds every value."""
    present = series.drop_nulls()
    if present.len() == 0:
        return series.cast(pl.Float64)
    if present.is_in(CSV_TRUE + CSV_FALSE).all():
        frame = pl.DataFrame({"v": series})
        flag = pl.when(pl.col("v").is_null()).then(None).otherwise(pl.col("v").is_in(CSV_TRUE))
        return frame.select(flag.alias(series.name)).to_series()
    for dtype in (pl.Int64, pl.Float64):
        try:
            return series.cast(dtype, strict=True)
        except Exception:  # polars raises InvalidOperationError / ComputeError
            continue
    return series


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=path.parent)  # fmt: skip
        os.close(handle)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    temp = Path(temp_name)
    temp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; swap it in only if the block succeeds.

    An existing directory is moved aside, the new one renamed into place, then the old one removed,
    so an interrupted write leaves either the old or the new directory, never a mix.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a directory; choose another --model")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    temp.chmod(0o777 & ~_umask())
    try:
        yield temp
        old = None
        with deferred_signals():  # a signal waits until the swap is done
            if path.exists():
                old = Path(
                    tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
                )
                os.replace(path, old / "previous")
            reached("swap")
            os.replace(temp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _temporaries(path: Path, suffix: str) -> list[Path]:
    """This path's own temporaries: `.NAME.<8 random characters>.<suffix>`, nothing else."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.{suffix}$")
    return [p for p in path.parent.iterdir() if pattern.match(p.name)]


def restore_interrupted(path: Path) -> None:
    """If a write was killed between its two renames, put the previous directory back."""
    path = Path(path)
    if path.exists() or not path.parent.is_dir():
        return
    for leftover in _temporaries(path, "old"):
        previous = leftover / "previous"
        if previous.is_dir():
            os.replace(previous, path)
            shutil.rmtree(leftover, ignore_errors=True)
            return


def clean_stale_temporaries(path: Path) -> None:
    """Remove temporaries a killed run left beside `path`; restore a directory moved aside."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    restore_interrupted(path)
    for leftover in _temporaries(path, "old") + _temporaries(path, "tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def write_table(
    frame: pl.DataFrame, destination: str | Path, fmt: str, metadata: dict[str, str] | None = None
) -> None:
    """Write a frame as parquet, csv or json to a path (atomically) or to stdout ('-')."""
    if str(destination) == "-":
        sys.stdout.write(render_table_text(frame, fmt))
        sys.stdout.flush()
        return
    target = Path(destination)
    with atomic_file(target) as temp:
        if fmt == "parquet":
            write_parquet(frame, temp, metadata or {})
        else:
            temp.write_text(render_table_text(frame, fmt))


def render_table_text(frame: pl.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return frame.write_csv()
    if fmt == "json":
        return json.dumps(frame.to_dicts(), indent=2, default=str) + "\n"
    raise UsageError(f"cannot write format {fmt!r} as text; use csv or json")


def write_parquet(frame: pl.DataFrame, path: Path, metadata: dict[str, str]) -> None:
    """Write Parquet with key-value metadata (not atomic: use inside atomic_file/directory)."""
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    existing = table.schema.metadata or {}
    merged = {**existing, **{key.encode(): value.encode() for key, value in metadata.items()}}
    pq.write_table(table.replace_schema_metadata(merged), path)


def output_format(destination: str, declared: str | None, default: str) -> str:
    """Pick an output format from --format, the destination suffix, or a default."""
    if declared:
        return declared
    suffix = Path(destination).suffix.lower().lstrip(".")
    return suffix if suffix in ("parquet", "csv", "json") else default
