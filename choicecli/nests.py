"""Nest specifications: inline `a=x,y;b=z`, a JSON file, or `col:NAME`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import torch

from choicecli.errors import FormulaError


def parse_nests(spec: str, frame: pl.DataFrame, item_column: str) -> dict[str, list[str]]:
    """Nest label -> alternative labels (as strings), in the order the spec gives them."""
    spec = spec.strip()
    if spec.startswith("col:"):
        return _nests_from_column(spec[4:], frame, item_column)
    if spec.endswith(".json") or Path(spec).is_file():
        return _nests_from_json(Path(spec))
    return _nests_inline(spec)


def _nests_inline(spec: str) -> dict[str, list[str]]:
    nests: dict[str, list[str]] = {}
    for number, part in enumerate(spec.split(";"), start=1):
        part = part.strip()
        if not part:
            continue
        name, equals, members = part.partition("=")
        if not equals or not name.strip():
            raise FormulaError(
                f"--nests: part {number} ({part!r}) is not NAME=alt,alt; "
                "write e.g. 'cool=gcc,ecc;room=er,ec'"
            )
        name = name.strip()
        if name in nests:
            raise FormulaError(f"--nests: nest {name!r} is given twice")
        nests[name] = [m.strip() for m in members.split(",") if m.strip()]
    if not nests:
        raise FormulaError("--nests is empty; write e.g. 'cool=gcc,ecc;room=er,ec'")
    return nests


def _nests_from_json(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise FormulaError(f"--nests: no such file {str(path)!r}")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormulaError(f"--nests: {path} is not valid JSON ({exc})") from exc
    if not isinstance(content, dict) or not all(isinstance(v, list) for v in content.values()):
        raise FormulaError(f"--nests: {path} must map each nest to a list of alternatives")
    return {str(name): [str(m) for m in members] for name, members in content.items()}


def _nests_from_column(name: str, frame: pl.DataFrame, item_column: str) -> dict[str, list[str]]:
    if name not in frame.columns:
        raise FormulaError(f"--nests col:{name}: no column {name!r} in the table")
    if frame.get_column(name).null_count():
        raise FormulaError(f"--nests col:{name}: the column has empty values")
    per_item = frame.group_by(item_column).agg(pl.col(name).unique())
    varying = per_item.filter(pl.col(name).list.len() > 1)
    if varying.height:
        raise FormulaError(
            f"--nests col:{name}: the nest changes within alternative "
            f"{varying.get_column(item_column)[0]!r}; each alternative belongs to one nest"
        )
    pairs = per_item.with_columns(pl.col(name).list.first()).sort(name)
    nests: dict[str, list[str]] = {}
    for nest, item in zip(pairs.get_column(name), pairs.get_column(item_column), strict=True):
        nests.setdefault(str(nest), []).append(str(item))
    return nests


def nest_codes(nests: dict[str, list[str]], item_labels: list) -> torch.Tensor:
    """The nest of every alternative, checking each is in exactly one nest. (J,)"""
    position = {str(label): index for index, label in enumerate(item_labels)}
    code = torch.full((len(item_labels),), -1, dtype=torch.long)
    for nest_index, (nest, members) in enumerate(nests.items()):
        if not members:
            raise FormulaError(f"--nests: nest {nest!r} is empty; give it alternatives or drop it")
        for member in members:
            if member not in position:
                raise FormulaError(
                    f"--nests: nest {nest!r} names {member!r}, which is not an alternative in "
                    f"the data ({', '.join(map(str, item_labels))})"
                )
            if code[position[member]] >= 0:
                other = list(nests)[int(code[position[member]])]
                raise FormulaError(
                    f"--nests: alternative {member!r} is in two nests ({other!r} and {nest!r})"
                )
            code[position[member]] = nest_index
    missing = [str(item_labels[i]) for i in (code < 0).nonzero().flatten().tolist()]
    if missing:
        raise FormulaError(
            f"--nests: alternative {missing[0]!r} is in no nest ({len(missing)} unassigned); "
            "every alternative must belong to exactly one nest"
        )
    return code
