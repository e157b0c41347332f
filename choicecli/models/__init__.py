"""Conditional and nested logit: utilities, log-likelihoods, gradients, Hessians. No I/O."""

from choicecli.models.conditional import (
    ANALYTIC_NESTED_LIMIT,
    ConditionalLogit,
    HandedRows,
    NestedLogit,
    block_utility,
    segment_logsumexp,
)

__all__ = [
    "ANALYTIC_NESTED_LIMIT",
    "ConditionalLogit",
    "HandedRows",
    "NestedLogit",
    "block_utility",
    "segment_logsumexp",
]
