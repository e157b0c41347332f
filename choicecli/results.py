"""The fit result, its coefficient table, and writing the model directory.

A model directory holds model.json (spec, labels, statistics, provenance),
params.safetensors (estimates and covariance; loading it executes nothing) and
coefficients.parquet (one row per parameter, for other tools: choice itself derives the table
from the first two). `choicecli.loader` reads it back.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from choicecli.design import Parameter
from choicecli.modeldir import COEFFICIENTS_FILE, MODEL_FILE, PARAMS_FILE, replacing_model
from choicecli.output import write_parquet

SCHEMA_VERSION = 1
FIT_ID_KEY = "choice.fit_id"  # in the safetensors and Parquet metadata; "fit_id" in model.json
Z_95 = 1.959963984540054
LAMBDA_FLOOR = 1e-3  # the lower bound of lambda without --lambda-bounds (problem.py's default)
# An estimate this close to a bound sits on it (the optimiser projects onto the bounds)
BOUND_TOLERANCE = 1e-6
COEFFICIENT_COLUMNS = {
    "level": pl.String,
    "term": pl.String,
    "variable": pl.String,
    "variation": pl.String,
    "feature": pl.String,
    "item": pl.String,
    "user": pl.String,
    "estimate": pl.Float64,
    "std_error": pl.Float64,
    "z_value": pl.Float64,
    "p_value": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "fixed": pl.Boolean,
    "identified": pl.Boolean,
    "at_bound": pl.Boolean,
}


# a mixed logit's table adds which parameter of a coefficient a row is (mean, sd, cholesky;
# null for a coefficient that is not random), its distribution, a Cholesky entry's partner
MIXED_COLUMNS = {"parameter": pl.String, "distribution": pl.String, "partner": pl.String}
MIXED_FIELDS = tuple(MIXED_COLUMNS)


@dataclass
class FitResult:
    """Primitives of a fit; everything else (z, p, intervals) is derived."""

    spec: dict[str, Any]  # formulas, roles, nests, base, options
    labels: dict[str, list]  # items, users, nests
    parameters: list[Parameter]
    estimate: torch.Tensor  # (P,) NaN where not estimated
    std_error: torch.Tensor  # (P,) NaN where not available
    identified: torch.Tensor  # (P,) bool
    covariance: torch.Tensor  # (k, k) of the estimated parameters
    estimated_index: torch.Tensor  # (k,) their positions in the layout
    fit: dict[str, Any]  # statistics
    warnings: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    fit_id: str = ""  # one random id per fit, in each of its files; set when first saved
    # every kind of standard error computed (classic, robust, cluster, bootstrap), (P,) each;
    # std_error is the one fit['standard_errors'] names
    std_errors: dict[str, torch.Tensor] = field(default_factory=dict)

    def coefficient_table(self) -> pl.DataFrame:
        """One row per parameter; z and p test 0, except for lambda, where they test 1.

        p is two-sided, from the normal tail in log space, so it stays exact down to the
        smallest float (about 5e-324) instead of underflowing to 0 near 1e-16 or 1e-300.
        `at_bound` marks a free estimate that sits on a bound of the optimiser (lambda's
        floor or --lambda-bounds): its standard error and test assume an interior optimum.
        """
        estimate = self.estimate.double().cpu()  # (P,) NaN where not estimated
        spread = self.std_error.double().cpu()  # (P,) NaN where not available
        spread = torch.where(spread > 0, spread, torch.full_like(spread, math.nan))
        columns = {
            name: [getattr(p, name) for p in self.parameters]
            for name in Parameter.__dataclass_fields__
        }
        is_lambda = torch.from_numpy(np.asarray(columns["term"], dtype=object) == "lambda")  # (P,)
        z = (estimate - is_lambda.double()) / spread  # lambda against 1, the others against 0
        log_p = math.log(2.0) + torch.special.log_ndtr(-z.abs())  # (P,) log of 2 Phi(-|z|)
        numbers = {
            "estimate": estimate,
            "std_error": spread,
            "z_value": z,
            "p_value": log_p.exp().clamp_max(1.0),
            "ci_low": estimate - Z_95 * spread,
            "ci_high": estimate + Z_95 * spread,
        }
        columns.update({name: values.numpy() for name, values in numbers.items()})
        columns["identified"] = self.identified.cpu().numpy()
        fixed = torch.from_numpy(np.asarray(columns["fixed"], dtype=bool))  # (P,)
        columns["at_bound"] = self._at_bound(estimate, is_lambda & ~fixed).numpy()
        frame = pl.DataFrame(columns).with_columns(
            [pl.col(name).fill_nan(None) for name in numbers]
        )
        kinds = {  # std_error_classic, std_error_robust, ... after the fixed columns
            f"std_error_{kind}": pl.Series(values.double().cpu().numpy()).fill_nan(None)
            for kind, values in sorted(self.std_errors.items(), key=_classic_first)
        }
        mixed = MIXED_COLUMNS if any(p.parameter for p in self.parameters) else {}
        return frame.select(
            [pl.col(name).cast(dtype) for name, dtype in (COEFFICIENT_COLUMNS | mixed).items()]
        ).with_columns(**kinds)

    def _at_bound(self, estimate: torch.Tensor, free_lambda: torch.Tensor) -> torch.Tensor:
        """(P,) bool: free lambdas on their lower or upper bound; other terms have no bounds."""
        bounds = self.spec.get("lambda_bounds") or [LAMBDA_FLOOR, math.inf]
        on_bound = torch.zeros_like(free_lambda)  # (P,)
        if self.spec.get("lambda_fixed"):
            return on_bound
        for bound in (float(bounds[0]), float(bounds[1])):
            if math.isfinite(bound):
                on_bound |= (estimate - bound).abs() <= BOUND_TOLERANCE * max(1.0, abs(bound))
        return free_lambda & on_bound

    def model_document(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "fit_id": self.fit_id,
            "kind": _kind(self.spec),
            "spec": self.spec,
            "labels": {key: _jsonable(values) for key, values in self.labels.items()},
            "parameters": [_parameter_document(p) for p in self.parameters],
            "fit": self.fit,
            "warnings": self.warnings,
            "provenance": self.provenance,
        }

    def save(self, directory: Path, table: pl.DataFrame | None = None) -> None:
        """Write the model directory atomically: all three files appear together or none.
        `table`: the coefficient table, when the caller has made it already.

        The three files carry one fit id (model.json, the safetensors and Parquet metadata),
        so the loader can tell files of different fits apart. Every file is written here with
        plain `open` (mode 0666 less the umask, and a full disk is an OSError).
        """
        from safetensors.torch import save

        if not self.fit_id:
            self.fit_id = uuid.uuid4().hex
        document = self.model_document()
        metadata = {
            "choice.spec": json.dumps(self.spec),
            "choice.provenance": json.dumps(self.provenance),
            FIT_ID_KEY: self.fit_id,
        }
        tensors = {
            "estimate": self.estimate.double().cpu().contiguous(),
            "std_error": self.std_error.double().cpu().contiguous(),
            "identified": self.identified.to(torch.uint8).cpu().contiguous(),
            "covariance": self.covariance.double().cpu().contiguous(),
            "estimated_index": self.estimated_index.long().cpu().contiguous(),
        } | {
            f"std_error_{kind}": values.double().cpu().contiguous()
            for kind, values in self.std_errors.items()
        }
        with replacing_model(Path(directory)) as temp:
            text = json.dumps(document, indent=2, default=str) + "\n"
            _write_file(temp / MODEL_FILE, text.encode())
            payload = save(tensors, metadata={"schema_version": "1", FIT_ID_KEY: self.fit_id})
            _write_file(temp / PARAMS_FILE, payload)
            del payload
            with open(temp / COEFFICIENTS_FILE, "wb") as handle:
                table = self.coefficient_table() if table is None else table
                write_parquet(table, handle, metadata)


def _classic_first(item: tuple[str, torch.Tensor]) -> tuple[bool, str]:
    """The order of the std_error_<kind> columns, whatever order the tensors were read in."""
    return item[0] != "classic", item[0]


def _write_file(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)


def _jsonable(values: list | None) -> list | None:
    if values is None:
        return None
    return [v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in values]


def _kind(spec: dict[str, Any]) -> str:
    if spec.get("random"):
        return "mixed_logit"
    return "nested_logit" if spec.get("nests") else "conditional_logit"


def _parameter_document(parameter: Parameter) -> dict[str, Any]:
    """A parameter's fields; the mixed logit's only where set (other models' files keep theirs)."""
    document = asdict(parameter)
    for name in MIXED_FIELDS:
        if document[name] is None:
            del document[name]
    return document
