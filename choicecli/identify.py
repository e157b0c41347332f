"""Which coefficients the data can estimate: a rank check of the design, in formula order.

At theta = 0 the information matrix -H is sum_n Z_n' (I/J_n - 11'/J_n^2) Z_n, whose null space
is every direction that leaves all within-case utility differences unchanged. A greedy Cholesky
in layout order keeps a parameter only when it adds a direction the earlier ones do not span.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ZERO_TOLERANCE = 1e-11
DEPENDENCE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Dependence:
    """A parameter the data cannot estimate, with the reason and what it depends on."""

    index: int  # position in the layout
    cancels: bool  # its column never varies within a case
    partners: tuple[int, ...]  # earlier kept parameters it is a combination of


def dependent_parameters(
    information: torch.Tensor, candidates: torch.Tensor, second_moments: torch.Tensor
) -> list[Dependence]:
    """Greedy order-preserving rank check of information[candidates][:, candidates].

    A parameter cancels when its within-case variation is negligible against its own
    magnitude (`second_moments`: the sum of its squared design values), whatever its scale.
    """
    block = information[candidates][:, candidates]
    magnitude = second_moments[candidates].clamp_min(0).sqrt()  # (C,)
    magnitude = torch.where(magnitude > 0, magnitude, torch.ones_like(magnitude))
    relative = block.diagonal().clamp_min(0) / magnitude**2  # within-case share of variation
    cancels = relative <= ZERO_TOLERANCE
    diagonal = block.diagonal().clamp_min(0)
    scale = torch.where(cancels, torch.ones_like(diagonal), diagonal.sqrt())
    scaled = block / scale[:, None] / scale[None, :]  # unit diagonal where it varies
    varying = (~cancels).nonzero().flatten()
    factor, info = torch.linalg.cholesky_ex(scaled[varying][:, varying])
    found = [Dependence(int(candidates[i]), True, ()) for i in cancels.nonzero().flatten()]
    # on a unit diagonal, pivot j squared is column j's variance left after the earlier ones:
    # the greedy test below, all at once
    if int(info) == 0 and bool((factor.diagonal() ** 2 > DEPENDENCE_TOLERANCE).all()):
        return found
    kept: list[int] = []
    factor = torch.zeros(0, 0, dtype=block.dtype, device=block.device)
    for position in varying.tolist():
        column = scaled[kept, position]  # (k,)
        if kept:
            solved = torch.linalg.solve_triangular(factor, column[:, None], upper=False)[:, 0]
        else:
            solved = column
        residual = float(scaled[position, position] - solved @ solved)
        if residual > DEPENDENCE_TOLERANCE:
            size = len(kept)
            grown = torch.zeros(size + 1, size + 1, dtype=block.dtype, device=block.device)
            grown[:size, :size] = factor
            grown[size, :size] = solved
            grown[size, size] = residual**0.5
            factor = grown
            kept.append(position)
            continue
        weights = torch.linalg.solve_triangular(factor.T, solved[:, None], upper=True)[:, 0]
        strongest = weights.abs()
        partners = [kept[i] for i in (strongest > 1e-6 * strongest.max()).nonzero().flatten()]
        found.append(Dependence(int(candidates[position]), False,
                                tuple(int(candidates[p]) for p in partners)))  # fmt: skip
    return sorted(found, key=lambda item: item.index)
