"""Long table to validated tensors and label maps.

Notation: R rows (one per case x offered alternative), N cases, J alternatives, U users.
Rows are sorted by case, then alternative; every per-row tensor below follows that order.
The tensors may share memory with the input table: they are read, never written in place.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import polars as pl
import torch

from choicecli.errors import DataError, UsageError
from choicecli.formula import suggest

ROW = "__row"
CHOSEN = "__chosen"
MISSING_MODES = ("error", "drop", "refuse")
# a used column whose largest magnitude lies outside these bounds is refused: its squares (in
# the Hessian and the rank check) overflow or vanish in float64. Fits of a column rescaled
# anywhere from 1e-150 to 1e+150 gave the same estimates to the last digits (times the scale).
LARGEST_MAGNITUDE = 1e100
SMALLEST_MAGNITUDE = 1e-100
# string and other looked-up role columns are coded this many rows at a time (a few MB each)
CODE_CHUNK_ROWS = 1 << 20


@dataclass(frozen=True)
class Roles:
    """Which columns of the long table play which part."""

    case: str = "case"
    item: str = "item"
    choice: str | None = "choice"
    user: str | None = None
    session: str | None = None
    available: str | None = None
    weights: str | None = None

    def names(self) -> list[str]:
        return [
            name
            for name in (
                self.case,
                self.item,
                self.choice,
                self.user,
                self.session,
                self.available,
                self.weights,
            )  # fmt: skip
            if name
        ]

    def check_distinct(self) -> None:
        """The case, item, choice, availability and weight columns are five different columns."""
        seen: dict[str, str] = {}
        for option in ("case", "item", "choice", "available", "weights"):
            column = getattr(self, option)
            if column is None:
                continue
            if column in seen:
                raise UsageError(
                    f"--{option} and --{seen[column]} both name column {column!r}; case, item, "
                    "choice, availability and weights each need a column of their own"
                )
            seen[column] = option


@dataclass
class ChoiceData:
    """A validated long table as tensors, rows sorted by (case, alternative).

    Once a model holds what it needs, `release_columns` and `release_rows` drop the per-row
    tensors; what a fit reads afterwards (counts per case and alternative, which columns are
    constant within alternatives) is kept.
    """

    roles: Roles
    item_labels: list  # (J,) labels in code order
    user_labels: list | None  # (U,)
    case_labels: pl.Series  # (N,) a Series, not a list: millions of Python objects otherwise
    case_index: torch.Tensor | None  # (R,) long, 0..N-1, non-decreasing; None once released
    item_index: torch.Tensor | None  # (R,) long, 0..J-1; None once released
    user_of_case: torch.Tensor | None  # (N,) long
    chosen: torch.Tensor | None  # (R,) float64 0/1, one 1 per case; None without or released
    columns: dict[str, torch.Tensor]  # name -> (R,) float64; empty once released
    source_row: torch.Tensor | None  # (R,) long: the row's position in the input table
    case_weights: torch.Tensor | None = None  # (N,) float64
    notes: list[str] = field(default_factory=list)  # what was done to the data, as asked
    warnings: list[str] = field(default_factory=list)  # what --strict turns into an error
    released: dict[str, bool] = field(default_factory=dict)  # released column -> constant in item
    n_rows: int = field(init=False)
    _sizes: torch.Tensor | None = field(default=None, init=False, repr=False)  # (N,)
    _choices: dict[bool, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.n_rows = int(self.case_index.shape[0])

    @property
    def n_cases(self) -> int:
        return len(self.case_labels)

    @property
    def n_items(self) -> int:
        return len(self.item_labels)

    @property
    def n_users(self) -> int:
        return len(self.user_labels) if self.user_labels is not None else 0

    @property
    def user_of_row(self) -> torch.Tensor | None:  # (R,)
        return None if self.user_of_case is None else self.user_of_case[self.case_index]

    def alternatives_per_case(self) -> torch.Tensor:  # (N,)
        if self._sizes is None:
            self._sizes = torch.bincount(self.case_index, minlength=self.n_cases)
        return self._sizes

    def choices_per_alternative(self, weighted: bool = False) -> torch.Tensor | None:  # (J,)
        """How often each alternative is chosen (each case counted by its weight if asked);
        None without a choice column."""
        if self.roles.choice is None:
            return None
        if weighted not in self._choices:
            chosen = self.chosen  # (R,)
            if weighted and self.case_weights is not None:
                chosen = self.case_weights[self.case_index] * chosen
            counts = torch.zeros(self.n_items, dtype=torch.float64)
            self._choices[weighted] = counts.index_add_(0, self.item_index, chosen)
        return self._choices[weighted]

    def constant_within_item(self, name: str) -> bool:
        """Whether column `name` takes one value per alternative (False if it is no column)."""
        if name in self.released:
            return self.released[name]
        if name not in self.columns:
            return False
        values = self.columns[name]  # (R,)
        n_rows = values.shape[0]
        for stop in dict.fromkeys((min(n_rows, 4096), n_rows)):  # a prefix settles most columns
            items = self.item_index[:stop]
            low = torch.full((self.n_items,), torch.inf, dtype=values.dtype)
            high = torch.full((self.n_items,), -torch.inf, dtype=values.dtype)
            low = low.scatter_reduce(0, items, values[:stop], "amin")  # (J,)
            high = high.scatter_reduce(0, items, values[:stop], "amax")  # (J,)
            if bool((high > low).any()):
                return False
        return bool((high == low).all())

    def release_columns(self) -> None:
        """Drop the value columns (a model holds its own copy), keeping what a fit still asks."""
        self.released |= {name: self.constant_within_item(name) for name in self.columns}
        self.columns = {}

    def release_rows(self) -> None:
        """Drop the (R,) case, alternative and choice vectors, counted first for the fit's
        statistics; call `release_columns` before (it reads the alternatives)."""
        if self.case_index is None:
            return
        self.alternatives_per_case()
        self.choices_per_alternative()
        self.choices_per_alternative(weighted=True)
        self.case_index = self.item_index = self.chosen = None


def check_columns(frame: pl.DataFrame, names: list[str], where: str) -> None:
    """Every named column exists; else one error listing the table's columns."""
    for name in names:
        if name not in frame.columns:
            raise DataError(
                f"{where}: no column {name!r}{suggest(name, frame.columns)} "
                f"(columns: {', '.join(frame.columns)})"
            )


