"""Standard errors beyond the inverse Hessian: robust, clustered and bootstrap covariance.

Notation: N cases, P free parameters, G clusters, s_n (P,) the gradient of case n's
log-probability of its choice (unweighted; `Model.case_scores`), w_n its weight, and
V = (-H)^-1 the classic covariance (H the Hessian of the weighted log-likelihood, less any
L2 penalty).

- robust: the sandwich V B V, B = sum_n w_n s_n s_n' with frequency weights (as duplicated
  cases would give), sum_n (w_n s_n)(w_n s_n)' with sampling weights (Stata's pweights); no
  small-sample factor (R sandwich's HC0, as mlogit's robust errors).
- cluster: B = G / (G - 1) sum_g c_g c_g', c_g = sum_{n in g} w_n s_n: the factor of Stata's
  maximum-likelihood commands (and R's vcovCL); G/(G-1) (N-1)/(N-K) is Stata's for linear
  regression only.
- bootstrap: N draws of cases (or of whole clusters) with replacement, each a vector of
  counts multiplying the case weights (the data is never rebuilt), refitted by Newton from
  the estimate; the covariance of the draws' estimates (divisor draws - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from choicecli.errors import UsageError

SE_KINDS = ("classic", "robust", "cluster", "bootstrap", "none")
SCORE_BLOCK_VALUES = 1 << 22  # cases x parameters of scores held at once


@dataclass(frozen=True)
class ErrorsChoice:
    """What `--se` asked for: the kind, whether by clusters (cluster, or a bootstrap drawing
    whole clusters), the cluster column (None: the user column) and the bootstrap draws."""

    kind: str = "classic"
    cluster: str | None = None
    draws: int = 0
    clustered: bool = False


def parse_se(text: str) -> ErrorsChoice:
    """classic | robust | cluster[:COL] | bootstrap:N[:cluster[:COL]] | none; anything else
    a usage error."""
    kind, _, argument = text.partition(":")
    if kind not in SE_KINDS:
        raise UsageError(
            f"--se must be classic, robust, cluster[:COL], bootstrap:N[:cluster[:COL]] or "
            f"none, not {text!r}"
        )
    if kind == "cluster":
        return ErrorsChoice(kind, argument or None, clustered=True)
    if kind == "bootstrap":
        draws, _, by = argument.partition(":")
        if not draws.isdigit() or int(draws) < 2:
            raise UsageError(f"--se bootstrap:N needs a number of draws N >= 2, not {text!r}")
        unit, _, column = by.partition(":")
        if unit not in ("", "cluster"):
            raise UsageError(
                f"--se bootstrap:N draws cases, or clusters with :cluster[:COL], not {text!r}"
            )
        return ErrorsChoice(kind, column or None, int(draws), clustered=unit == "cluster")
    if argument:
        raise UsageError(f"--se {kind} takes no argument, not {text!r}")
    return ErrorsChoice(kind)


def score_meat(
    model,
    theta: torch.Tensor,  # (P_layout,) the estimate
    free: torch.Tensor,  # (P,) positions of the free parameters
    sampling: bool = False,
    clusters: torch.Tensor | None = None,  # (N,) cluster number of each case
    n_clusters: int = 0,
) -> torch.Tensor:
    """B of the sandwich (see the module docstring), scores summed over blocks of cases so
    that no (N, P) matrix is held. (P, P)"""
    n_cases, n_free = model.n_cases, free.numel()
    weights = model.case_weights  # (N,)
    meat = theta.new_zeros(n_free, n_free)
    totals = None if clusters is None else theta.new_zeros(n_clusters, n_free)  # (G, P)
    # a block's scores come from its slots' Jacobian, (slots, P): dense layouts hold at most
    # twice the rows in slots
    slots_per_case = math.ceil(2 * model.n_rows / max(1, n_cases))
    step = max(1, SCORE_BLOCK_VALUES // (max(1, model.n_parameters) * slots_per_case))
    for first in range(0, n_cases, step):
        cases = slice(first, min(first + step, n_cases))
        scores = model.case_scores(theta, cases)[:, free]  # (C, P)
        weighted = scores * weights[cases, None]  # (C, P)
        if totals is not None:
            totals.index_add_(0, clusters[cases], weighted)
        else:
            meat += weighted.T @ (weighted if sampling else scores)
    if totals is not None:
        meat = n_clusters / (n_clusters - 1) * (totals.T @ totals)
    return meat


def sandwich(classic: torch.Tensor, meat: torch.Tensor) -> torch.Tensor:
    """V B V, symmetrised against rounding. (P, P)"""
    product = classic @ meat @ classic
    return 0.5 * (product + product.T)


def bootstrap_covariance(
    objective,
    theta: torch.Tensor,  # (P,) the estimate of the free parameters
    maximise,
    draws: int,
    seed: int,
    clusters: torch.Tensor | None = None,  # (N,) cluster number of each case
    n_clusters: int = 0,
) -> tuple[torch.Tensor, int]:
    """Covariance of `draws` refits on resampled cases (or clusters), and how many draws did
    not converge (left out). `maximise(objective, start)` refits from a start. (P, P)"""
    model = objective.model
    base = model.case_weights.clone()  # (N,)
    given = base if model.weighted else None
    generator = torch.Generator().manual_seed(seed)
    units = n_clusters if clusters is not None else model.n_cases
    estimates, failed = [], 0
    try:
        for _ in range(draws):
            picks = torch.randint(units, (units,), generator=generator)  # (units,)
            counts = torch.bincount(picks, minlength=units).to(base)  # (units,)
            if clusters is not None:
                counts = counts[clusters]  # (N,)
            model.set_case_weights(base * counts)
            outcome = maximise(objective, theta)
            if outcome.converged and bool(torch.isfinite(outcome.theta).all()):
                estimates.append(outcome.theta)
            else:
                failed += 1
    finally:
        model.set_case_weights(given)
    if len(estimates) < 2:
        nan = math.nan
        return theta.new_full((theta.numel(), theta.numel()), nan), failed
    stacked = torch.stack(estimates)  # (D, P)
    return torch.atleast_2d(torch.cov(stacked.T)), failed
