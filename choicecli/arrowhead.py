"""Solves with an information matrix of block-arrowhead form: per-user coefficients.

A case belongs to one user, so the coefficients of two different users never meet in the
Hessian: ordered by user, the information matrix is block-diagonal (one small block per user)
bordered by the shared coefficients. Its Cholesky factor is the blocks' factors, batched, and
the factor of the shared coefficients' Schur complement: O(U k^3 + P d^2) work for U users
with k coefficients each and d shared ones, instead of O(P^3) for the dense matrix.

Notation: P parameters, U users, k the most coefficients of one user (padded), d shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# below this many per-user parameters the dense factorisation is as fast and simpler
MIN_GROUPED_PARAMETERS = 64


@dataclass
class ArrowheadFactor:
    """The factored information matrix (see the module docstring)."""

    grouped: torch.Tensor  # (U, k) parameter positions of each user's coefficients, -1: padding
    shared: torch.Tensor  # (d,) positions of the coefficients no user owns
    block_factor: torch.Tensor  # (U, k, k) Cholesky factor of each user's block
    border: torch.Tensor  # (U, k, d) each user's block of the border B
    solved_border: torch.Tensor  # (U, k, d) A^-1 B
    schur_factor: torch.Tensor  # (d, d) Cholesky factor of C - B' A^-1 B
    size: int

    def solve(self, right: torch.Tensor) -> torch.Tensor:
        """x with information @ x = right. (P,) or (P, m)"""
        vector = right.dim() == 1
        right = right[:, None] if vector else right  # (P, m)
        present = self.grouped >= 0  # (U, k)
        slots = self.grouped.clamp_min(0)
        own = right[slots] * present[:, :, None]  # (U, k, m)
        own = torch.cholesky_solve(own, self.block_factor)  # (U, k, m) A^-1 r_S
        shared = right[self.shared] - torch.einsum("ukd,ukm->dm", self.border, own)  # (d, m)
        shared = torch.cholesky_solve(shared, self.schur_factor)  # (d, m)
        own = own - torch.einsum("ukd,dm->ukm", self.solved_border, shared)  # (U, k, m)
        result = right.new_zeros(self.size, right.shape[1])
        result[self.grouped[present]] = own[present]
        result[self.shared] = shared
        return result[:, 0] if vector else result

    def inverse(self) -> torch.Tensor:  # (P, P)
        """[[A^-1 + W S^-1 W', -W S^-1], [-S^-1 W', S^-1]] with W = A^-1 B, S the Schur
        complement; each user's block A^-1 inverted on its own."""
        present = self.grouped >= 0  # (U, k)
        schur_inverse = torch.cholesky_inverse(self.schur_factor)  # (d, d)
        solved = self.solved_border[present]  # (S, d) W
        positions = self.grouped[present]  # (S,)
        result = self.schur_factor.new_zeros(self.size, self.size)
        cross = -(solved @ schur_inverse)  # (S, d)
        result[positions[:, None], positions[None, :]] = -(cross @ solved.T)  # W S^-1 W'
        own = torch.cholesky_inverse(self.block_factor)  # (U, k, k)
        slots = self.grouped.clamp_min(0)
        pair = present[:, :, None] & present[:, None, :]  # (U, k, k)
        rows = slots[:, :, None].expand_as(own)[pair]
        columns = slots[:, None, :].expand_as(own)[pair]
        result.index_put_((rows, columns), own[pair], accumulate=True)
        result[positions[:, None], self.shared[None, :]] = cross
        result[self.shared[:, None], positions[None, :]] = cross.T
        result[self.shared[:, None], self.shared[None, :]] = schur_inverse
        return result