def _role_codes(
    table: pl.DataFrame,
    name: str,
    labels: list | None,
    what: str,
    where: str,
    later: list,
    listed: bool = True,
) -> tuple[torch.Tensor, list | pl.Series]:
    """Codes (R,) long of a role column against `labels` (its own sorted distinct values when
    None, as a list if `listed`) and those labels; the column then leaves the table unless a
    role in `later` reads it."""
    if labels is None:
        codes, found = _codes(table, name, drop=name not in later)
        return codes, found.to_list() if listed else found
    codes = _tensor(encode(table, name, labels, what, where)).long()
    if name not in later:
        table.drop_in_place(name)  # with a consumed frame, its memory goes now
    return codes, labels


def _codes(table: pl.DataFrame, name: str, drop: bool) -> tuple[torch.Tensor, pl.Series]:
    """Each row's code (R,) long of column `name` and the labels it indexes: the distinct
    values in order, numeric ids numerically, others as sorted strings. `drop`: the column
    leaves the table.

    A numeric column already in order (cases usually are) is numbered where its value changes,
    in one pass and without polars; a dropped one goes (with a consumed frame, its memory)
    before its codes are made. Any other is looked up in its sorted distinct values, strings
    by slices straight into the codes.
    """
    series = table.drop_in_place(name) if drop else table.get_column(name)
    dtype = series.dtype
    if series.len() and (dtype.is_signed_integer() or dtype.is_float()):
        values = _tensor(series)  # (R,) a view
        if bool((values[1:] >= values[:-1]).all()):  # False at NaN: looked up below
            starts = torch.ones(values.shape[0], dtype=torch.bool)  # (R,) first row of a value
            torch.ne(values[1:], values[:-1], out=starts[1:])
            labels = pl.Series(series.name, values[starts].numpy())
            del values, series  # the last references to a dropped column
            # summed in place: torch.cumsum of a bool tensor makes a second (R,) long temporary
            codes = starts.long()  # (R,)
            codes.cumsum_(0)
            codes -= 1
            return codes, labels
    labels = series.unique().sort()
    if dtype.is_signed_integer():  # straight into int64 codes: no (R,) intermediate copies
        return torch.searchsorted(_tensor(labels), _tensor(series)), labels  # (R,)
    codes = torch.empty(series.len(), dtype=torch.long)  # (R,)
    for start in range(0, series.len(), CODE_CHUNK_ROWS):  # by slices: no (R,) intermediates
        found = labels.search_sorted(series.slice(start, CODE_CHUNK_ROWS)).to_numpy()  # unsigned
        codes[start : start + found.shape[0]] = torch.from_numpy(found.astype("int64", copy=False))
    return codes, labels


