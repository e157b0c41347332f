"""Reading tables (Parquet, CSV, stdin); writing outputs is `choicecli.output`."""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import select
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

from choicecli.errors import DataError, UsageError

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
READ_CHUNK_BYTES = 1 << 20  # stdin and pipes are read this much at a time
# a stream (stdin, a pipe, a FIFO) is read into memory whole: one longer than this is stopped
# (None: half this machine's memory), so an endless one cannot fill the memory
STREAM_LIMIT_BYTES: int | None = None
FIFO_WAIT_SECONDS = 10.0  # a FIFO nobody writes to is given up after this long
FIFO_POLL_SECONDS = 0.05
UTF8_BOM = b"\xef\xbb\xbf"
# the first bytes of files that are no table: what they are, and how to make them one
NOT_TABLES = (
    (b"\x1f\x8b", "a gzip-compressed file", "decompress it first (zcat FILE | choice ... -)"),
    (b"BZh", "a bzip2-compressed file", "decompress it first (bzcat FILE | choice ... -)"),
    (b"\xfd7zXZ\x00", "an xz-compressed file", "decompress it first (xzcat FILE | choice ... -)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file", "decompress it first (zstdcat FILE | ...)"),
    (b"PK\x03\x04", "a zip archive (or an Excel workbook)", "export the table as CSV or Parquet"),
    (b"\xd0\xcf\x11\xe0", "an old Excel or Office file", "export the table as CSV or Parquet"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as CSV or Parquet"),
    (b"ARROW1", "an Arrow/Feather file", "write it as Parquet"),
    (b"\x89PNG", "a PNG image", "give the data file"),
    (b"%PDF", "a PDF document", "give the data file"),
    (b"\xff\xfe", "UTF-16 text", "save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text", "save it as UTF-8"),
)
SEPARATOR_HINTS = {";": "';'", "\t": "'\\t' (tab)", "|": "'|'"}


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


def csv_separator(text: str | None) -> str | None:
    """--separator: one ASCII character other than a quote or a line break ('\\t' or 'tab'
    for a tab); None where not given."""
    if text is None:
        return None
    separator = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(separator) != 1 or not separator.isascii() or separator in '"\r\n':
        raise UsageError(
            f"--separator must be one character such as ';', '|' or '\\t' (tab), not {text!r}"
        )
    return separator


def read_table(
    path: str,
    declared_format: str | None = None,
    select: Callable[[list[str]], list[str]] | None = None,
    separator: str | None = None,
) -> tuple[pl.DataFrame, str]:
    """Read a long-format table; returns the frame and the SHA-256 of the bytes read.

    `select` picks, from the table's column names, the ones to keep: a Parquet file reads
    only those (its bytes are never held whole), CSV and stdin are parsed whole first.
    `separator`: the CSV field separator (default: a tab for .tsv files, else a comma).
    """
    separator = csv_separator(separator)
    if path == "-":
        raw = _read_stream(sys.stdin.buffer, "<stdin>")
        where = "<stdin>"
    else:
        file = Path(path)
        kind = _file_kind(file, path)
        if kind == "file" and _is_parquet_file(file, declared_format):
            return _read_parquet_file(file, path, select), sha256_file(file)
        raw = file.read_bytes() if kind == "file" else _read_fifo(file, path)
        where = path
    if not raw.strip():
        raise DataError(f"{where}: the file is empty")
    digest = hashlib.sha256(raw).hexdigest()
    fmt = input_format(path, declared_format, raw[:4])
    if fmt == "parquet":
        frame = _read_parquet(raw, where)
    else:
        _check_is_text(raw, where)
        if separator is None:
            separator = "\t" if Path(path).suffix.lower() == ".tsv" else ","
        frame = _read_csv(_plain_lines(raw), where, separator)
        if frame.width == 1:
            _hint_separator(frame.columns[0], where, separator)
    if frame.height == 0:
        raise DataError(f"{where}: the table has no rows")
    return (frame if select is None else frame.select(select(frame.columns))), digest


def _file_kind(file: Path, path: str) -> str:
    """'file' for a regular file, 'stream' for a FIFO or socket; an error for anything else."""
    try:
        mode = file.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "stream"
    if stat.S_ISDIR(mode):
        raise DataError(f"{path}: is a directory, expected a Parquet or CSV file")
    raise DataError(
        f"{path}: is a device (a terminal, /dev/zero, ...), not a Parquet or CSV file; "
        "give a file, or - to read standard input"
    )


def _stream_limit() -> int:
    """The most bytes a stream may bring: STREAM_LIMIT_BYTES, else half the machine's memory."""
    if STREAM_LIMIT_BYTES is not None:
        return STREAM_LIMIT_BYTES
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 8 << 30


def _read_stream(handle, where: str, first: bytes = b"") -> bytes:
    """Everything a stream brings until it ends, within `_stream_limit()`."""
    limit = _stream_limit()
    chunks = [first] if first else []
    size = len(first)
    while chunk := handle.read(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > limit:
            raise DataError(
                f"{where}: more than {limit / 2**30:.3g} GiB came in without an end (half this "
                "machine's memory); is it an endless stream? Give the table as a file"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _read_fifo(file: Path, where: str) -> bytes:
    """A FIFO (or pipe) read to its end; one that nobody opens for writing within
    FIFO_WAIT_SECONDS is an error, not a wait for ever."""
    try:
        descriptor = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # returns at once, writer or not
    except OSError as exc:
        raise DataError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    try:
        deadline = time.monotonic() + FIFO_WAIT_SECONDS
        while True:
            try:
                first = os.read(descriptor, READ_CHUNK_BYTES)
            except BlockingIOError:  # a writer is there and has written nothing yet
                first = b""
                break
            if first:
                break
            if time.monotonic() > deadline:  # b"": nobody holds it open for writing
                raise DataError(
                    f"{where}: no program wrote to this FIFO within {FIFO_WAIT_SECONDS:g} s; "
                    "start the writer first, or give a file"
                )
            select.select([], [], [], FIFO_POLL_SECONDS)
        os.set_blocking(descriptor, True)
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            return _read_stream(handle, where, first)
    finally:
        os.close(descriptor)


def _check_is_text(raw: bytes, where: str) -> None:
    """A file that opens as a known non-table format (compressed, an image, UTF-16, ...) or
    holds NUL bytes is an error saying what it is."""
    if raw.startswith(PARQUET_MAGIC):
        raise DataError(
            f"{where}: holds Parquet, not CSV; pass --input-format parquet, or name it .parquet"
        )
    for magic, what, fix in NOT_TABLES:
        if raw.startswith(magic):
            raise DataError(f"{where}: is {what}, not a CSV or Parquet table; {fix}")
    if b"\x00" in raw[:4096]:
        raise DataError(
            f"{where}: holds NUL bytes, so it is a binary file, not a CSV or Parquet table"
        )


def _plain_lines(raw: bytes) -> bytes:
    """The CSV bytes without a UTF-8 byte-order mark, and with CR-only line ends (old Mac
    files) made LF."""
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM) :]
    if b"\r" in raw and b"\n" not in raw:
        raw = raw.replace(b"\r", b"\n")
    return raw


def _hint_separator(header: str, where: str, separator: str) -> None:
    """A table read as one column whose header holds another separator: say which to pass."""
    for candidate, written in SEPARATOR_HINTS.items():
        if candidate != separator and candidate in header:
            raise DataError(
                f"{where}: the file reads as one column named {header[:60]!r}, whose header "
                f"holds {written}; pass --separator {written.split()[0]} to split it there"
            )


def _encoding_error(raw: bytes, where: str) -> DataError | None:
    """An error naming the first line that is not UTF-8, if there is one."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    for start in range(0, len(raw), READ_CHUNK_BYTES):
        piece = raw[start : start + READ_CHUNK_BYTES]
        try:
            decoder.decode(piece, final=start + READ_CHUNK_BYTES >= len(raw))
        except UnicodeDecodeError as exc:
            # the decoder may hold up to 3 bytes of an unfinished character from before
            offset = max(start + exc.start - len(exc.object) + len(piece), 0)
            line = raw.count(b"\n", 0, offset) + 1
            column = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
            return DataError(
                f"{where}: line {line} is not UTF-8 text (byte 0x{raw[offset]:02x} at column "
                f"{column}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE)"
            )
    return None


def _csv_error(raw: bytes, where: str, exc: Exception) -> DataError:
    """The error for a CSV polars could not read: the line that is not UTF-8, if one is not."""
    return _encoding_error(raw, where) or DataError(f"{where}: cannot read CSV: {_first_line(exc)}")


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
        raise DataError(f"{file}: {start} rows read where the footer lists {n_rows}")
    pa.default_memory_pool().release_unused()  # the batches' memory: back to the system
    return {name: pl.Series(name, values) for name, values in arrays.items()}, n_rows


def _read_parquet(raw: bytes, where: str) -> pl.DataFrame:
    if not (raw.startswith(PARQUET_MAGIC) and raw.endswith(PARQUET_MAGIC)):
        head = raw[:4096]
        if not raw.startswith(PARQUET_MAGIC) and b"\x00" not in head and head.isascii():
            raise DataError(
                f"{where}: is text, not a Parquet file; pass --input-format csv, or name it .csv"
            )
        raise DataError(f"{where}: not a valid Parquet file (missing or truncated footer)")
    try:
        return pl.read_parquet(io.BytesIO(raw))
    except Exception as exc:  # polars/pyarrow raise many types for corrupt files
        raise DataError(f"{where}: cannot read Parquet: {_first_line(exc)}") from exc


def _check_ragged(raw: bytes, where: str, separator: str) -> None:
    """Every line holds as many fields as the header (quoted separators do not count)."""
    try:
        lines = pl.read_csv(
            io.BytesIO(raw), has_header=False, separator="\x1f", quote_char=None,
            new_columns=["line"], infer_schema=False,
        ).get_column("line")  # fmt: skip
    except Exception as exc:
        raise _csv_error(raw, where, exc) from exc
    lines = lines.fill_null("")
    if bool((lines.str.count_matches('"') % 2 == 1).any()):
        return  # a quoted cell holds a line break: records are not lines, polars parsed them
    blank = lines.str.strip_chars() == ""
    if bool(blank.all()):
        return
    fields = lines.str.replace_all(r'"[^"]*"', "").str.count_matches(separator, literal=True) + 1
    expected = int(fields[int((~blank).arg_true()[0])])
    bad = (fields != expected) & ~blank
    if bool(bad.any()):
        first = int(bad.arg_true()[0])
        raise DataError(
            f"{where}: line {first + 1} has {int(fields[first])} fields but the header has "
            f"{expected} ({int(bad.sum())} such lines); fix the rows or quote cells that hold "
            f"the separator {separator!r}"
        )


def _read_csv(raw: bytes, where: str, separator: str = ",") -> pl.DataFrame:
    """Read CSV as R and pandas do: trim cells, TRUE/FALSE as booleans, empty or NA as null.

    Polars' own typed reader goes first (several times faster, and it never holds every cell
    as text): its integer and float columns are what trimming and typing the text would give,
    and its text columns are trimmed and typed here; a column it typed otherwise (booleans,
    which it reads in any case) is read again as text. Where it fails (a line with too many
    fields) the table is read as text throughout.
    """
    typed = _read_csv_typed(raw, separator)
    if typed is None:
        _check_ragged(raw, where, separator)
        return _typed_text(_read_csv_text(raw, where, None, separator))
    if any(typed.null_count().row(0)):  # a null may be a line with too few fields
        _check_ragged(raw, where, separator)
    dtypes = typed.dtypes
    again = [i for i, dtype in enumerate(dtypes) if dtype not in CSV_KEPT_TYPES + (pl.String,)]
    text = _read_csv_text(raw, where, again, separator) if again else pl.DataFrame()
    columns = []
    for index, (name, dtype) in enumerate(zip(typed.columns, dtypes, strict=True)):
        series = typed.to_series(index)
        if dtype == pl.String:
            series = _typed_text(series.to_frame()).to_series()
        elif index in again:
            series = _typed_text(text.select(pl.nth(again.index(index)))).to_series()
        columns.append(series.alias(name if name else "_row"))
    return pl.DataFrame(columns)


def _read_csv_typed(raw: bytes, separator: str = ",") -> pl.DataFrame | None:
    """Polars' typed read (nulls: CSV_NULLS) with types from the first rows, else (a later value
    they do not hold) from all rows; None where both fail."""
    for infer_rows in (CSV_INFER_ROWS, None):
        try:
            return pl.read_csv(io.BytesIO(raw), infer_schema_length=infer_rows,
                               null_values=list(CSV_NULLS), separator=separator)  # fmt: skip
        except Exception:  # polars raises several types; the text read reports what is wrong
            continue
    return None


def _read_csv_text(
    raw: bytes, where: str, columns: list[int] | None, separator: str = ","
) -> pl.DataFrame:
    """Every cell (of the columns at these places, or of all) as the text in the file."""
    try:
        return pl.read_csv(io.BytesIO(raw), infer_schema=False, null_values=None, columns=columns,
                           separator=separator)  # fmt: skip
    except Exception as exc:
        raise _csv_error(raw, where, exc) from exc


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
