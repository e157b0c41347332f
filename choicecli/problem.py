"""From a spec and a long table to a model ready to evaluate: data, layout, blocks, model.

Shared by fitting and prediction, so both build exactly the same parameter layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import polars as pl
import torch

from choicecli.data import ChoiceData, Roles, load_choice_data
from choicecli.design import Block, Level, Parameter, build_blocks, build_layout, resolve_features
from choicecli.draws import DEFAULT_DRAWS
from choicecli.errors import ChoiceError, FormulaError, UsageError
from choicecli.formula import Term, parse_formula
from choicecli.models import (
    ColumnStore,
    ConditionalLogit,
    HandedRows,
    NestedLogit,
    NestedRows,
    nested_logit,
)
from choicecli.nests import nest_codes, parse_nests


@dataclass(frozen=True)
class ModelSpec:
    """What to fit: formulas, column roles, nests and lambda settings."""

    formula: str
    roles: Roles
    nest_formula: str = ""
    nests: dict[str, list[str]] | str | None = None  # spec text, or resolved nest -> alternatives
    shared_lambda: bool = False
    lambda_init: float = 1.0
    lambda_fixed: bool = False
    lambda_bounds: tuple[float, float] | None = None
    base: str | None = None
    missing: str = "error"
    # mixed logit (none when `random` is empty): (term, distribution) pairs, how to draw
    random: tuple[tuple[str, str], ...] = ()
    correlated: bool = False
    draws: int = DEFAULT_DRAWS
    draw_kind: str = "halton"
    seed: int = 0


@dataclass
class Problem:
    spec: ModelSpec
    data: ChoiceData
    terms: list[Term]
    nest_terms: list[Term]
    features: list[list[str]]
    nest_features: list[list[str]]
    parameters: list[Parameter]
    item_blocks: list[Block]
    nest_blocks: list[Block]
    start: torch.Tensor  # (P,) starting values; fixed parameters keep theirs
    fixed: torch.Tensor  # (P,) bool
    lower: torch.Tensor  # (P,)
    upper: torch.Tensor  # (P,)
    nests: dict[str, list[str]] | None = None
    nest_of_item: torch.Tensor | None = None  # (J,)
    lambda_index: torch.Tensor | None = None  # (M,)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mixed: MixedLayout | None = None  # the random coefficients of a mixed logit
    released: bool = False  # the per-row values are gone: no further model can be built

    @property
    def nested(self) -> bool:
        return self.nests is not None

    def release_values(self) -> None:
        """Drop the per-row values and vectors once a model holds its own copy: the data is then
        held once, and while a model is fitted only by the model."""
        self.data.release_columns()
        self.data.release_rows()
        for block in self.item_blocks + self.nest_blocks:
            block.x = block.code = None
        self.released = True

    def _check_values(self) -> None:
        if self.released:
            raise RuntimeError("the problem's values were released; build the problem again")

    def model(self, device: torch.device, release: bool = False) -> ConditionalLogit | NestedLogit:
        """The likelihood object on `device`.

        release: a conditional logit takes the values and the row vectors over: the problem
        drops them first (see `release_values`) and the model frees each column once copied, so
        the data is never held twice and, once the model is built, only the model holds it.
        """
        self._check_values()
        data = self.data
        to = {"device": device}
        item_blocks = [_block_to(b, device) for b in self.item_blocks]
        weights = data.case_weights.to(**to) if data.case_weights is not None else None
        if not self.nested:
            rows = HandedRows(
                data.case_index.to(**to),
                data.item_index.to(**to),
                data.chosen.to(**to) if data.chosen is not None else None,
            )
            if release:  # item_blocks and `rows` now hold the only references: the model
                self.release_values()  # empties both as it lays them out
            store = ColumnStore(  # fresh Block objects: the store drops their values, not ours
                item_blocks, len(self.parameters), rows, data.n_cases, data.n_items,
                own_blocks=True,
            )  # fmt: skip
            user_of_case = data.user_of_case.to(**to) if data.user_of_case is not None else None
            return ConditionalLogit(store, user_of_case, weights)
        chosen = data.chosen.to(**to) if data.chosen is not None else None
        rows = NestedRows(
            item_blocks,
            [_block_to(b, device) for b in self.nest_blocks],
            self.lambda_index.to(**to),
            self.nest_of_item.to(**to),
            len(self.parameters),
            data.case_index.to(**to),
            data.item_index.to(**to),
            data.n_cases,
            chosen,
            weights,
            data.user_of_case.to(**to) if data.user_of_case is not None else None,
        )
        return nested_logit(rows)

    def identification_model(self) -> ConditionalLogit:
        """The conditional logit with both levels' terms: the nested model at lambda = 1."""
        self._check_values()
        data = self.data
        rows = HandedRows(data.case_index, data.item_index, data.chosen)
        blocks = self.item_blocks + self.nest_blocks
        store = ColumnStore(blocks, len(self.parameters), rows, data.n_cases, data.n_items)
        return ConditionalLogit(store, data.user_of_case, data.case_weights)