def shown(value: object) -> str:
    """A value for a message: numbers to 6 significant digits, text quoted."""
    return f"{value:.6g}" if isinstance(value, float) else repr(value)


def encode(frame: pl.DataFrame, column: str, labels: list, what: str, where: str) -> pl.Series:
    """Integer codes of `column` against `labels`; a value not in labels is an error."""
    known = pl.DataFrame({column: labels, "__code": range(len(labels))}, strict=False)
    mapping = known.cast({column: frame.schema[column]}, strict=False)
    coded = frame.select(column).join(mapping, on=column, how="left", maintain_order="left")
    missing = coded.filter(pl.col("__code").is_null())
    if missing.height:
        first = missing.get_column(column)[0]
        hint = ""
        if known.schema[column] != frame.schema[column]:
            hint = (
                f"; the model's {what} labels are {known.schema[column]} and this column is "
                f"{frame.schema[column]}"
            )
        if what == "user":
            hint += "; --unseen zero scores unseen users with their user coefficients at 0"
        raise DataError(
            f"{where}: {what} {shown(first)} in column {column!r} was not seen when the model "
            f"was fitted ({missing.height} rows); known: {', '.join(map(str, labels[:10]))}"
            + (" ..." if len(labels) > 10 else "")
            + hint
        )
    return coded.get_column("__code")


def load_choice_data(
    frame: pl.DataFrame,
    roles: Roles,
    used_columns: list[str],
    *,
    where: str,
    missing: str = "error",
    item_labels: list | None = None,
    user_labels: list | None = None,
    drop_single_alternative: bool = True,
    consume: bool = False,
) -> ChoiceData:
    """Validate the long table and turn it into tensors (no Python loop over rows or cases).

    Columns become tensors one at a time, without a copy where their type and order allow.
    missing: 'error' (suggesting --missing drop), 'drop', or 'refuse' (an error with no option
    to suggest: predict has none).
    consume: the caller hands the frame over; it is left empty, so each column's memory goes
    as its tensor comes and the data is held once (and `source_row` is None: no table is left
    for it to point into).
    """
    if missing not in MISSING_MODES:
        raise UsageError(f"--missing must be error or drop, not {missing!r}")
    roles.check_distinct()
    table, notes = _validated_table(frame, roles, used_columns, where, missing, consume)
    roles_used = set(roles.names())
    features = {  # the value columns leave polars first: its work below reuses their memory
        name: (_tensor(table.get_column(name)) if name in roles_used else _take(table, name))
        for name in used_columns
    }
    rows = _sorted_codes(table, roles, item_labels, user_labels, where)
    _check_cases(rows, roles, where)
    warnings: list[str] = []
    keep = None
    if drop_single_alternative:
        keep = _single_alternative_rows(rows.case_index, rows.case_labels, warnings)
        if not bool(keep.any()):
            raise DataError(f"{where}: no cases left to fit after the checks above")
    positions = _drop_rows(rows, keep)  # (R,) the table's rows in output order; None: as they are
    first_row = _first_row_of_case(rows.case_index, len(rows.case_labels))  # (N,)

    def in_rows(column: torch.Tensor) -> torch.Tensor:
        return column if positions is None else column[positions]

    columns = {name: in_rows(features.pop(name).double()) for name in used_columns}
    return ChoiceData(
        roles=roles,
        item_labels=rows.item_labels,
        user_labels=rows.user_labels,
        case_labels=rows.case_labels,
        case_index=rows.case_index,
        item_index=rows.item_index,
        user_of_case=None if rows.users is None else rows.users[first_row],
        chosen=rows.chosen,
        columns=columns,
        source_row=None if consume else in_rows(_take(table, ROW).long()),
        case_weights=None if rows.weights is None else rows.weights[first_row],
        notes=notes,
        warnings=warnings,
    )


