"""Conditional, nested and mixed logit: utilities, log-likelihoods, gradients, Hessians. No I/O.

protocol (what the estimator reads), slots (the slot layout and column store shared by every
model), segments (sums over segments of rows), conditional and conditional_hessian (the
conditional logit), nested (the nested logit's factory) with nested_dense and nested_ragged
(its two strategies), mixed (the mixed logit: simulated likelihood, exact Hessian, fitter;
its draws in choicecli.draws).
"""

from choicecli.models.conditional import ConditionalLogit
from choicecli.models.nested import NestedLogit, NestedRows, nested_logit
from choicecli.models.nested_dense import ANALYTIC_NESTED_LIMIT, DenseNestedLogit
from choicecli.models.nested_ragged import RaggedNestedLogit
from choicecli.models.protocol import Model
from choicecli.models.segments import block_utility, segment_logsumexp
from choicecli.models.slots import ColumnStore, HandedRows

__all__ = [
    "ANALYTIC_NESTED_LIMIT",
    "ColumnStore",
    "ConditionalLogit",
    "DenseNestedLogit",
    "HandedRows",
    "Model",
    "NestedLogit",
    "NestedRows",
    "RaggedNestedLogit",
    "block_utility",
    "nested_logit",
    "segment_logsumexp",
]