@dataclass
class ArrowheadBlocks:
    """An information matrix of block-arrowhead form, split into its parts (not factored)."""

    grouped: torch.Tensor  # (U, k) parameter positions of each user's coefficients, -1: padding
    shared: torch.Tensor  # (d,) positions of the coefficients no user owns
    blocks: torch.Tensor  # (U, k, k) each user's block, identity on padding
    border: torch.Tensor  # (U, k, d) each user's block of the border B
    corner: torch.Tensor  # (d, d) the shared coefficients' block C
    size: int

    def factor(self, ridge: float = 0.0, absolute: bool = False) -> ArrowheadFactor | None:
        """The factor of the matrix plus `ridge` on its diagonal; None where that is not
        positive definite. absolute: the shared coefficients' Schur complement with its
        eigenvalues made positive (|e|, at least 1e-8 of the largest), as a saddle-free
        Newton step takes it, where the users' blocks are positive definite."""
        blocks, corner = self.blocks, self.corner
        if ridge:
            present = (self.grouped >= 0).to(blocks.dtype)  # (U, k)
            blocks = blocks + torch.diag_embed(ridge * present)
            corner = corner + ridge * torch.eye(corner.shape[0], dtype=corner.dtype,
                                                device=corner.device)  # fmt: skip
        block_factor, info = torch.linalg.cholesky_ex(blocks)  # (U, k, k)
        if bool((info != 0).any()):
            return None
        solved_border = torch.cholesky_solve(self.border, block_factor)  # (U, k, d)
        schur = corner - torch.einsum("ukd,uke->de", self.border, solved_border)  # (d, d)
        if absolute:
            values, vectors = torch.linalg.eigh(schur)  # (d,), (d, d)
            values = values.abs().clamp_min(1e-8 * float(values.abs().max()))
            schur = (vectors * values) @ vectors.T
        schur_factor, info = torch.linalg.cholesky_ex(schur)
        if int(info) != 0:
            return None
        return ArrowheadFactor(
            self.grouped, self.shared, block_factor, self.border, solved_border, schur_factor,
            self.size,
        )  # fmt: skip


def factor_arrowhead(information: torch.Tensor, groups: torch.Tensor) -> ArrowheadFactor | None:
    """Factor a (P, P) information matrix whose parameters with the same `groups` (P,) id
    (>= 0: a user; -1: shared) meet only each other and the shared ones.

    None where that does not pay (few grouped parameters), where the matrix is not of that
    form, or where it is not positive definite (the dense path then adds its ridge).
    """
    parts = split_arrowhead(information, groups)
    return None if parts is None else parts.factor()


def split_arrowhead(information: torch.Tensor, groups: torch.Tensor) -> ArrowheadBlocks | None:
    """The parts of a (P, P) information matrix of block-arrowhead form by `groups` (P,)
    (see factor_arrowhead); None where that does not pay or the matrix is not of that form."""
    size = information.shape[0]
    owned = groups >= 0  # (P,)
    if int(owned.sum()) < MIN_GROUPED_PARAMETERS:
        return None
    positions = owned.nonzero().flatten()  # (S,)
    users, user = torch.unique(groups[positions], return_inverse=True)  # (U,), (S,)
    counts = torch.bincount(user, minlength=users.shape[0])  # (U,)
    order = torch.argsort(user, stable=True)  # (S,) grouped by user
    starts = torch.cumsum(counts, 0) - counts  # (U,)
    slot = torch.arange(order.shape[0], device=groups.device) - starts[user[order]]  # (S,)
    grouped = torch.full(
        (users.shape[0], int(counts.max())), -1, dtype=torch.long, device=groups.device
    )  # (U, k)
    grouped[user[order], slot] = positions[order]
    present = grouped >= 0
    slots = grouped.clamp_min(0)
    width = grouped.shape[1]
    rows = information[slots] * present[:, :, None]  # (U, k, P) each user's rows
    blocks = rows.gather(2, slots[:, None, :].expand(-1, width, -1))  # (U, k, k)
    blocks = blocks * present[:, None, :]
    shared = (~owned).nonzero().flatten()  # (d,)
    border = rows[:, :, shared]  # (U, k, d)
    if int(torch.count_nonzero(rows)) != int(torch.count_nonzero(blocks)) + int(
        torch.count_nonzero(border)
    ):
        return None  # two users' coefficients meet: not of this form
    blocks.diagonal(dim1=1, dim2=2).add_((~present).to(blocks.dtype))  # padding: identity
    corner = information[shared][:, shared]  # (d, d)
    return ArrowheadBlocks(grouped, shared, blocks, border, corner, size)
