"""Block-arrowhead solves (per-user coefficients) against dense linear algebra."""

from __future__ import annotations

import pytest
import torch

from choicecli import arrowhead, estimate
from choicecli.arrowhead import factor_arrowhead
from choicecli.data import Roles
from choicecli.fit import FitOptions, fit_model
from conftest import SAMPLE_DATA


def arrowhead_matrix(sizes: list[int], n_shared: int, seed: int = 0):
    """A positive definite (P, P) matrix [[A, B], [B', C]], A block-diagonal by user (block
    sizes `sizes`), in a shuffled order; and each parameter's group (user, -1: shared)."""
    generator = torch.Generator().manual_seed(seed)
    options = {"generator": generator, "dtype": torch.float64}
    groups = torch.tensor(
        [user for user, size in enumerate(sizes) for _ in range(size)] + [-1] * n_shared
    )
    blocks = []
    for size in sizes:
        root = torch.randn(size, size, **options)
        blocks.append(root @ root.T + torch.eye(size, dtype=torch.float64))
    users = torch.block_diag(*blocks)  # (S, S) A
    border = torch.randn(users.shape[0], n_shared, **options)  # (S, d) B
    root = torch.randn(n_shared, n_shared, **options)
    shared = border.T @ torch.linalg.solve(users, border) + root @ root.T + torch.eye(n_shared)
    matrix = torch.cat(
        [torch.cat([users, border], dim=1), torch.cat([border.T, shared], dim=1)], dim=0
    )
    order = torch.randperm(groups.numel(), generator=generator)
    return matrix[order][:, order], groups[order]


@pytest.fixture
def few_parameters_suffice(monkeypatch):
    monkeypatch.setattr(arrowhead, "MIN_GROUPED_PARAMETERS", 1)


@pytest.mark.parametrize(
    ("sizes", "n_shared"), [([1] * 40, 5), ([1, 3, 2, 3, 1, 2] * 6, 7), ([2] * 30, 0)]
)
def test_solve_and_inverse_match_dense_linear_algebra(few_parameters_suffice, sizes, n_shared):
    matrix, groups = arrowhead_matrix(sizes, n_shared)
    factor = factor_arrowhead(matrix, groups)
    assert factor is not None
    right = torch.randn(matrix.shape[0], dtype=torch.float64)
    many = torch.randn(matrix.shape[0], 3, dtype=torch.float64)
    pairs = [
        (factor.solve(right), torch.linalg.solve(matrix, right)),
        (factor.solve(many), torch.linalg.solve(matrix, many)),
        (factor.inverse(), torch.linalg.inv(matrix)),
    ]
    for found, expected in pairs:  # round-off: relative to the largest entry
        assert float((found - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_a_matrix_where_two_users_meet_is_left_to_the_dense_path(few_parameters_suffice):
    matrix, groups = arrowhead_matrix([1, 2, 1, 2] * 5, 3)
    first, second = (groups == 0).nonzero()[0, 0], (groups == 1).nonzero()[0, 0]
    matrix[first, second] = matrix[second, first] = 1e-3
    assert factor_arrowhead(matrix, groups) is None


def test_a_matrix_that_is_not_positive_definite_is_left_to_the_dense_path(
    few_parameters_suffice,
):
    matrix, groups = arrowhead_matrix([1, 2] * 10, 3)
    user_parameter = (groups == 4).nonzero()[0, 0]
    matrix[user_parameter, user_parameter] = -1.0
    assert factor_arrowhead(matrix, groups) is None
    shared = (groups < 0).nonzero()[0, 0]
    matrix, _ = arrowhead_matrix([1, 2] * 10, 3)
    matrix[shared, shared] = -1e3  # the blocks factor, their Schur complement does not
    assert factor_arrowhead(matrix, groups) is None


def test_few_grouped_parameters_stay_on_the_dense_path():
    matrix, groups = arrowhead_matrix([1] * 10, 3)
    assert factor_arrowhead(matrix, groups) is None


def test_a_fit_with_user_slopes_is_the_same_by_blocks_and_densely(monkeypatch, tmp_path):
    """The tutorial's user-specific terms: Newton steps and covariance by blocks give the
    dense path's estimates, log-likelihood, standard errors and covariance."""
    import polars as pl

    from choicecli.problem import ModelSpec

    frame = pl.read_parquet(SAMPLE_DATA / "transport.parquet")
    spec = ModelSpec(
        formula="(time|constant) + (1|item) + (income|item) + (cost|user) + (1|user)",
        roles=Roles(case="case_id", item="mode", choice="chosen", user="user_id"),
    )
    calls = []  # 150 users x 2 coefficients: the block path at the default threshold
    real = estimate.factor_arrowhead
    monkeypatch.setattr(
        estimate, "factor_arrowhead", lambda *a: calls.append(1) or real(*a)
    )  # counts the block solves
    blocks, _ = fit_model(frame.clone(), spec, FitOptions(), where="test")
    assert calls  # the block path ran
    monkeypatch.setattr(arrowhead, "MIN_GROUPED_PARAMETERS", 10**9)
    dense, _ = fit_model(frame.clone(), spec, FitOptions(), where="test")
    assert blocks.fit["converged"] and dense.fit["converged"]
    assert blocks.fit["log_likelihood"] == pytest.approx(dense.fit["log_likelihood"], rel=1e-14)
    assert torch.allclose(blocks.estimate, dense.estimate, rtol=1e-9, atol=1e-10, equal_nan=True)
    assert torch.allclose(blocks.std_error, dense.std_error, rtol=1e-9, equal_nan=True)
    assert torch.allclose(blocks.covariance, dense.covariance, rtol=1e-9, atol=1e-14)
