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

import polars as pl
import torch

from choicecli.design import Parameter
from choicecli.modeldir import COEFFICIENTS_FILE, MODEL_FILE, PARAMS_FILE, replacing_model
from choicecli.output import write_parquet

SCHEMA_VERSION = 1
FIT_ID_KEY = "choice.fit_id"  # in the safetensors and Parquet metadata; "fit_id" in model.json
Z_95 = 1.959963984540054
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

    def coefficient_table(self) -> pl.DataFrame:
        """One row per parameter; z and p test 0, except for lambda, where they test 1."""
        estimate = self.estimate.double().cpu()  # (P,) NaN where not estimated
        spread = self.std_error.double().cpu()  # (P,) NaN where not available
        spread = torch.where(spread > 0, spread, torch.full_like(spread, math.nan))
        null_value = torch.tensor([1.0 if p.term == "lambda" else 0.0 for p in self.parameters],
                                  dtype=torch.float64)  # fmt: skip
        z = (estimate - null_value) / spread
        numbers = {
            "estimate": estimate,
            "std_error": spread,
            "z_value": z,
            "p_value": torch.special.erfc(z.abs() / math.sqrt(2.0)),
            "ci_low": estimate - Z_95 * spread,
            "ci_high": estimate + Z_95 * spread,
        }
        columns = {
            name: [getattr(p, name) for p in self.parameters]
            for name in Parameter.__dataclass_fields__
        }
        columns.update({name: values.numpy() for name, values in numbers.items()})
        columns["identified"] = self.identified.cpu().numpy()
        frame = pl.DataFrame(columns).with_columns(
            [pl.col(name).fill_nan(None) for name in numbers]
        )
        kinds = MIXED_COLUMNS if any(p.parameter for p in self.parameters) else {}
        return frame.select(
            [pl.col(name).cast(dtype) for name, dtype in (COEFFICIENT_COLUMNS | kinds).items()]
        )

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

    def save(self, directory: Path) -> None:
        """Write the model directory atomically: all three files appear together or none.

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
        }
        with replacing_model(Path(directory)) as temp:
            text = json.dumps(document, indent=2, default=str) + "\n"
            _write_file(temp / MODEL_FILE, text.encode())
            payload = save(tensors, metadata={"schema_version": "1", FIT_ID_KEY: self.fit_id})
            _write_file(temp / PARAMS_FILE, payload)
            del payload
            with open(temp / COEFFICIENTS_FILE, "wb") as handle:
                write_parquet(self.coefficient_table(), handle, metadata)


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
