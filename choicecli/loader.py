"""Read a saved model for every command (coef, plot, predict), trusting nothing in it.

The three files must be regular files of one fit: model.json (bounded in size and depth, every
field of the structure checked), params.safetensors (never unpickled; its tensors of the
lengths model.json lists; identified estimates and the covariance finite) and
coefficients.parquet (a readable footer, one row per parameter). The fit id in model.json must
be the one in the metadata of the other two. Models written before fit ids existed are refused:
refit them. coef and plot derive the coefficient table from params.safetensors, the one source
of the estimates; coefficients.parquet is kept for other tools.

Each problem is one ArtifactError line naming the file. The model's lock is held shared while
the files are read (see `modeldir`), and nothing is ever moved.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from choicecli.design import Parameter
from choicecli.errors import ArtifactError
from choicecli.modeldir import (
    COEFFICIENTS_FILE,
    MODEL_FILE,
    PARAMS_FILE,
    parse_model_json,
    reading_model,
)
from choicecli.results import FIT_ID_KEY, MIXED_FIELDS, SCHEMA_VERSION, FitResult
from choicecli.spec import spec_from_document

TENSORS = ("estimate", "std_error", "identified", "covariance", "estimated_index")
FIT_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def load_result(model: Path) -> FitResult:
    """The fit a model directory holds, checked; refuses anything damaged, mixed or newer."""
    with reading_model(Path(model)) as directory:
        return _load(directory)


def _load(directory: Path) -> FitResult:
    model_path = directory / MODEL_FILE
    if not model_path.exists() and not model_path.is_symlink():
        raise ArtifactError(
            f"{directory}: no model here ({MODEL_FILE} missing); run 'choice fit' first "
            "or point --model / CHOICE_MODEL at a model directory"
        )
    document = parse_model_json(model_path)
    _check_version(document, model_path)
    _validate_document(document, model_path)
    fit_id = document["fit_id"]
    parameters = [Parameter(**p) for p in document["parameters"]]
    tensors = _load_tensors(directory / PARAMS_FILE, fit_id, model_path)
    _check_tensors(tensors, parameters, directory / PARAMS_FILE)
    _check_coefficients(directory / COEFFICIENTS_FILE, fit_id, len(parameters))
    return FitResult(
        spec=document["spec"],
        labels=document["labels"],
        parameters=parameters,
        estimate=tensors["estimate"],
        std_error=tensors["std_error"],
        identified=tensors["identified"].bool(),
        covariance=tensors["covariance"],
        estimated_index=tensors["estimated_index"],
        std_errors={
            name.removeprefix("std_error_"): values
            for name, values in tensors.items()
            if name.startswith("std_error_")
        },
        fit=document["fit"],
        warnings=document.get("warnings", []),
        provenance=document.get("provenance", {}),
        fit_id=fit_id,
    )


def _check_version(document: Any, model_path: Path) -> None:
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


def _validate_document(document: dict, model_path: Path) -> None:
    """The structure load and predict rely on; anything else is an edited or foreign file."""

    def fail(what: str) -> ArtifactError:
        return ArtifactError(f"{model_path}: {what}; the file was edited or damaged, refit")

    if "fit_id" not in document:
        raise ArtifactError(
            f"{model_path}: written by an older choice, without a fit id to tie its files "
            "together; refit the model"
        )
    if not isinstance(document["fit_id"], str) or not FIT_ID_PATTERN.match(document["fit_id"]):
        raise fail("'fit_id' must be 32 hexadecimal digits")
    spec_from_document(document.get("spec"), str(model_path))
    labels = document.get("labels")
    if not isinstance(labels, dict) or not isinstance(labels.get("items"), list):
        raise fail("'labels.items' must list the alternatives")
    for key in ("users", "nests"):
        if labels.get(key) is not None and not isinstance(labels[key], list):
            raise fail(f"'labels.{key}' must be a list")
    parameters = document.get("parameters")
    names = set(Parameter.__dataclass_fields__)
    required = names - set(MIXED_FIELDS)  # the mixed logit's fields are written where set
    if not isinstance(parameters, list) or not all(
        isinstance(p, dict) and required <= set(p) <= names for p in parameters
    ):
        raise fail("'parameters' must list every parameter with its fields")
    if not all(isinstance(p["term"], str) and isinstance(p["level"], str) for p in parameters):
        raise fail("'parameters' must name each parameter's level and term")
    if not isinstance(document.get("fit"), dict):
        raise fail("'fit' must hold the fit statistics")
    if not isinstance(document.get("warnings", []), list):
        raise fail("'warnings' must be a list")
    if not isinstance(document.get("provenance", {}), dict):
        raise fail("'provenance' must be an object")


def _regular_file(path: Path) -> None:
    """Refuse a missing file, a directory, a device or a FIFO before opening it."""
    if not path.exists():
        raise ArtifactError(f"{path}: missing; refit the model")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a regular file; refit the model")


def _load_tensors(path: Path, fit_id: str, model_path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    _regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ArtifactError(
            f"{path}: not a valid safetensors file ({reason}); parameter files are never "
            "unpickled, refit the model"
        ) from exc
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise ArtifactError(f"{path}: no {', '.join(missing)} tensor; refit the model")
    _same_fit(path, metadata.get(FIT_ID_KEY), fit_id, model_path)
    return tensors


def _same_fit(path: Path, found: str | None, fit_id: str, model_path: Path) -> None:
    if found != fit_id:
        which = f"fit {found[:8]}" if found else "a fit without an id"
        raise ArtifactError(
            f"{path}: written by {which}, not by the fit of {model_path} ({fit_id[:8]}); the "
            "files do not belong together, refit the model"
        )


def _check_tensors(tensors: dict[str, torch.Tensor], parameters: list, path: Path) -> None:
    count = len(parameters)
    for name in ("estimate", "std_error", "identified"):
        if tuple(tensors[name].shape) != (count,):
            raise ArtifactError(
                f"{path}: {name} holds {tuple(tensors[name].shape)} values but {MODEL_FILE} "
                f"lists {count} parameters; the files do not belong together, refit the model"
            )
    for name in ("estimate", "std_error", "covariance"):
        if not tensors[name].is_floating_point():
            raise ArtifactError(f"{path}: {name} is not a floating-point tensor; refit the model")
    index = tensors["estimated_index"]
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ArtifactError(f"{path}: estimated_index must be a list of positions; refit")
    size = int(index.numel())
    if size and (int(index.min()) < 0 or int(index.max()) >= count):
        raise ArtifactError(f"{path}: estimated_index out of range; refit")
    covariance = tensors["covariance"]
    if covariance.numel() and tuple(covariance.shape) != (size, size):
        raise ArtifactError(
            f"{path}: covariance is {tuple(covariance.shape)}, expected ({size}, {size}); "
            "refit the model"
        )
    identified = tensors["identified"].bool()  # (P,)
    bad = identified & ~torch.isfinite(tensors["estimate"])  # NaN only where not estimated
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise ArtifactError(
            f"{path}: the estimate of {_name(parameters[first])} is "
            f"{float(tensors['estimate'][first])} ({int(bad.sum())} such); estimates must be "
            "finite, the file was edited or damaged, refit the model"
        )
    if bool(torch.isinf(tensors["std_error"]).any()) or not bool(torch.isfinite(covariance).all()):
        raise ArtifactError(
            f"{path}: the covariance or standard errors hold inf or NaN; the file was edited "
            "or damaged, refit the model"
        )


def _name(parameter: Parameter) -> str:
    where = [str(part) for part in (parameter.item, parameter.user) if part is not None]
    return f"{parameter.term}" + (f" ({', '.join(where)})" if where else "")


def _check_coefficients(path: Path, fit_id: str, count: int) -> None:
    """coefficients.parquet is of this fit and lists every parameter (only its footer is read:
    choice takes the estimates from params.safetensors)."""
    import pyarrow.parquet as pq

    _regular_file(path)
    try:
        footer = pq.read_metadata(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: missing or damaged ({reason}); refit the model") from exc
    found = (footer.metadata or {}).get(FIT_ID_KEY.encode())
    if found != fit_id.encode():
        raise ArtifactError(
            f"{path}: not written by the fit of {MODEL_FILE} (fit ids differ); the files do "
            "not belong together, refit the model"
        )
    if footer.num_rows != count:
        raise ArtifactError(
            f"{path}: {footer.num_rows} rows for {count} parameters in {MODEL_FILE}; refit"
        )