def _block_to(block: Block, device: torch.device) -> Block:
    level = block.level
    if level.code_of_item is not None:
        level = Level(level.name, level.labels, level.code_of_item.to(device), level.base)
    return Block(
        block.term,
        level,
        block.features,
        block.x.to(device),
        block.code.to(device),
        block.layout_index.to(device),
    )


def build_problem(
    frame: pl.DataFrame,
    spec: ModelSpec,
    where: str,
    *,
    item_labels: list | None = None,
    user_labels: list | None = None,
    drop_single_alternative: bool = True,
    consume: bool = False,
) -> Problem:
    """Parse, validate and lay out everything a fit or a prediction needs.

    consume: the caller hands the frame over; it is left empty (see `load_choice_data`).
    """
    formulas = _Formulas.parse(spec, frame, where)
    data = load_choice_data(
        frame,
        spec.roles,
        formulas.used_columns(),
        where=where,
        missing=spec.missing,
        item_labels=item_labels,
        user_labels=user_labels,
        drop_single_alternative=drop_single_alternative,
        consume=consume,
    )
    base = _base_index(spec.base, data.item_labels)
    item_level = Level("item", data.item_labels, None, base)
    parameters: list[Parameter] = []
    terms, features = formulas.terms, formulas.features
    item_layout = build_layout(terms, features, item_level, data.user_labels, parameters)
    item_blocks = build_blocks(terms, features, item_layout, item_level, data)
    nests = formulas.nests
    nest_blocks: list[Block] = []
    nest_of_item = lambda_index = None
    if nests is not None:
        nest_of_item = nest_codes(nests, data.item_labels)
        nest_blocks = _nest_blocks(formulas, data, nest_of_item, parameters, where)
        lambda_index = _lambda_layout(nests, spec, parameters)
    start, fixed, lower, upper = _starting_values(parameters, lambda_index, spec)
    mixed = _mixed_layout(spec, terms, parameters) if spec.random else None
    return Problem(
        spec=spec,
        data=data,
        terms=terms,
        nest_terms=formulas.nest_terms,
        features=features,
        nest_features=formulas.nest_features,
        parameters=parameters,
        item_blocks=item_blocks,
        nest_blocks=nest_blocks,
        start=start,
        fixed=fixed,
        lower=lower,
        upper=upper,
        nests=dict(nests) if nests is not None else None,
        nest_of_item=nest_of_item,
        lambda_index=lambda_index,
        notes=list(data.notes),
        warnings=list(data.warnings),
        mixed=mixed,
    )


@dataclass
class _Formulas:
    """Both formulas parsed, their columns resolved against the table, and the nests."""

    terms: list[Term]
    features: list[list[str]]
    nests: dict[str, list[str]] | None = None
    nest_terms: list[Term] = field(default_factory=list)
    nest_features: list[list[str]] = field(default_factory=list)

    @classmethod
    def parse(cls, spec: ModelSpec, frame: pl.DataFrame, where: str) -> _Formulas:
        role_names = spec.roles.names()
        terms = parse_formula(spec.formula)
        formulas = cls(
            terms, [resolve_features(t, frame.columns, role_names, where) for t in terms]
        )
        if spec.nests is not None:
            formulas.nests = (
                spec.nests
                if isinstance(spec.nests, dict)
                else parse_nests(spec.nests, frame, spec.roles.item)
            )
            nest_terms = parse_formula(spec.nest_formula, allow_empty=True, label="nest formula")
            formulas.nest_terms = nest_terms
            formulas.nest_features = [
                resolve_features(t, frame.columns, role_names, where) for t in nest_terms
            ]
        elif spec.nest_formula.strip():
            raise UsageError(
                "--nest-formula needs --nests to say which alternatives form each nest"
            )
        return formulas

    def used_columns(self) -> list[str]:
        """Every column a term reads, once, in formula order."""
        names = self.features + self.nest_features
        return list(dict.fromkeys(n for group in names for n in group if n != "intercept"))


