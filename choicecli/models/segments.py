"""Sums over segments of rows (a case's rows, a (case, nest) pair's rows): the ragged layout's
counterpart of an (N, J) view.

Notation: R rows, S segments, G groups of a block, K its value columns.
"""

from __future__ import annotations

import torch

from choicecli.design import Block


def segment_logsumexp(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """log(sum(exp(values))) within each segment; empty segments give -inf. (S,)"""
    top = torch.full((n_segments,), -torch.inf, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, segment, values.detach(), reduce="amax", include_self=True)
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # (S,)
    total = torch.zeros(n_segments, dtype=values.dtype, device=values.device)
    total = total.index_add(0, segment, torch.exp(values - safe_top[segment]))  # (S,)
    return safe_top + torch.log(total)


def block_utility(blocks: list[Block], theta: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum over blocks of x[r] . beta[code[r]]. (R,)"""
    utility = torch.zeros(n_rows, dtype=theta.dtype, device=theta.device)
    for block in blocks:
        coefficients = theta[block.layout_index]  # (G, K)
        utility = utility + (block.x * coefficients[block.code]).sum(dim=1)  # (R,)
    return utility
