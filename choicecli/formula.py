"""Parse formula text into terms. Knows no data.

formula   := term ('+' term)*
term      := '(' variable '|' variation ')'
variable  := '1' | column | glob | `any text`
variation := constant | item | item-full | user | user-item | user-item-full

Only '(', ')', '|', '+' and whitespace delimit; names may hold dots and other punctuation.
A name in backticks is taken literally: `travel time [min]` names that column, never a glob.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import StrEnum

from choicecli.errors import FormulaError

DELIMITERS = "()|+"
GLOB_CHARACTERS = "*?["


class Variation(StrEnum):
    """What a coefficient varies by."""

    CONSTANT = "constant"
    ITEM = "item"
    ITEM_FULL = "item-full"
    USER = "user"
    USER_ITEM = "user-item"
    USER_ITEM_FULL = "user-item-full"

    @property
    def by_item(self) -> bool:
        return self in (Variation.ITEM, Variation.ITEM_FULL, Variation.USER_ITEM,
                        Variation.USER_ITEM_FULL)  # fmt: skip

    @property
    def by_user(self) -> bool:
        return self in (Variation.USER, Variation.USER_ITEM, Variation.USER_ITEM_FULL)

    @property
    def has_base(self) -> bool:
        """True where the base alternative's coefficient is fixed at zero."""
        return self in (Variation.ITEM, Variation.USER_ITEM)


@dataclass(frozen=True)
class Term:
    """One `(variable|variation)` term. `variable` is '1' for an intercept; `literal`: it was
    written in backticks, so glob characters in it are part of the name."""

    variable: str
    variation: Variation
    position: int = 0
    literal: bool = False

    @property
    def is_intercept(self) -> bool:
        return self.variable == "1"

    @property
    def is_glob(self) -> bool:
        return not self.literal and any(char in self.variable for char in GLOB_CHARACTERS)

    @property
    def variable_name(self) -> str:
        return "intercept" if self.is_intercept else self.variable

    @property
    def name(self) -> str:
        return f"{self.variable_name}[{self.variation.value}]"


@dataclass(frozen=True)
class _Token:
    kind: str  # one of ( ) | + or 'name'
    text: str
    position: int
    quoted: bool = False  # a name written in backticks


def parse_formula(text: str, *, allow_empty: bool = False, label: str = "formula") -> list[Term]:
    """Parse formula text into its terms, in order; errors name the position (1-based)."""
    tokens = _tokenize(text, label)
    if not tokens:
        if allow_empty:
            return []
        raise FormulaError(f"{label} is empty; write terms like '(price|constant) + (1|item)'")
    terms: list[Term] = []
    index = 0
    while True:
        term, index = _parse_term(tokens, index, text, label)
        terms.append(term)
        if index == len(tokens):
            break
        token = tokens[index]
        if token.kind != "+":
            raise _error(
                label, text, token.position, f"expected '+' between terms, found {token.text!r}"
            )
        index += 1
        if index == len(tokens):
            raise _error(label, text, token.position, "a '+' must be followed by a term")
    _reject_duplicates(terms, label)
    return terms


def _tokenize(text: str, label: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char.isspace():
            position += 1
        elif char in DELIMITERS:
            tokens.append(_Token(char, char, position))
            position += 1
        elif char == "`":
            end = text.find("`", position + 1)
            if end < 0:
                raise _error(label, text, position, "unclosed backtick")
            if end == position + 1:
                raise _error(label, text, position, "empty name between backticks")
            tokens.append(_Token("name", text[position + 1 : end], position, quoted=True))
            position = end + 1
        else:
            start = position
            while (
                position < len(text)
                and not text[position].isspace()
                and text[position] not in DELIMITERS + "`"
            ):
                position += 1
            tokens.append(_Token("name", text[start:position], start))
    return tokens


def _parse_term(tokens: list[_Token], index: int, text: str, label: str) -> tuple[Term, int]:
    def expect(kind: str, what: str) -> _Token:
        nonlocal index
        if index >= len(tokens):
            raise _error(label, text, len(text), f"expected {what}, found the end of the {label}")
        token = tokens[index]
        if token.kind != kind:
            raise _error(label, text, token.position, f"expected {what}, found {token.text!r}")
        index += 1
        return token

    start = expect("(", "'(' to open a term like (price|constant)")
    variable = expect("name", "a column name, a glob or 1")
    expect("|", "'|' between the variable and its variation")
    variation_token = expect("name", "a variation (constant, item, item-full, user, ...)")
    expect(")", "')' to close the term")
    variation = _variation(variation_token, text, label)
    return Term(variable.text, variation, start.position, literal=variable.quoted), index


def _variation(token: _Token, text: str, label: str) -> Variation:
    try:
        return Variation(token.text)
    except ValueError:
        choices = [v.value for v in Variation]
        close = difflib.get_close_matches(token.text, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; use one of {', '.join(choices)}"
        raise _error(
            label, text, token.position, f"unknown variation {token.text!r}{hint}"
        ) from None


def _reject_duplicates(terms: list[Term], label: str) -> None:
    seen: dict[tuple[str, Variation], Term] = {}
    for term in terms:
        key = (term.variable, term.variation)
        if key in seen:
            raise FormulaError(
                f"{label}: duplicate term {term.name} at position {term.position + 1} "
                f"(first at position {seen[key].position + 1}); remove one"
            )
        seen[key] = term


def _error(label: str, text: str, position: int, message: str) -> FormulaError:
    return FormulaError(f"{label} position {position + 1}: {message} in {text!r}")


def suggest(name: str, candidates: list[str]) -> str:
    """A ' did you mean ...?' hint for an unknown name, or ''."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