def _nest_blocks(
    formulas: _Formulas,
    data: ChoiceData,
    nest_of_item: torch.Tensor,  # (J,)
    parameters: list[Parameter],
    where: str,
) -> list[Block]:
    """The nest formula's blocks (their parameters appended), checked constant in a nest."""
    nest_level = Level("nest", list(formulas.nests), nest_of_item, 0)
    terms, features = formulas.nest_terms, formulas.nest_features
    nest_layout = build_layout(terms, features, nest_level, data.user_labels, parameters)
    nest_blocks = build_blocks(terms, features, nest_layout, nest_level, data)
    _check_constant_within_nest(nest_blocks, data, nest_of_item, where)
    return nest_blocks


def _starting_values(
    parameters: list[Parameter], lambda_index: torch.Tensor | None, spec: ModelSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Start, fixed, lower and upper bounds of every parameter. (P,) x 4"""
    n_parameters = len(parameters)
    fixed = torch.tensor([p.fixed for p in parameters], dtype=torch.bool)
    start = torch.zeros(n_parameters, dtype=torch.float64)
    lower = torch.full((n_parameters,), -torch.inf, dtype=torch.float64)
    upper = torch.full((n_parameters,), torch.inf, dtype=torch.float64)
    if lambda_index is not None:
        start[lambda_index] = spec.lambda_init
        if not spec.lambda_fixed:  # a single-alternative nest's lambda cancels: held at 1
            start[lambda_index[fixed[lambda_index]]] = 1.0
        lower[lambda_index] = spec.lambda_bounds[0] if spec.lambda_bounds else 1e-3
        if spec.lambda_bounds:
            upper[lambda_index] = spec.lambda_bounds[1]
    return start, fixed, lower, upper


def table_columns(spec: ModelSpec, columns: list[str]) -> list[str]:
    """The columns of a table (named `columns`) that `spec` reads, in table order.

    All of them when a name does not resolve, so the error that follows lists the table's columns.
    """
    role_names = spec.roles.names()
    wanted = set(role_names)
    try:
        terms = parse_formula(spec.formula)
        if spec.nests is not None:
            terms += parse_formula(spec.nest_formula, allow_empty=True, label="nest formula")
        for term in terms:
            if not term.is_intercept:
                wanted.update(resolve_features(term, columns, role_names, "table"))
    except ChoiceError:
        return list(columns)
    if isinstance(spec.nests, str) and spec.nests.startswith("col:"):
        wanted.add(spec.nests[4:])
    if not wanted <= set(columns):
        return list(columns)
    return [name for name in columns if name in wanted]


def _base_index(base: str | None, item_labels: list) -> int:
    if base is None:
        return 0
    labels = [str(label) for label in item_labels]
    if base not in labels:
        raise FormulaError(
            f"--base {base!r} is not an alternative in the data ({', '.join(labels)})"
        )
    return labels.index(base)


def _lambda_layout(
    nests: dict[str, list[str]], spec: ModelSpec, parameters: list[Parameter]
) -> torch.Tensor:
    """Append the lambda parameters; return each nest's lambda position. (M,)"""
    start = len(parameters)
    if spec.shared_lambda:
        parameters.append(
            Parameter("nest", "lambda", "lambda", "constant", None, None, None, spec.lambda_fixed)
        )
        return torch.full((len(nests),), start, dtype=torch.long)
    for nest, members in nests.items():
        single = len(members) == 1
        parameters.append(
            Parameter(
                "nest", "lambda", "lambda", "item", None, nest, None, spec.lambda_fixed or single
            )  # fmt: skip
        )
    return torch.arange(start, start + len(nests), dtype=torch.long)


def _check_constant_within_nest(
    blocks: list[Block], data: ChoiceData, nest_of_item: torch.Tensor, where: str
) -> None:
    """Nest-formula columns must not vary within a (case, nest) pair."""
    n_nests = int(nest_of_item.max()) + 1
    pair = data.case_index * n_nests + nest_of_item[data.item_index]  # (R,)
    for block in blocks:
        for k, name in enumerate(block.features):
            if name == "intercept":
                continue
            values = block.x[:, k]
            size = data.n_cases * n_nests
            low = torch.full((size,), torch.inf, dtype=values.dtype).scatter_reduce(
                0, pair, values, "amin"
            )
            high = torch.full((size,), -torch.inf, dtype=values.dtype).scatter_reduce(
                0, pair, values, "amax"
            )
            varying = (high > low).nonzero().flatten()
            if varying.numel():
                case = data.case_labels[int(varying[0]) // n_nests]
                raise FormulaError(
                    f"{where}: nest-formula column {name!r} varies within a nest in "
                    f"{varying.numel()} (case, nest) pairs (first: case {case!r}); nest-level "
                    "columns must be constant within each nest of a case"
                )


# -- mixed logit: which coefficients are random, their spreads, the design they multiply --


@dataclass
class MixedLayout:
    """The random coefficients of a mixed logit over the conditional layout of the formula.

    `means` are layout positions (their Parameter rows become the means); the spreads and the
    Cholesky entries are parameters of their own, appended after the layout (`extra`).
    """

    means: list[int]  # (Kr,) layout positions of the random coefficients
    distributions: tuple[str, ...]  # (Kr,)
    extra: list[Parameter]  # sd per random coefficient, then the Cholesky entries
    correlated: bool


def _mixed_layout(spec: ModelSpec, terms: list[Term], parameters: list[Parameter]) -> MixedLayout:
    """Mark the random coefficients' rows as means; their spreads (and Cholesky entries)."""
    from choicecli.models.mixed import MixedSpec

    if spec.nests is not None:
        raise UsageError(
            "a nested mixed logit is not supported: drop --random, or --nests and --nest-formula"
        )
    names = [term.name for term in terms]
    for term in terms:
        if term.variation.by_user:
            raise FormulaError(
                f"term {term.name} varies by user, which a mixed logit does not support (its "
                "random coefficients are the per-user variation); use another variation"
            )
    means: list[int] = []
    distributions: list[str] = []
    for name, distribution in spec.random:
        if name not in names:
            raise FormulaError(
                f"--random {name}={distribution}: {name!r} is not a term of the formula; its "
                f"terms are: {', '.join(names)}"
            )
        for position, parameter in enumerate(parameters):
            if parameter.term == name and not parameter.fixed:
                parameters[position] = replace(
                    parameter, parameter="mean", distribution=distribution
                )
                means.append(position)
                distributions.append(distribution)
    mixed_spec = MixedSpec(0, tuple(distributions), spec.correlated)  # checks the names
    extra = [replace(parameters[p], parameter="sd") for p in means]
    for row, column in mixed_spec.cholesky_pairs:
        partner = _coefficient_label(parameters[means[column]])
        extra.append(replace(parameters[means[row]], parameter="cholesky", partner=partner))
    return MixedLayout(means, tuple(distributions), extra, spec.correlated)


def _coefficient_label(parameter: Parameter) -> str:
    """A coefficient's name: its term, with the feature and alternative where they differ."""
    label = parameter.term
    if parameter.feature not in (None, "intercept", parameter.variable):
        label += f" {parameter.feature}"
    return label + (f" {parameter.item}" if parameter.item is not None else "")


def dense_design(problem: Problem, positions: list[int]) -> torch.Tensor:
    """The values each layout position in `positions` multiplies on each row. (R, len)"""
    problem._check_values()
    data = problem.data
    design = torch.zeros((data.n_rows, len(problem.parameters)), dtype=torch.float64)  # (R, P)
    for block in problem.item_blocks:
        index = block.layout_index[block.code]  # (R, K) parameter of each value
        design.scatter_add_(1, index, block.x.to(torch.float64))
    return design[:, positions].contiguous()  # (R, len)
