"""Shared fixtures: the reference data in tests/data, small tables, and a problem builder."""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest
import torch

from choicecli.data import Roles
from choicecli.problem import ModelSpec, build_problem

torch.set_num_threads(1)  # in-process fits: no oversubscription on a shared 2-core machine

TESTS = Path(__file__).parent
REPO = TESTS.parent
REFERENCE_DATA = TESTS / "data"  # provenance, licences, published estimates: its README.md
SAMPLE_DATA = REPO / "sample_data"
CHOICE_EXECUTABLE = Path(sys.executable).parent / "choice"

MODE_CANADA_FORMULA = " + ".join(
    [
        "(cost|constant)",
        "(freq|constant)",
        "(ovt|constant)",
        "(income|item)",
        "(ivt|item-full)",
        "(1|item)",
    ]  # fmt: skip
)
HC_FORMULA = (
    "(ich|constant) + (och|constant) + (icca|constant) + (occa|constant) + "
    "(inc.room|constant) + (inc.cooling|constant) + (int.cooling|constant)"
)

ELECTRICITY_VARIABLES = ["pf", "cl", "loc", "wk", "tod", "seas"]
# xlogit's README, 600 plain Halton draws, panel by id: mean, its std. error, sd, its std. error
# (simulated log-likelihood -3888.4134); tests/data/README.md gives the source
XLOGIT_ELECTRICITY = {
    "pf": (-0.9996286, 0.0331488, 0.2357813, 0.0181892),
    "cl": (-0.2355334, 0.0220401, 0.4025377, 0.0220183),
    "loc": (2.2307891, 0.1164263, 1.9262893, 0.1187850),
    "wk": (1.6251657, 0.0918755, -1.2192931, 0.0944581),
    "tod": (-9.6067367, 0.3112721, 2.3354462, 0.1741859),
    "seas": (-9.7892800, 0.2913063, -1.4200913, 0.2095869),
}


def reference_file(name: str) -> Path:
    """A reference data set that ships with the tests; a missing one fails the test."""
    path = REFERENCE_DATA / name
    if not path.is_file():
        pytest.fail(
            f"reference data {path} is missing: tests/data/README.md lists what belongs there"
        )
    return path


@pytest.fixture(scope="session")
def mode_canada_parquet(tmp_path_factory) -> Path:
    """ModeCanada rows with noalt == 4, as Parquet."""
    frame = pl.read_csv(reference_file("ModeCanada.csv.gz")).filter(pl.col("noalt") == 4)
    path = tmp_path_factory.mktemp("mc") / "mc.parquet"
    frame.write_parquet(path)
    return path


def toy_frame() -> pl.DataFrame:
    """Three cases, varying choice sets, two users."""
    return pl.DataFrame(
        {
            "case": [1, 1, 1, 2, 2, 3, 3, 3],
            "item": ["a", "b", "c", "a", "c", "a", "b", "c"],
            "choice": [0, 1, 0, 0, 1, 1, 0, 0],
            "user": ["u1", "u1", "u1", "u2", "u2", "u1", "u1", "u1"],
            "x": [1.0, 2.0, 0.5, -1.0, 0.3, 0.7, 1.5, -0.2],
            "z": [0.2, -0.4, 1.1, 0.9, 0.1, -0.6, 0.3, 0.8],
            "w": [1.5, 1.5, 1.5, -0.5, -0.5, 0.25, 0.25, 0.25],
        }
    )


def problem_for(frame: pl.DataFrame, formula: str, **spec_options):
    roles = spec_options.pop("roles", Roles(case="case", item="item", choice="choice", user="user"))
    spec = ModelSpec(formula=formula, roles=roles, **spec_options)
    return build_problem(frame, spec, "test")


def random_theta(n: int, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, generator=generator, dtype=torch.float64)