@dataclass
class _Rows:
    """The role columns of a validated table as codes, rows in (case, alternative) order."""

    case_index: torch.Tensor  # (R,) long
    item_index: torch.Tensor  # (R,) long
    case_labels: pl.Series  # (N,)
    item_labels: list  # (J,)
    user_labels: list | None  # (U,)
    users: torch.Tensor | None  # (R,) long
    sessions: torch.Tensor | None  # (R,) long
    weights: torch.Tensor | None  # (R,) float64
    chosen: torch.Tensor | None  # (R,) float64 0/1
    order: torch.Tensor | None  # (R,) the table's rows in this order; None: already sorted


def _validated_table(
    frame: pl.DataFrame,
    roles: Roles,
    used_columns: list[str],
    where: str,
    missing: str,
    consume: bool,
) -> tuple[pl.DataFrame, list[str]]:
    """The role and used columns, checked: numbers where numbers are needed, missing values
    refused or dropped, the choice made a 0/1 flag (CHOSEN), unavailable rows left out; and
    notes on what was dropped. A row number (ROW) goes along for the messages; a consumed
    frame is left empty, and the row number goes once the checks are done."""
    check_columns(frame, roles.names() + used_columns, where)
    table = frame.select(list(dict.fromkeys(roles.names() + used_columns))).with_row_index(ROW)
    if consume:
        for name in frame.columns:
            frame.drop_in_place(name)
    decimals = [name for name, dtype in table.schema.items() if dtype.is_decimal()]
    if decimals:  # exact decimals are fitted as float64 numbers
        table = table.with_columns(pl.col(decimals).cast(pl.Float64))
    notes: list[str] = []
    numbers = used_columns + [c for c in (roles.weights,) if c]
    table = _check_numeric(table, numbers, where)
    table = _handle_missing(table, roles, used_columns, missing, where, notes)
    _check_scale(table, numbers, roles.case, where)
    if roles.weights:
        _check_weights(table, roles.weights, roles.case, where)
    if roles.choice:
        table = table.with_columns(_chosen_flag(table, roles.choice, where))
        others = used_columns + [n for n in roles.names() if n != roles.choice]
        if consume and roles.choice not in others:  # the flag replaces it: it goes now
            table.drop_in_place(roles.choice)
    if roles.available:
        table = _apply_availability(table, roles, where, notes)
    if table.height == 0:
        raise DataError(f"{where}: no rows left to fit after the checks above")
    if consume:
        table.drop_in_place(ROW)  # only the messages above cite rows: no source_row to give
    return table, notes


