"""Shared helpers for the peer runners: thread pinning, the model spec, dense data, JSON output.

Every runner is started by run_bench.py in its own process as
`python bench/peers/NAME.py --data FILE.parquet --spec JSON [options]` and prints one JSON line
(the last line of stdout) with fit_seconds, log_likelihood and iterations.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import fnmatch  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402


@dataclass
class Spec:
    """The model to fit, as run_bench.py describes it.

    terms: (variable, variation) pairs in formula order; variable '1' is the intercept, a
    glob ('user_obs_*') names a block of columns, and variation is 'item', 'constant' or 'user'.
    nest: the column holding each alternative's nest (nested logit, one lambda per nest) or
    None; nest_terms: the nest-level formula's terms ('item' meaning nest), columns constant
    within (case, nest). groups: each glob's columns, filled by parse_args from the file.
    """

    terms: list[tuple[str, str]]
    nest: str | None = None
    nest_terms: list[tuple[str, str]] = field(default_factory=list)
    case: str = "case"
    item: str = "item"
    choice: str = "choice"
    user: str = "user"
    groups: dict[str, list[str]] = field(default_factory=dict)

    def columns_of(self, variable: str) -> list[str]:
        """The columns a term's variable names (a glob's matches, or itself)."""
        return self.groups.get(variable, [variable])

    @property
    def columns(self) -> list[str]:
        variables = [v for v, _ in self.terms + self.nest_terms if v != "1"]
        return list(dict.fromkeys(c for v in variables for c in self.columns_of(v)))

    @property
    def has_user_terms(self) -> bool:
        return any(variation == "user" for _, variation in self.terms + self.nest_terms)


@dataclass
class Dense:
    """A long table as padded (N, J) arrays; values are 0 where an alternative is absent."""

    items: list[str]  # (J,) labels, sorted; items[0] is the base alternative
    avail: np.ndarray  # (N, J) bool
    chosen: np.ndarray  # (N,) int, index of the chosen alternative
    x: dict[str, np.ndarray]  # column -> (N, J) float64
    user: np.ndarray  # (N,) int codes 0..U-1
    n_users: int
    nest_of_item: np.ndarray | None  # (J,) int codes 0..K-1
    nests: list[str] | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.avail.shape


def parse_args(description: str, extra: list[tuple[str, dict]] | None = None) -> argparse.Namespace:
    """--data, --spec (JSON) and any runner-specific options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", required=True, help="long-format Parquet file")
    parser.add_argument("--spec", required=True, help="model spec as JSON (see common.Spec)")
    for flag, kwargs in extra or []:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args()
    raw = json.loads(args.spec)
    raw["terms"] = [tuple(t) for t in raw["terms"]]
    raw["nest_terms"] = [tuple(t) for t in raw.get("nest_terms") or []]
    args.spec = Spec(**raw)
    names = pl.read_parquet_schema(args.data).names()
    for variable, _ in args.spec.terms + args.spec.nest_terms:
        if "*" in variable:
            args.spec.groups[variable] = [c for c in names if fnmatch.fnmatchcase(c, variable)]
    return args


def read_long(path: str, spec: Spec) -> pl.DataFrame:
    """The used columns of the long table, sorted by case then item."""
    keep = [spec.case, spec.item, spec.choice] + spec.columns
    if spec.has_user_terms:
        keep.append(spec.user)
    if spec.nest:
        keep.append(spec.nest)
    frame = pl.read_parquet(path, columns=list(dict.fromkeys(keep)))
    return frame.sort([spec.case, spec.item])


def to_dense(frame: pl.DataFrame, spec: Spec) -> Dense:
    """Pad the long table to (cases, alternatives) arrays."""
    items = frame.get_column(spec.item).unique().sort().to_list()
    codes = frame.select(
        (pl.col(spec.case).rank("dense") - 1).cast(pl.Int64).alias("n"),
        pl.col(spec.item)
        .replace_strict(items, list(range(len(items))), return_dtype=pl.Int64)
        .alias("j"),
    )
    n, j = codes["n"].to_numpy(), codes["j"].to_numpy()
    N, J = int(n.max()) + 1, len(items)
    avail = np.zeros((N, J), dtype=bool)
    avail[n, j] = True
    chosen = np.zeros(N, dtype=np.int64)
    hit = frame.get_column(spec.choice).to_numpy() == 1
    chosen[n[hit]] = j[hit]
    x = {}
    for name in spec.columns:
        column = np.zeros((N, J))
        column[n, j] = frame.get_column(name).cast(pl.Float64).to_numpy()
        x[name] = column
    user = np.zeros(N, dtype=np.int64)
    n_users = 1
    if spec.has_user_terms:
        labels = frame.get_column(spec.user)
        user_codes = (labels.rank("dense") - 1).cast(pl.Int64).to_numpy()
        user[n] = user_codes
        n_users = int(user_codes.max()) + 1
    nest_of_item, nests = None, None
    if spec.nest:
        pairs = frame.select(spec.item, spec.nest).unique().sort(spec.item)
        nests = pairs.get_column(spec.nest).unique().sort().to_list()
        nest_of_item = np.array([nests.index(v) for v in pairs.get_column(spec.nest)])
    return Dense(items, avail, chosen, x, user, n_users, nest_of_item, nests)


def case_constant(x: np.ndarray, avail: np.ndarray) -> bool:
    """True when a column does not vary across the available alternatives of any case."""
    high = np.where(avail, x, -np.inf).max(axis=1)
    low = np.where(avail, x, np.inf).min(axis=1)
    return bool(np.all(high == low))


def constant_within(x: np.ndarray, avail: np.ndarray, group: np.ndarray) -> bool:
    """True when a case-constant column takes one value within each group of cases (N,)."""
    value = per_case(x, avail)  # (N,)
    first = np.full(int(group.max()) + 1, np.nan)
    first[group[::-1]] = value[::-1]  # the value of each group's first case
    return bool(np.all(first[group] == value))


def item_constant(x: np.ndarray, avail: np.ndarray) -> bool:
    """True when a column takes one value per alternative across every case."""
    high = np.where(avail, x, -np.inf).max(axis=0)
    low = np.where(avail, x, np.inf).min(axis=0)
    return bool(np.all((high == low) | ~avail.any(axis=0)))


def per_item(x: np.ndarray, avail: np.ndarray) -> np.ndarray:
    """(J,) value of an item-constant column."""
    return np.where(avail, x, -np.inf).max(axis=0)


def per_nest(x: np.ndarray, avail: np.ndarray, nest_of_item: np.ndarray) -> np.ndarray:
    """(N, K) value of a column constant within (case, nest); 0 for a nest absent from a case."""
    K = int(nest_of_item.max()) + 1
    out = np.full((x.shape[0], K), -np.inf)
    for k in range(K):  # loop over nests, not rows
        members = nest_of_item == k
        out[:, k] = np.where(avail[:, members], x[:, members], -np.inf).max(axis=1)
    return np.where(np.isfinite(out), out, 0.0)


def per_case(x: np.ndarray, avail: np.ndarray) -> np.ndarray:
    """(N,) value of a case-constant column."""
    return np.where(avail, x, -np.inf).max(axis=1)


def emit(fit_seconds: float, log_likelihood: float, iterations: int | None, **extra) -> None:
    """Print the one JSON line run_bench.py reads."""
    record = {
        "fit_seconds": fit_seconds,
        "log_likelihood": log_likelihood,
        "iterations": iterations,
    } | extra
    sys.stdout.flush()
    print(json.dumps(record), flush=True)
