"""What `estimate` may read of a model: every member it uses is declared here.

A model family plugs in by providing these members; `estimate` picks its method from the
declared facts (parameter count, cases, rows, per-user terms, how the Hessian is computed),
never by probing for attributes.

Notation: N cases, R rows, P parameters of the full layout (fixed ones included).
"""

from __future__ import annotations

from typing import Protocol

import torch


class Model(Protocol):
    """A log-likelihood over the full layout vector theta (P,), with its derivatives."""

    n_parameters: int  # P
    n_cases: int  # N
    n_rows: int  # R
    by_user: bool  # some coefficients (at any level) belong to one user
    case_weights: torch.Tensor  # (N,) 1 for every case when no weights were given
    # hessian() is analytic (about the cost of a few gradients) up to this P, None: at any P;
    # past it (0: always) it is automatic differentiation's, about P gradients
    analytic_hessian_limit: int | None
    can_subsample: bool  # subsample() gives a model of every k-th case

    def value_and_gradient(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-likelihood and its gradient at theta. ((), (P,))"""
        ...

    def hessian(self, theta: torch.Tensor) -> torch.Tensor:
        """The Hessian of the log-likelihood at theta. (P, P)"""
        ...

    def case_scores(self, theta: torch.Tensor, cases: slice | None = None) -> torch.Tensor:
        """Each case's gradient of its log-probability of its choice, unweighted, for the
        cases of `cases` (default all): the rows of robust covariance. (C, P)"""
        ...

    def set_case_weights(self, case_weights: torch.Tensor | None) -> None:
        """Weight the cases anew (None: every case 1), as a bootstrap resample does; value,
        gradient and Hessian use them from the next call."""
        ...

    def subsample(self, every: int) -> Model | None:
        """The same model on every `every`-th case (None where `can_subsample` is False)."""
        ...

    def drop_subsamples(self) -> None:
        """Forget the subsamples made so far (their memory goes)."""
        ...