def _sorted_codes(
    table: pl.DataFrame,
    roles: Roles,
    item_labels: list | None,
    user_labels: list | None,
    where: str,
) -> _Rows:
    """Each role column as codes (labels given, or its own sorted values), rows sorted by
    (case, alternative); a role column leaves the table once coded, unless a later one reads it."""
    later = [roles.case, roles.user, roles.session, roles.weights]
    item_index, item_labels = _role_codes(table, roles.item, item_labels, "alternative", where,
                                          later)  # fmt: skip
    case_index, case_labels = _role_codes(table, roles.case, None, "case", where, later[1:],
                                          listed=False)  # fmt: skip
    users = sessions = None
    if roles.user:
        users, user_labels = _role_codes(table, roles.user, user_labels, "user", where, later[2:])
    if roles.session:
        sessions, _ = _role_codes(table, roles.session, None, "session", where, later[3:])
    order = _sort_order(case_index, item_index, len(item_labels))  # None: already sorted

    def in_order(values: torch.Tensor | None) -> torch.Tensor | None:
        return values if values is None or order is None else values[order]

    weights = _take(table, roles.weights).double() if roles.weights else None
    chosen = _take(table, CHOSEN).double() if roles.choice else None
    return _Rows(
        case_index=in_order(case_index),
        item_index=in_order(item_index),
        case_labels=case_labels,
        item_labels=item_labels,
        user_labels=user_labels,
        users=in_order(users),
        sessions=in_order(sessions),
        weights=in_order(weights),
        chosen=in_order(chosen),
        order=order,
    )


def _check_cases(rows: _Rows, roles: Roles, where: str) -> None:
    """One row per (case, alternative); one user, session and weight per case; one choice."""
    _check_duplicates(rows.case_index, rows.item_index, rows.case_labels, rows.item_labels, where)
    within_case = [
        (roles.user, "user", rows.users),
        (roles.session, "session", rows.sessions),
        (roles.weights, "weight", rows.weights),
    ]
    for name, what, values in within_case:
        if values is not None:
            _check_constant_within_case(
                rows.case_index, values, rows.case_labels, name, what, where
            )
    if rows.chosen is not None:
        _check_one_chosen(rows.case_index, rows.chosen, rows.case_labels, roles.choice, where)


def _drop_rows(rows: _Rows, keep: torch.Tensor | None) -> torch.Tensor | None:
    """Leave out the rows `keep` (R,) bool does not hold, renumbering the cases; returns the
    table's rows in output order (R_kept,), or None: all of them, as they are."""
    if keep is None or bool(keep.all()):  # usually nothing is dropped, and nothing is copied
        return rows.order
    kept_cases = torch.zeros(len(rows.case_labels), dtype=torch.bool)
    kept_cases[rows.case_index[keep]] = True
    new_code = torch.cumsum(kept_cases.long(), 0) - 1  # (N_old,) compacted case codes
    rows.case_index = new_code[rows.case_index[keep]]
    rows.case_labels = rows.case_labels.filter(pl.Series(kept_cases.numpy()))
    rows.item_index = rows.item_index[keep]
    rows.users = None if rows.users is None else rows.users[keep]
    rows.weights = None if rows.weights is None else rows.weights[keep]
    rows.chosen = None if rows.chosen is None else rows.chosen[keep]
    rows.sessions = None  # checked; nothing reads them now
    return keep.nonzero().flatten() if rows.order is None else rows.order[keep]


def _tensor(series: pl.Series) -> torch.Tensor:
    """The series as a tensor: a read-only view of its memory if it is one chunk, else a copy.

    The copy is torch's own, joined from views of the chunks (polars would rechunk into
    memory of its own allocator, which keeps freed pages for a while).
    """
    if series.dtype == pl.Boolean:
        series = series.cast(pl.Int8)
    with warnings.catch_warnings():  # read-only memory: these tensors are never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        parts = [torch.from_numpy(chunk.to_numpy()) for chunk in series.get_chunks()]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts) if parts else torch.from_numpy(series.to_numpy())


def _take(table: pl.DataFrame, name: str) -> torch.Tensor:
    """Move a column out of the table into a tensor (the table no longer holds it)."""
    return _tensor(table.drop_in_place(name))


