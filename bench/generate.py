"""Seeded synthetic long-format choice data for the benchmark scenarios.

Each data set is written once to bench/data/NAME.parquet (and NAME.csv where a scenario needs it),
with NAME.truth.json holding the true coefficients. Generation is vectorised and not timed.

Columns: case, item (string labels), user, choice (0/1), x1..x4 (vary by case x item), income
(constant within case), and nest (string, nested data only).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

DATA_DIR = Path(__file__).resolve().parent / "data"
GENERATOR_VERSION = 1  # bump to regenerate cached files after a change here


@dataclass(frozen=True)
class DataSpec:
    """What to simulate."""

    name: str
    cases: int
    items: int
    missing: float = 0.10  # probability that an alternative is absent from a case
    users: int = 1000
    user_slopes: bool = False  # x1 slope varies by user, no other generic slopes but x2
    nests: int = 0  # 0: conditional logit; else nested logit with this many nests
    csv: bool = False
    seed: int = 12345


DATASETS: dict[str, DataSpec] = {
    spec.name: spec
    for spec in [
        DataSpec("cl_10k", 10_000, 10, csv=True),
        DataSpec("cl_100k", 100_000, 10),
        DataSpec("cl_1m", 1_000_000, 10, csv=True),
        DataSpec("cl_10m", 1_111_111, 10),  # 10M rows: the memory scenario
        DataSpec("cl_10m_cases", 10_000_000, 10),  # 90M rows: choice on a GPU
        DataSpec("cl_100alts", 100_000, 100),
        DataSpec("users_1k", 100_000, 10, users=1000, user_slopes=True),
        DataSpec("nested_3", 100_000, 10, nests=3),
    ]
}


def item_labels(items: int) -> list[str]:
    """Zero-padded labels, so string order is numeric order ('alt000' is the base)."""
    width = max(2, len(str(items - 1)))
    return [f"alt{j:0{width}d}" for j in range(items)]


def availability(rng: np.random.Generator, cases: int, items: int, missing: float) -> np.ndarray:
    """(N, J) bool: each alternative absent with probability `missing`, at least 2 per case."""
    avail = rng.random((cases, items)) >= missing
    short = np.flatnonzero(avail.sum(axis=1) < 2)
    while short.size:
        avail[short] = rng.random((short.size, items)) >= missing
        short = short[avail[short].sum(axis=1) < 2]
    return avail


def true_coefficients(rng: np.random.Generator, spec: DataSpec) -> dict:
    """Known coefficients; the base alternative (index 0) has zero intercept and income slope."""
    J = spec.items
    asc = np.concatenate([[0.0], rng.normal(0.0, 0.5, J - 1)])
    truth: dict = {"intercept[item]": asc.tolist()}
    if spec.user_slopes:
        truth["x1[user]"] = rng.normal(-0.8, 0.4, spec.users).tolist()
        truth["x2[constant]"] = 0.6
    else:
        truth |= {
            "x1[constant]": -1.0,
            "x2[constant]": 0.5,
            "x3[constant]": 0.8,
            "x4[constant]": -0.3,
        }
        truth["income[item]"] = np.concatenate([[0.0], rng.normal(0.0, 0.3, J - 1)]).tolist()
    if spec.nests:
        truth["lambda[nest]"] = np.linspace(0.5, 0.8, spec.nests).tolist()
    return truth


def utilities(
    spec: DataSpec, truth: dict, x: np.ndarray, income: np.ndarray, user: np.ndarray
) -> np.ndarray:
    """(N, J) systematic utilities; x is (4, N, J), income (N,), user (N,)."""
    V = np.broadcast_to(np.asarray(truth["intercept[item]"]), x.shape[1:]).copy()
    if spec.user_slopes:
        V += np.asarray(truth["x1[user]"])[user][:, None] * x[0]
        V += truth["x2[constant]"] * x[1]
    else:
        for k in range(4):
            V += truth[f"x{k + 1}[constant]"] * x[k]
        V += income[:, None] * np.asarray(truth["income[item]"])
    return V


def nest_of_item(items: int, nests: int) -> np.ndarray:
    """(J,) nest index of each alternative: contiguous, nearly equal blocks."""
    return np.arange(items) * nests // items


def choose(
    rng: np.random.Generator, spec: DataSpec, truth: dict, V: np.ndarray, avail: np.ndarray
) -> np.ndarray:
    """(N,) index of the chosen alternative among the available ones."""
    if not spec.nests:  # Gumbel trick for the conditional logit
        U = np.where(avail, V + rng.gumbel(size=V.shape), -np.inf)
        return U.argmax(axis=1)
    lam = np.asarray(truth["lambda[nest]"])[nest_of_item(spec.items, spec.nests)]  # (J,)
    s = np.where(avail, V / lam, -np.inf)
    members = np.eye(spec.nests, dtype=bool)[nest_of_item(spec.items, spec.nests)]  # (J, K)
    shift = s.max(axis=1, keepdims=True)
    e = np.exp(s - shift)  # (N, J), 0 where unavailable
    with np.errstate(divide="ignore"):
        inclusive = np.log(e @ members) + shift  # (N, K), -inf for an empty nest
    with np.errstate(invalid="ignore"):
        a = np.where(np.isfinite(inclusive), inclusive * truth["lambda[nest]"], -np.inf)
    p_nest = np.exp(a - a.max(axis=1, keepdims=True))
    p_nest /= p_nest.sum(axis=1, keepdims=True)
    within = e / np.maximum(e @ members @ members.T, 1e-300)  # P(j | nest of j)
    P = within * (p_nest @ members.T)
    cdf = np.cumsum(P, axis=1)
    draw = rng.random((V.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < draw).sum(axis=1), spec.items - 1)


def simulate(spec: DataSpec) -> tuple[pl.DataFrame, dict]:
    """The long table (rows sorted by case, then item) and the true coefficients."""
    rng = np.random.default_rng(spec.seed)
    N, J = spec.cases, spec.items
    truth = true_coefficients(rng, spec)
    avail = availability(rng, N, J, spec.missing)
    x = rng.normal(0.0, 1.0, (4, N, J))
    income = rng.gamma(4.0, 0.5, N)  # positive, mean 2
    user = rng.integers(0, spec.users, N)
    chosen = choose(rng, spec, truth, utilities(spec, truth, x, income, user), avail)

    case_idx, item_idx = np.nonzero(avail)  # row-major: sorted by case, then item
    columns: dict[str, pl.Series] = {
        "case": pl.Series("case", case_idx + 1, dtype=pl.Int64),
        "item": pl.Series("item", item_labels(J)).gather(item_idx),
        "user": pl.Series("user", user[case_idx] + 1, dtype=pl.Int64),
        "choice": pl.Series("choice", (chosen[case_idx] == item_idx).astype(np.int8)),
    }
    for k in range(4):
        columns[f"x{k + 1}"] = pl.Series(f"x{k + 1}", x[k][case_idx, item_idx])
    columns["income"] = pl.Series("income", income[case_idx])
    if spec.nests:
        nest_names = pl.Series("nest", [f"nest{k}" for k in range(spec.nests)])
        columns["nest"] = nest_names.gather(nest_of_item(J, spec.nests)[item_idx])
    return pl.DataFrame(list(columns.values())), truth


def paths(name: str) -> dict[str, Path]:
    """Where a data set's files live."""
    return {
        "parquet": DATA_DIR / f"{name}.parquet",
        "csv": DATA_DIR / f"{name}.csv",
        "truth": DATA_DIR / f"{name}.truth.json",
    }


def ensure(name: str, quiet: bool = False) -> dict[str, Path]:
    """Generate a data set unless its files already exist (for this generator version)."""
    spec = DATASETS[name]
    where = paths(name)
    if where["truth"].exists():
        meta = json.loads(where["truth"].read_text())
        complete = where["parquet"].exists() and (where["csv"].exists() or not spec.csv)
        if meta.get("generator_version") == GENERATOR_VERSION and complete:
            return where
    if not quiet:
        print(f"generating {name} ({spec.cases:,} cases x {spec.items} alternatives)", flush=True)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    frame, truth = simulate(spec)
    frame.write_parquet(where["parquet"])
    if spec.csv:
        frame.write_csv(where["csv"])
    meta = {
        "generator_version": GENERATOR_VERSION,
        "spec": spec.__dict__,
        "rows": frame.height,
        "truth": truth,
    }
    where["truth"].write_text(json.dumps(meta, indent=1))
    return where


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list(DATASETS), help="data sets to generate")
    args = parser.parse_args()
    for name in args.names:
        print(name, ensure(name)["parquet"])


if __name__ == "__main__":
    main()
