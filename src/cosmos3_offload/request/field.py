"""`FieldSpec`: one request field's declaration, and how a value of it is read and checked at any door.

A field of `RequestSpec` is declared with `declare(...)`: its default, help text, unit, bounds or
choices, and its name at each door. A door that does not take the field says why (`Absent`), so a
test can list every door's fields against the declaration. Checks raise `FieldError` naming the
field by its `label`; a door renames it to the name its user typed (see checks.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import FieldError, check_choice, check_integer, check_number, check_text, is_integer, shown

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")  # "": a form's empty switch
DOORS = ("cli", "sample", "http", "diffusers")


@dataclass(frozen=True)
class Absent:
    """A door without this field, and why (what the door takes instead)."""

    why: str


Door = str | Absent  # the field's name at a door, or why the door does not take it


@dataclass(frozen=True, kw_only=True)
class FieldSpec:
    """What `declare` records of one field; `kind` is the value's type (int, float, str, bool, Path, or
    tuple for a list of whole numbers); None is a value when the default is None ("the rule": the
    tier's shift, the checkpoint's negative prompt, no image)."""

    name: str
    kind: type
    default: Any
    help: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple = ()
    required: bool = False
    cli: Door
    sample: Door
    http: Door
    diffusers: Door

    @property
    def label(self) -> str:
        """How messages name the field: 'cache threshold', 'frames'."""
        return self.name.replace("_", " ")

    @property
    def flag(self) -> str | None:
        return None if isinstance(self.cli, Absent) else self.cli

    def door(self, door: str) -> str | None:
        """The field's name at `door` (one of DOORS), None where that door does not take it."""
        name = getattr(self, door)
        return None if isinstance(name, Absent) else name

    def check(self, value: Any) -> Any:
        """`value` if this field takes it (a list of whole numbers comes back as a tuple), else a FieldError."""
        with self._refusals():
            return self._checked(value)

    def _checked(self, value: Any) -> Any:
        if value is None and (self.default is None and not self.required):
            return None
        if self.kind is bool:
            if not isinstance(value, bool):
                raise FieldError(self.label, f"must be true or false, got {shown(value)}")
        elif self.choices:
            check_choice(self.label, value, self.choices)
        elif self.kind is int:
            check_integer(self.label, value, int(self.low), int(self.high))
        elif self.kind is float:
            check_number(self.label, value, self.low, self.high, low_open=self.low_open)
        elif self.kind is str:
            check_text(self.label, value, required=self.required)
        elif self.kind is Path:
            if not isinstance(value, (str, Path)) or not str(value):
                raise FieldError(self.label, f"must be a file path, got {shown(value)}")
            return Path(value)
        elif self.kind is tuple:
            if not isinstance(value, (list, tuple)) or not all(is_integer(i) for i in value):
                raise FieldError(self.label, f"must be a list of whole numbers, got {shown(value)}")
            return tuple(value)
        return value

    def from_text(self, text: str) -> Any:
        """The value a flag or a form field spells as text (checked by `check` afterwards)."""
        with self._refusals():
            return self._read(text)

    @contextmanager
    def _refusals(self) -> Iterator[None]:
        """A check's FieldError, marked as this field's (so a door can rename it)."""
        try:
            yield
        except FieldError as error:
            raise FieldError(error.name, error.problem, field=self.name) from None

    def _read(self, text: str) -> Any:
        word = text.strip()
        try:
            if self.kind is int:
                return int(word)
            if self.kind is float:
                return float(word)
        except ValueError:
            kind = "a whole number" if self.kind is int else "a number"
            raise FieldError(self.label, f"must be {kind}, got {shown(text)}") from None
        if self.kind is bool:
            if word.lower() not in TRUE + FALSE:
                raise FieldError(self.label, f"must be true or false, got {shown(text)}")
            return word.lower() in TRUE
        if self.kind is Path:
            return Path(text)
        return text

    def describe(self) -> str:
        """The help text with the bounds or choices and the default, as --help shows it."""
        parts = [self.help]
        if self.choices:
            parts.append(f"one of {', '.join(map(str, self.choices))}")
        elif self.low is not None:
            low, high = (f"{bound}" if self.kind is int else f"{bound:g}" for bound in (self.low, self.high))
            low += " (exclusive)" if self.low_open else ""
            parts.append(f"{low} to {high}" + (f" {self.unit}" if self.unit else ""))
        if self.default not in (None, False, (), dataclasses.MISSING):
            shown_default = " ".join(map(str, self.default)) if isinstance(self.default, tuple) else self.default
            parts.append(f"default: {shown_default}")
        return "; ".join(parts)


def declare(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    cli: Door,
    sample: Door,
    http: Door,
    diffusers: Door,
    unit: str = "",
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: tuple = (),
) -> Any:
    """A `RequestSpec` field with its declaration (its name and type come from the class body); a field
    without a default is required."""
    declaration = dict(
        help=help, cli=cli, sample=sample, http=http, diffusers=diffusers, unit=unit, low=low, high=high,
        low_open=low_open, choices=choices, required=default is dataclasses.MISSING,
    )  # fmt: skip
    return dataclasses.field(default=default, metadata={"declaration": declaration})


def fields_of(spec_class: type) -> tuple[FieldSpec, ...]:
    """Every declared field of a request class, in declaration order."""
    kinds = {"int": int, "float": float, "str": str, "bool": bool, "Path": Path, "tuple": tuple}
    out = []
    for f in dataclasses.fields(spec_class):
        declaration = f.metadata.get("declaration")
        if declaration is None:
            continue
        kind = kinds[str(f.type).split("[")[0].split(" |")[0].strip()]
        out.append(FieldSpec(name=f.name, kind=kind, default=f.default, **declaration))
    return tuple(out)
