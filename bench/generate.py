"""Seeded synthetic long-format choice data for the benchmark scenarios.

Each data set is written once to bench/data/NAME.parquet (and NAME.csv where a scenario needs it),
with NAME.truth.json holding the true coefficients. Generation is vectorised and not timed.

Columns: case, item (string labels), user, choice (0/1), x1..x4 (vary by case x item), income
(constant within case), and nest (string, nested data only).

Tutorial-shaped data sets (`TutorialSpec`: torch-choice's post-estimation tutorial, issue 14) have
every item offered, items in nests of equal size, and standard normal observables of every kind:
`user_obs_*` (constant within user), `item_obs_*` (constant within item), `session_obs_*`
(constant within session), `itemsession_obs_*` (case x item) and `nest_obs_*` (constant within
case x nest), or for `design="large"` x1..x3 (case x item) and z (case x nest). Choices are drawn
uniformly at random (`truth=None`, as in the tutorial) or from a nested logit with known
coefficients.
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


@dataclass(frozen=True)
class TutorialSpec:
    """A tutorial-shaped nested data set: every item offered, `nests` nests of equal size.

    design "tutorial": the tutorial's observables (8 user, 4 item, 3 session, 2 item-session,
    4 nest); "large": x1..x3 by case x item, z by case x nest. simulated False: choices uniform
    at random (the tutorial's); True: drawn from a nested logit with known coefficients
    (`tutorial_truth` / `large_truth`), per-user terms at both levels, lambdas 0.5 to 0.8.
    """

    name: str
    cases: int
    items: int = 25
    nests: int = 5
    users: int = 100
    sessions: int = 500
    design: str = "tutorial"  # or "large"
    simulated: bool = False
    csv: bool = False
    missing: float = 0.0  # every item offered
    seed: int = 12345


TUTORIAL_OBSERVABLES = {"user": 8, "item": 4, "session": 3, "itemsession": 2, "nest": 4}


DATASETS: dict[str, DataSpec | TutorialSpec] = {
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
        TutorialSpec("tutorial_random", 10_000),  # the tutorial's data: random choices
        TutorialSpec("tutorial_sim", 10_000, simulated=True),  # an interior optimum
        TutorialSpec("nested_100k", 100_000, users=1000, design="large", simulated=True),
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


def nested_draw(
    rng: np.random.Generator, Y: np.ndarray, W: np.ndarray, lam: np.ndarray, nest: np.ndarray
) -> np.ndarray:
    """(N,) chosen item of a dense nested logit: Y (N, J) item utilities, W (N, K) nest
    utilities, lam (K,), nest (J,) nest of each item (DESIGN.md section 3)."""
    members = np.eye(W.shape[1], dtype=bool)[nest]  # (J, K)
    s = Y / lam[nest]  # (N, J)
    shift = s.max(axis=1, keepdims=True)
    e = np.exp(s - shift)  # (N, J)
    inclusive = np.log(e @ members) + shift  # (N, K)
    a = W + lam * inclusive  # (N, K)
    p_nest = np.exp(a - a.max(axis=1, keepdims=True))
    p_nest /= p_nest.sum(axis=1, keepdims=True)
    P = e / (e @ members @ members.T) * (p_nest @ members.T)  # (N, J)
    cdf = np.cumsum(P, axis=1)
    draw = rng.random((Y.shape[0], 1)) * cdf[:, -1:]
    return np.minimum((cdf < draw).sum(axis=1), Y.shape[1] - 1)


def tutorial_truth(rng: np.random.Generator, spec: TutorialSpec) -> dict:
    """Known coefficients of the tutorial's identified terms (modest; lambdas 0.5 to 0.8).

    Item level: intercept[item], user_obs_*[item], itemsession_obs_*[item] and
    itemsession_obs_*[user]; nest level: intercept[nest], nest_obs_*[user]. The tutorial's
    other terms ((1|constant), (1|user), (item_obs_*|constant), (session_obs_*|user) and the
    nest-level (1|user)) cannot be estimated (they cancel, or are collinear with the item
    intercepts) and are zero here.
    """
    J, K, U = spec.items, spec.nests, spec.users
    counts = TUTORIAL_OBSERVABLES
    first = np.array([0.0])
    return {
        "intercept[item]": np.concatenate([first, rng.normal(0.0, 0.5, J - 1)]).tolist(),
        "user_obs[item]": np.vstack(
            [np.zeros((1, counts["user"])), rng.normal(0.0, 0.1, (J - 1, counts["user"]))]
        ).tolist(),  # (J, 8), base row 0
        "itemsession_obs[item]": np.vstack(
            [np.zeros((1, 2)), rng.normal(0.0, 0.2, (J - 1, counts["itemsession"]))]
        ).tolist(),  # (J, 2)
        "itemsession_obs[user]": (
            rng.normal([0.6, -0.4], 0.25, (U, counts["itemsession"]))
        ).tolist(),  # (U, 2)
        "intercept[nest]": np.concatenate([first, rng.normal(0.0, 0.5, K - 1)]).tolist(),
        "nest_obs[user]": rng.normal(0.0, 0.3, (U, counts["nest"])).tolist(),  # (U, 4)
        "lambda[nest]": np.linspace(0.5, 0.8, K).tolist(),
    }


def large_truth(rng: np.random.Generator, spec: TutorialSpec) -> dict:
    """Known coefficients of item formula (1|item) + (x1|constant) + (x2|constant) + (x3|user)
    and nest formula (1|item) + (1|user) + (z|user); the nest-level (1|user) cancels (zero)."""
    J, K, U = spec.items, spec.nests, spec.users
    return {
        "intercept[item]": np.concatenate([[0.0], rng.normal(0.0, 0.5, J - 1)]).tolist(),
        "x1[constant]": -1.0,
        "x2[constant]": 0.5,
        "x3[user]": rng.normal(0.8, 0.3, U).tolist(),
        "intercept[nest]": np.concatenate([[0.0], rng.normal(0.0, 0.5, K - 1)]).tolist(),
        "z[user]": rng.normal(0.4, 0.3, U).tolist(),
        "lambda[nest]": np.linspace(0.5, 0.8, K).tolist(),
    }


def simulate_tutorial(spec: TutorialSpec) -> tuple[pl.DataFrame, dict | None]:
    """A dense tutorial-shaped long table (sorted by case, then item) and its truth (None for
    random choices)."""
    rng = np.random.default_rng(spec.seed)
    N, J, K = spec.cases, spec.items, spec.nests
    nest = nest_of_item(J, K)  # (J,)
    user = rng.integers(0, spec.users, N)  # (N,)
    session = rng.integers(0, spec.sessions, N)  # (N,)
    observables: dict[str, np.ndarray] = {}  # name -> (N, J)
    if spec.design == "tutorial":
        counts = TUTORIAL_OBSERVABLES
        user_obs = rng.normal(size=(spec.users, counts["user"]))  # (U, 8)
        item_obs = rng.normal(size=(J, counts["item"]))  # (J, 4)
        session_obs = rng.normal(size=(spec.sessions, counts["session"]))  # (S, 3)
        itemsession_obs = rng.normal(size=(N, J, counts["itemsession"]))  # (N, J, 2)
        nest_obs = rng.normal(size=(N, K, counts["nest"]))  # (N, K, 4)
        for k in range(counts["user"]):
            observables[f"user_obs_{k + 1}"] = np.repeat(user_obs[user, k][:, None], J, axis=1)
        for k in range(counts["item"]):
            observables[f"item_obs_{k + 1}"] = np.broadcast_to(item_obs[:, k], (N, J))
        for k in range(counts["session"]):
            observables[f"session_obs_{k + 1}"] = np.repeat(
                session_obs[session, k][:, None], J, axis=1
            )
        for k in range(counts["itemsession"]):
            observables[f"itemsession_obs_{k + 1}"] = itemsession_obs[:, :, k]
        for k in range(counts["nest"]):
            observables[f"nest_obs_{k + 1}"] = nest_obs[:, nest, k]
    else:
        x = rng.normal(size=(3, N, J))
        z = rng.normal(size=(N, K))
        for k in range(3):
            observables[f"x{k + 1}"] = x[k]
        observables["z"] = z[:, nest]

    truth: dict | None = None
    if not spec.simulated:
        chosen = rng.integers(0, J, N)  # uniform, as the tutorial draws them
    elif spec.design == "tutorial":
        truth = tutorial_truth(rng, spec)
        Y = np.broadcast_to(np.asarray(truth["intercept[item]"]), (N, J)).copy()  # (N, J)
        Y += user_obs[user] @ np.asarray(truth["user_obs[item]"]).T  # (N, 8) @ (8, J)
        Y += np.einsum("njc,jc->nj", itemsession_obs, np.asarray(truth["itemsession_obs[item]"]))
        per_user = np.asarray(truth["itemsession_obs[user]"])[user]  # (N, 2)
        Y += np.einsum("njc,nc->nj", itemsession_obs, per_user)
        W = np.broadcast_to(np.asarray(truth["intercept[nest]"]), (N, K)).copy()  # (N, K)
        W += np.einsum("nkc,nc->nk", nest_obs, np.asarray(truth["nest_obs[user]"])[user])
        chosen = nested_draw(rng, Y, W, np.asarray(truth["lambda[nest]"]), nest)
    else:
        truth = large_truth(rng, spec)
        Y = np.asarray(truth["intercept[item]"]) + truth["x1[constant]"] * x[0]  # (N, J)
        Y += truth["x2[constant]"] * x[1] + np.asarray(truth["x3[user]"])[user][:, None] * x[2]
        W = np.asarray(truth["intercept[nest]"]) + np.asarray(truth["z[user]"])[user][:, None] * z
        chosen = nested_draw(rng, Y, W, np.asarray(truth["lambda[nest]"]), nest)

    case_idx = np.repeat(np.arange(N), J)  # (N * J,) row-major: by case, then item
    item_idx = np.tile(np.arange(J), N)
    columns = [
        pl.Series("case", case_idx + 1, dtype=pl.Int64),
        pl.Series("item", item_labels(J)).gather(item_idx),
        pl.Series("user", user[case_idx] + 1, dtype=pl.Int64),
        pl.Series("session", session[case_idx] + 1, dtype=pl.Int64),
        pl.Series("choice", (chosen[case_idx] == item_idx).astype(np.int8)),
        pl.Series("nest", [f"nest{k}" for k in range(K)]).gather(nest[item_idx]),
    ]
    columns += [pl.Series(name, np.ascontiguousarray(v).ravel()) for name, v in observables.items()]
    return pl.DataFrame(columns), truth


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
    if isinstance(spec, TutorialSpec):
        frame, truth = simulate_tutorial(spec)
    else:
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
