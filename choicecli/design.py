"""Terms plus data to coefficient blocks the model multiplies; the parameter layout.

Notation: R rows, K columns of a term, G coefficient groups of a term (1, J, U or U*J),
P parameters in the layout (every coefficient, the fixed base rows included).
A block's coefficient for row r is `layout_index[code[r]]`, a (K,) row of parameter numbers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from choicecli.data import ChoiceData
from choicecli.errors import FormulaError
from choicecli.formula import Term, Variation, suggest


@dataclass(frozen=True)
class Level:
    """What `item` means in a formula: alternatives (level 'item') or nests (level 'nest')."""

    name: str  # 'item' or 'nest'
    labels: list  # (J,) labels of alternatives or nests
    code_of_item: torch.Tensor | None  # (J_items,) nest of each alternative; None at item level
    base: int = 0  # index of the base alternative (or nest)

    def codes(self, data: ChoiceData) -> torch.Tensor:  # (R,)
        if self.code_of_item is None:
            return data.item_index
        return self.code_of_item[data.item_index]


@dataclass(frozen=True)
class Parameter:
    """One row of the coefficient table."""

    level: str
    term: str
    variable: str
    variation: str
    feature: str | None
    item: str | None
    user: str | None
    fixed: bool
    # mixed logit only (None otherwise, and then left out of model.json): mean, sd or cholesky;
    # the coefficient's distribution; a Cholesky entry's column coefficient
    parameter: str | None = None
    distribution: str | None = None
    partner: str | None = None


@dataclass
class Block:
    """One term's coefficients: values x (R, K) times a (K,) coefficient row picked per row."""

    term: Term
    level: Level
    features: list[str]
    x: torch.Tensor | None  # (R, K) float64; None once released (the model holds a copy)
    code: torch.Tensor | None  # (R,) long in [0, G); None once released
    layout_index: torch.Tensor  # (G, K) long: parameter numbers in the layout

    @property
    def n_features(self) -> int:
        return len(self.features)


def resolve_features(term: Term, columns: list[str], roles: list[str], where: str) -> list[str]:
    """The data columns a term uses: itself, or every column a glob matches (table order).

    A name in backticks is literal; a glob that matches nothing but is a column's exact name
    (`x[1]` written bare) names that column.
    """
    if term.is_intercept:
        return ["intercept"]
    candidates = [c for c in columns if c not in roles]
    if term.is_glob:
        matched = [c for c in candidates if fnmatch.fnmatchcase(c, term.variable)]
        if matched:
            return matched
        if term.variable not in columns:
            raise FormulaError(
                f"{where}: the glob {term.variable!r} in term {term.name} matches no column"
                f"{suggest(term.variable, candidates)}"
            )
    if term.variable not in columns:
        raise FormulaError(
            f"{where}: unknown column {term.variable!r} in term {term.name}"
            f"{suggest(term.variable, candidates)}"
        )
    if term.variable in roles:
        raise FormulaError(
            f"{where}: column {term.variable!r} in term {term.name} is also a role column "
            "(case, item, choice, user, session, available or weights)"
        )
    return [term.variable]


def n_groups(variation: Variation, n_labels: int, n_users: int) -> int:
    by_user = n_users if variation.by_user else 1
    by_item = n_labels if variation.by_item else 1
    return by_user * by_item


def build_layout(
    terms: list[Term],
    features: list[list[str]],
    level: Level,
    user_labels: list | None,
    parameters: list[Parameter],
) -> list[torch.Tensor]:
    """Append every parameter of `terms` to `parameters`; return each term's (G, K) index."""
    indices = []
    for term, names in zip(terms, features, strict=True):
        if term.variation.by_user and user_labels is None:
            raise FormulaError(
                f"term {term.name} varies by user, but no --user column was given; "
                "name the decision-maker column with --user"
            )
        users = user_labels if term.variation.by_user else [None]
        items = level.labels if term.variation.by_item else [None]
        start = len(parameters)
        for user in users:
            for position, item in enumerate(items):
                fixed = term.variation.has_base and position == level.base
                for feature in names:
                    parameters.append(
                        Parameter(
                            level=level.name,
                            term=term.name,
                            variable=term.variable_name,
                            variation=term.variation.value,
                            feature=feature,
                            item=None if item is None else str(item),
                            user=None if user is None else str(user),
                            fixed=fixed,
                        )
                    )
        count = len(users) * len(items) * len(names)
        index = torch.arange(start, start + count, dtype=torch.long)
        indices.append(index.view(len(users) * len(items), len(names)))  # (G, K)
    return indices


def build_blocks(
    terms: list[Term],
    features: list[list[str]],
    layout: list[torch.Tensor],
    level: Level,
    data: ChoiceData,
) -> list[Block]:
    """Attach each term's values (R, K) and row codes to its slice of the layout."""
    item_codes = level.codes(data)  # (R,)
    users = data.user_of_row  # (R,) or None
    blocks = []
    ones = torch.ones(1, dtype=torch.float64).expand(data.n_rows)  # (R,) no memory
    for term, names, index in zip(terms, features, layout, strict=True):
        columns = [ones if name == "intercept" else data.columns[name] for name in names]
        # one column: a view, not a copy (the data may be large)
        x = columns[0].unsqueeze(1) if len(columns) == 1 else torch.stack(columns, dim=1)  # (R, K)
        variation = term.variation
        if variation.by_user and variation.by_item:
            code = users * len(level.labels) + item_codes
        elif variation.by_user or variation.by_item:  # shared with the data, not copied
            code = users if variation.by_user else item_codes
        else:
            code = torch.zeros(1, dtype=torch.long).expand(data.n_rows)
        blocks.append(Block(term, level, names, x, code, index))
    return blocks
