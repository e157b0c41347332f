"""The fit result, its coefficient table, and the model directory (save and load).

A model directory holds model.json (spec, labels, statistics, provenance),
params.safetensors (estimates and covariance; loading it executes nothing) and
coefficients.parquet (one row per parameter).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from choicecli.design import Parameter
from choicecli.errors import ArtifactError
from choicecli.io import atomic_directory, restore_interrupted, write_parquet

SCHEMA_VERSION = 1
MODEL_FILE = "model.json"
PARAMS_FILE = "params.safetensors"
COEFFICIENTS_FILE = "coefficients.parquet"
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
        return frame.select(
            [pl.col(name).cast(dtype) for name, dtype in COEFFICIENT_COLUMNS.items()]
        )

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
            "kind": "nested_logit" if self.spec.get("nests") else "conditional_logit",
            "spec": self.spec,
            "labels": {key: _jsonable(values) for key, values in self.labels.items()},
            "parameters": [asdict(p) for p in self.parameters],
            "fit": self.fit,
            "warnings": self.warnings,
            "provenance": self.provenance,
        }

    def save(self, directory: Path) -> None:
        """Write the model directory atomically: all three files appear together or none."""
        from safetensors.torch import save_file

        document = self.model_document()
        metadata = {
            "choice.spec": json.dumps(self.spec),
            "choice.provenance": json.dumps(self.provenance),
        }
        with atomic_directory(Path(directory)) as temp:
            (temp / MODEL_FILE).write_text(json.dumps(document, indent=2, default=str) + "\n")
            tensors = {
                "estimate": self.estimate.double().cpu().contiguous(),
                "std_error": self.std_error.double().cpu().contiguous(),
                "identified": self.identified.to(torch.uint8).cpu().contiguous(),
                "covariance": self.covariance.double().cpu().contiguous(),
                "estimated_index": self.estimated_index.long().cpu().contiguous(),
            }
            save_file(tensors, str(temp / PARAMS_FILE), metadata={"schema_version": "1"})
            write_parquet(self.coefficient_table(), temp / COEFFICIENTS_FILE, metadata)


def load_result(directory: Path) -> FitResult:
    """Read a model directory, refusing anything damaged, foreign or newer."""
    directory = Path(directory)
    restore_interrupted(directory)
    model_path = directory / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(
            f"{directory}: no model here ({MODEL_FILE} missing); run 'choice fit' first "
            "or point --model / CHOICE_MODEL at a model directory"
        )
    try:
        document = json.loads(model_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{model_path}: damaged ({exc}); refit the model") from exc
    if not isinstance(document, dict) or "schema_version" not in document:
        raise ArtifactError(f"{model_path}: not a choice model file (no schema_version)")
    version = document["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{model_path}: schema_version must be a positive integer; refit")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{model_path}: written by a newer choice (schema {version}, this one reads "
            f"{SCHEMA_VERSION}); upgrade choice"
        )
    _validate_document(document, model_path)
    try:
        parameters = [Parameter(**p) for p in document["parameters"]]
        tensors = _load_tensors(directory / PARAMS_FILE)
        result = FitResult(
            spec=document["spec"],
            labels=document["labels"],
            parameters=parameters,
            estimate=tensors["estimate"],
            std_error=tensors["std_error"],
            identified=tensors["identified"].bool(),
            covariance=tensors["covariance"],
            estimated_index=tensors["estimated_index"],
            fit=document["fit"],
            warnings=document.get("warnings", []),
            provenance=document.get("provenance", {}),
        )
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{model_path}: incomplete or edited ({exc}); refit the model") from exc
    count = len(parameters)
    if any(result.__dict__[n].shape != (count,) for n in ("estimate", "std_error", "identified")):
        raise ArtifactError(
            f"{directory / PARAMS_FILE}: holds {result.estimate.shape[0]} parameters but "
            f"{MODEL_FILE} lists {count}; the files do not belong together, refit the model"
        )
    index = result.estimated_index
    size = int(index.numel())
    if index.dim() != 1 or (size and (int(index.min()) < 0 or int(index.max()) >= count)):
        raise ArtifactError(f"{directory / PARAMS_FILE}: estimated_index out of range; refit")
    if result.covariance.numel() and tuple(result.covariance.shape) != (size, size):
        raise ArtifactError(
            f"{directory / PARAMS_FILE}: covariance is {tuple(result.covariance.shape)}, "
            f"expected ({size}, {size}); refit the model"
        )
    return result


def _validate_document(document: dict, model_path: Path) -> None:
    """The structure load and predict rely on; anything else is an edited or foreign file."""

    def fail(what: str) -> ArtifactError:
        return ArtifactError(f"{model_path}: {what}; the file was edited or damaged, refit")

    spec, labels = document.get("spec"), document.get("labels")
    if not isinstance(spec, dict) or not isinstance(spec.get("formula"), str):
        raise fail("'spec' must hold the formula")
    roles = spec.get("roles")
    allowed = {"case", "item", "choice", "user", "session", "available", "weights"}
    if (
        not isinstance(roles, dict)
        or not set(roles) <= allowed
        or not all(isinstance(roles.get(k), str) for k in ("case", "item"))
    ):
        raise fail("'spec.roles' must name the case and item columns")
    nests = spec.get("nests")
    if nests is not None and not (
        isinstance(nests, dict) and all(isinstance(v, list) for v in nests.values())
    ):
        raise fail("'spec.nests' must map nests to lists of alternatives")
    if not isinstance(labels, dict) or not isinstance(labels.get("items"), list):
        raise fail("'labels.items' must list the alternatives")
    for key in ("users", "nests"):
        if labels.get(key) is not None and not isinstance(labels[key], list):
            raise fail(f"'labels.{key}' must be a list")
    parameters = document.get("parameters")
    fields = set(Parameter.__dataclass_fields__)
    if not isinstance(parameters, list) or not all(
        isinstance(p, dict) and set(p) == fields for p in parameters
    ):
        raise fail("'parameters' must list every parameter with its fields")
    if not isinstance(document.get("fit"), dict):
        raise fail("'fit' must hold the fit statistics")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ArtifactError(f"{path}: missing; refit the model")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(
            f"{path}: not a valid safetensors file ({exc}); parameter files are never "
            "unpickled, refit the model"
        ) from exc


def _jsonable(values: list | None) -> list | None:
    if values is None:
        return None
    return [v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in values]