def _sort_order(
    case_index: torch.Tensor, item_index: torch.Tensor, n_items: int
) -> torch.Tensor | None:
    """Positions that sort the rows by (case, alternative); None if they already are. (R,)

    Sorted rows are recognised from their neighbours, without an (R,) key.
    """
    later_case = case_index[1:] > case_index[:-1]  # (R-1,) bool
    later_item = (case_index[1:] == case_index[:-1]) & (item_index[1:] >= item_index[:-1])
    if bool((later_case | later_item).all()):
        return None
    return torch.argsort(case_index * n_items + item_index, stable=True)  # (R,)


def _filter_rows(table: pl.DataFrame, keep: pl.Expr) -> pl.DataFrame:
    """The rows where `keep` holds, column by column: the table is left empty, never held twice."""
    mask = table.select(keep).to_series()
    return pl.DataFrame([table.drop_in_place(name).filter(mask) for name in table.columns])


def _first_row_of_case(case_index: torch.Tensor, n_cases: int) -> torch.Tensor:
    """Index of each case's first row (rows are sorted by case). (N,)"""
    sizes = torch.bincount(case_index, minlength=n_cases)
    return torch.cumsum(sizes, 0) - sizes


def _check_numeric(table: pl.DataFrame, names: list[str], where: str) -> pl.DataFrame:
    """Used columns are numbers or true/false; text that reads as numbers is converted."""
    casts = []
    for name in dict.fromkeys(names):
        dtype = table.schema[name]
        if dtype == pl.Boolean:
            casts.append(pl.col(name).cast(pl.Float64))
        elif dtype == pl.String:
            converted = pl.col(name).str.strip_chars().cast(pl.Float64, strict=False)
            bad = table.filter(converted.is_null() & pl.col(name).is_not_null())
            if bad.height:
                raise DataError(
                    f"{where}: column {name!r} has {bad.height} non-numeric values (first "
                    f"{shown(bad.get_column(name)[0])} at row {bad.get_column(ROW)[0] + 1}); "
                    "a formula can only use numeric or true/false columns"
                )
            casts.append(converted.alias(name))
        elif not dtype.is_numeric():
            raise DataError(
                f"{where}: column {name!r} is {dtype}, not numeric; "
                "a formula can only use numeric or true/false columns"
            )
    return table.with_columns(casts) if casts else table


def _handle_missing(
    table: pl.DataFrame, roles: Roles, used: list[str], missing: str, where: str, notes: list[str]
) -> pl.DataFrame:
    """Nulls/NaN in used columns: an error, or drop their cases with --missing drop."""
    case = roles.case
    hint = "" if missing == "refuse" else ", or pass --missing drop to drop those cases"
    for name in roles.names():
        nulls = table.get_column(name).null_count()
        if nulls:
            hit = table.filter(pl.col(name).is_null())
            at = f"row {hit.get_column(ROW)[0] + 1}"
            if name != case:
                at = f"case {hit.get_column(case)[0]!r}, {at}"
            raise DataError(
                f"{where}: column {name!r} has {nulls} empty values (first: {at}); fill them in"
            )
    floats = [name for name in used + ([roles.weights] if roles.weights else [])]
    if missing != "drop":
        for name in floats:
            infinite = table.filter(pl.col(name).is_infinite())
            if infinite.height:
                raise DataError(
                    f"{where}: column {name!r} has {infinite.height} infinite values (first in "
                    f"case {infinite.get_column(case)[0]!r}); replace them{hint}"
                )
    if not floats:
        return table
    bad_row = pl.any_horizontal(
        [pl.col(n).is_null() | pl.col(n).is_nan() | pl.col(n).is_infinite() for n in floats]
    )
    bad_cases = table.filter(bad_row).get_column(case).unique(maintain_order=True)
    if bad_cases.len() == 0:
        return table
    if missing == "drop":
        kept = _filter_rows(table, ~pl.col(case).is_in(bad_cases.implode()))
        notes.append(
            f"dropped {bad_cases.len()} cases with null, NaN or infinite values in used columns "
            f"(--missing drop); {kept.get_column(case).n_unique()} cases remain"
        )
        return kept
    for name in floats:
        hit = table.filter(pl.col(name).is_null() | pl.col(name).is_nan())
        if hit.height:
            n_cases = hit.get_column(case).n_unique()
            raise DataError(
                f"{where}: column {name!r} has null or NaN values in {n_cases} cases "
                f"(first: case {hit.get_column(case)[0]!r}); fill them in{hint}"
            )
    return table


