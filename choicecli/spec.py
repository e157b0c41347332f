"""A ModelSpec to and from the `spec` object of model.json.

The document holds every ModelSpec field (nests and base as the fit resolved them), plus what
the fit derived and reports (`terms`, `options`). Reading checks the type and range of every
field, so an edited model.json is one clear line, never a failure deep inside predict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from typing import Any

from choicecli.data import Roles
from choicecli.errors import ArtifactError
from choicecli.problem import ModelSpec

MISSING_CHOICES = ("error", "drop")


def spec_document(
    spec: ModelSpec, terms: list[dict] | None = None, options: dict | None = None
) -> dict[str, Any]:
    """The `spec` object of model.json; `nests` must be resolved (nest -> alternatives)."""
    if isinstance(spec.nests, str):
        raise ValueError("resolve the nests (a dict) before writing the spec")
    return {
        "formula": spec.formula,
        "nest_formula": spec.nest_formula if spec.nests is not None else None,
        "nests": spec.nests,
        "shared_lambda": spec.shared_lambda,
        "lambda_init": spec.lambda_init,
        "lambda_fixed": spec.lambda_fixed,
        "lambda_bounds": list(spec.lambda_bounds) if spec.lambda_bounds else None,
        "roles": asdict(spec.roles),
        "base": spec.base,
        "missing": spec.missing,
        "terms": terms or [],
        "options": options or {},
    } | _random_document(spec)


def _random_document(spec: ModelSpec) -> dict[str, Any]:
    """A mixed logit's random coefficients and draws; nothing for other models."""
    if not spec.random:
        return {}
    return {
        "random": [{"term": term, "distribution": name} for term, name in spec.random],
        "correlated": spec.correlated,
        "draws": spec.draws,
        "draw_kind": spec.draw_kind,
        "seed": spec.seed,
    }


def spec_from_document(document: Any, where: str = "model.json") -> ModelSpec:
    """The ModelSpec a `spec` object describes; anything malformed is an ArtifactError."""

    def fail(what: str) -> ArtifactError:
        return ArtifactError(f"{where}: {what}; the file was edited or damaged, refit")

    if not isinstance(document, dict) or not isinstance(document.get("formula"), str):
        raise fail("'spec' must hold the formula")
    formula = document["formula"]
    if not formula.strip():
        raise fail("'spec.formula' is empty")
    roles = _roles(document.get("roles"), fail)
    nests = document.get("nests")
    if nests is not None and not (
        isinstance(nests, dict)
        and nests
        and all(isinstance(v, list) and v for v in nests.values())
        and all(isinstance(x, (str, int)) for v in nests.values() for x in v)
    ):
        raise fail("'spec.nests' must map nests to lists of alternatives")
    nest_formula = document.get("nest_formula")
    if nest_formula is not None and not isinstance(nest_formula, str):
        raise fail("'spec.nest_formula' must be text")
    return ModelSpec(
        formula=formula,
        roles=roles,
        nest_formula=nest_formula or "",
        nests=nests,
        shared_lambda=_flag(document, "shared_lambda", fail),
        lambda_init=_lambda_init(document.get("lambda_init", 1.0), fail),
        lambda_fixed=_flag(document, "lambda_fixed", fail),
        lambda_bounds=_bounds(document.get("lambda_bounds"), fail),
        base=_base(document.get("base"), fail),
        missing=_missing(document.get("missing", "error"), fail),
        **_random_fields(document, fail),
    )


def _random_fields(document: dict, fail) -> dict[str, Any]:
    """The mixed logit's ModelSpec fields from the document (none when it has no 'random')."""
    from choicecli.draws import DISTRIBUTIONS, DRAW_KINDS

    random = document.get("random")
    if random is None:
        return {}
    if not (
        isinstance(random, list)
        and random
        and all(
            isinstance(entry, dict)
            and set(entry) == {"term", "distribution"}
            and isinstance(entry["term"], str)
            and entry["distribution"] in DISTRIBUTIONS
            for entry in random
        )
    ):
        raise fail("'spec.random' must list each random term with a known distribution")
    draws, seed = document.get("draws"), document.get("seed")
    if not (isinstance(draws, int) and not isinstance(draws, bool) and draws >= 1):
        raise fail("'spec.draws' must be a positive integer")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        raise fail("'spec.seed' must be an integer 0 or more")
    if document.get("draw_kind") not in DRAW_KINDS:
        raise fail(f"'spec.draw_kind' must be one of {', '.join(DRAW_KINDS)}")
    return {
        "random": tuple((entry["term"], entry["distribution"]) for entry in random),
        "correlated": _flag(document, "correlated", fail),
        "draws": draws,
        "draw_kind": document["draw_kind"],
        "seed": seed,
    }


def _roles(value: Any, fail) -> Roles:
    names = {field.name for field in fields(Roles)}
    if (
        not isinstance(value, dict)
        or not set(value) <= names
        or not all(isinstance(value.get(k), str) and value[k] for k in ("case", "item"))
        or not all(v is None or isinstance(v, str) for v in value.values())
    ):
        raise fail("'spec.roles' must name the case and item columns")
    return Roles(**value)


def _flag(document: dict, name: str, fail) -> bool:
    value = document.get(name, False)
    if not isinstance(value, bool):
        raise fail(f"'spec.{name}' must be true or false")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lambda_init(value: Any, fail) -> float:
    if not _number(value) or value <= 0:
        raise fail("'spec.lambda_init' must be a positive number")
    return float(value)


def _bounds(value: Any, fail) -> tuple[float, float] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)):
        raise fail("'spec.lambda_bounds' must be [LOW, HIGH]")
    low, high = float(value[0]), float(value[1])
    if not 0 < low < high:
        raise fail("'spec.lambda_bounds' must have 0 < LOW < HIGH")
    return low, high


def _base(value: Any, fail) -> str | None:
    if value is not None and not isinstance(value, str):
        raise fail("'spec.base' must be an alternative's label")
    return value


def _missing(value: Any, fail) -> str:
    if value not in MISSING_CHOICES:
        raise fail("'spec.missing' must be error or drop")
    return value