def _check_scale(table: pl.DataFrame, names: list[str], case: str, where: str) -> None:
    """A column whose values are all far larger or far smaller than 1 (beyond LARGEST_MAGNITUDE
    or SMALLEST_MAGNITUDE, zeros aside) is refused, naming the factor that rescales it."""
    if not names:
        return
    names = list(dict.fromkeys(names))
    # the largest magnitude from the least and the greatest value: no (R,) temporaries
    ends = table.select(
        [pl.col(n).min().alias(f"{i}-") for i, n in enumerate(names)]
        + [pl.col(n).max().alias(f"{i}+") for i, n in enumerate(names)]
    ).row(0)
    for index, name in enumerate(names):
        low, high = ends[index], ends[len(names) + index]
        if low is None or high is None:
            continue
        value = max(abs(float(low)), abs(float(high)))
        if value == 0 or not math.isfinite(value):
            continue
        if SMALLEST_MAGNITUDE <= value <= LARGEST_MAGNITUDE:
            continue
        factor = f"{10.0 ** round(math.log10(value)):.0e}"
        hit = table.filter(pl.col(name).cast(pl.Float64).abs() == value)
        at = f"case {hit.get_column(case)[0]!r}, row {hit.get_column(ROW)[0] + 1}"
        if value > LARGEST_MAGNITUDE:
            problem = f"has values as large as {value:.3g} (first: {at})"
            fix = f"divide it by {factor}"
        else:
            problem = f"has no value larger than {value:.3g} in magnitude (first: {at})"
            fix = f"multiply it by {1 / float(factor):.0e}"
        raise DataError(
            f"{where}: column {name!r} {problem}; numbers this far from 1 overflow or vanish "
            f"when the fit squares them: rescale the column ({fix}) and run again"
        )


def _check_weights(table: pl.DataFrame, name: str, case: str, where: str) -> None:
    """Weights are 0 or more, and not all 0."""
    negative = table.filter(pl.col(name) < 0)
    if negative.height:
        raise DataError(
            f"{where}: weight column {name!r} has {negative.height} negative values (first: "
            f"{shown(negative.get_column(name)[0])} in case {negative.get_column(case)[0]!r}, "
            f"row {negative.get_column(ROW)[0] + 1}); weights must be 0 or more"
        )
    if not bool(table.select((pl.col(name) != 0).any()).item()):
        raise DataError(
            f"{where}: every weight in column {name!r} is 0, so no case counts; "
            "give the cases to fit a positive weight"
        )


def _chosen_flag(table: pl.DataFrame, name: str, where: str) -> pl.Expr:
    series = table.get_column(name)
    if series.dtype == pl.Boolean:
        return pl.col(name).alias(CHOSEN)
    if not series.dtype.is_numeric():
        text = pl.col(name).cast(pl.String).str.strip_chars()
        bad = table.filter(~text.is_in(["0", "1", "TRUE", "FALSE", "true", "false"]))
        if bad.height:
            raise DataError(
                f"{where}: choice column {name!r} has {bad.height} values that are not 0/1 or "
                f"true/false (first {shown(bad.get_column(name)[0])} at row "
                f"{bad.get_column(ROW)[0] + 1}); mark the chosen row with 1 and the others with 0"
            )
        return text.is_in(["1", "TRUE", "true"]).alias(CHOSEN)
    # integers, and floats (pandas writes 0.0/1.0), compared in their own type: no copy
    flags = pl.Series([0, 1]).cast(series.dtype)
    bad = table.filter(~pl.col(name).is_in(flags.implode()))  # NaN too
    if bad.height:
        raise DataError(
            f"{where}: choice column {name!r} has values other than 0/1 ({bad.height} rows, "
            f"first {shown(bad.get_column(name)[0])} at row {bad.get_column(ROW)[0] + 1}); "
            "mark the chosen row with 1 and the others with 0"
        )
    return (pl.col(name) == 1).alias(CHOSEN)


def _apply_availability(
    table: pl.DataFrame, roles: Roles, where: str, notes: list[str]
) -> pl.DataFrame:
    name = roles.available
    series = table.get_column(name)
    if not (series.dtype == pl.Boolean or series.dtype.is_numeric()):
        raise DataError(
            f"{where}: availability column {name!r} is {series.dtype}; it must be 0/1 or true/false"
        )
    available = pl.col(name).cast(pl.Float64)
    bad = table.filter(~available.is_in([0.0, 1.0]))  # NaN too
    if bad.height:
        raise DataError(
            f"{where}: availability column {name!r} has {bad.height} values that are not 0/1 "
            f"(first {shown(bad.get_column(name)[0])} at row {bad.get_column(ROW)[0] + 1}); "
            "mark available rows with 1 and unavailable ones with 0"
        )
    available = available == 1.0
    if roles.choice:
        bad = table.filter(pl.col(CHOSEN) & ~available)
        if bad.height:
            raise DataError(
                f"{where}: {bad.height} cases choose an alternative marked unavailable in "
                f"{name!r} (first: case {bad.get_column(roles.case)[0]!r}); fix the data"
            )
    height = table.height
    kept = _filter_rows(table, available)
    if kept.height < height:
        notes.append(f"{height - kept.height} rows marked unavailable in {name!r} left out")
    return kept


def _check_duplicates(
    case_index: torch.Tensor, item_index: torch.Tensor, case_labels, item_labels, where: str
) -> None:
    repeated = (case_index[1:] == case_index[:-1]) & (item_index[1:] == item_index[:-1])
    if bool(repeated.any()):
        first = int(repeated.nonzero()[0])
        raise DataError(
            f"{where}: {int(repeated.sum())} (case, alternative) pairs appear more than once "
            f"(first: case {case_labels[int(case_index[first])]!r}, alternative "
            f"{item_labels[int(item_index[first])]!r}); keep one row per case and alternative"
        )


def _check_constant_within_case(
    case_index: torch.Tensor, values: torch.Tensor, case_labels, name: str, what: str, where: str
) -> None:
    changes = (case_index[1:] == case_index[:-1]) & (values[1:] != values[:-1])
    if bool(changes.any()):
        cases = case_index[1:][changes].unique()
        raise DataError(
            f"{where}: the {what} column {name!r} changes within {cases.numel()} cases "
            f"(first: case {case_labels[int(cases[0])]!r}); each case has one {what}"
        )


def _check_one_chosen(
    case_index: torch.Tensor, chosen: torch.Tensor, case_labels, name: str, where: str
) -> None:
    count = torch.bincount(case_index, weights=chosen, minlength=len(case_labels))  # (N,)
    for bad, detail in ((count == 0, "no chosen row"), (count > 1, "several chosen rows")):
        if bool(bad.any()):
            first = case_labels[int(bad.nonzero()[0])]
            cases = f"{int(bad.sum()):,} cases have" if int(bad.sum()) > 1 else "1 case has"
            raise DataError(
                f"{where}: {cases} {detail} in {name!r} "
                f"(first: case {first!r}); each case needs exactly one"
            )


def _single_alternative_rows(
    case_index: torch.Tensor, case_labels: pl.Series, notes: list[str]
) -> torch.Tensor:
    """Rows to keep: cases with a single alternative carry no information. (R,) bool"""
    sizes = torch.bincount(case_index, minlength=len(case_labels))  # (N,)
    single = sizes < 2
    if bool(single.any()):
        first = case_labels[int(single.nonzero()[0])]
        notes.append(
            f"dropped {int(single.sum())} cases with a single alternative (they carry no "
            f"information; first: case {first!r})"
        )
    return ~single[case_index]
