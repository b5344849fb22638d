"""Settings checked in one place. A dataclass field says what it means and which values it takes in its
metadata, `setting(default, help, range)`; `check_value` turns a value from the command line, a YAML file or a
checkpoint into the field's type or raises a ConfigError naming where it came from, the key and the value.

A range is an interval, `[0, 1)`, `(0, inf)`, `[1, 4096]`, or choices, `lm|classify`; none = any value of the
type. Booleans are not integers, 2.7 is not an integer, NaN/inf and lists are not numbers, and null is only
for fields typed `X | None`.

>>> check_value("lr", "1e-4", float, "(0, inf)", "command line")
0.0001
>>> check_value("beta1", 1.5, float, "[0, 1)", "run.yaml")
Traceback (most recent call last):
...
fusegrad.core.errors.ConfigError: run.yaml: beta1 = 1.5 is outside [0, 1)
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing

from fusegrad.core.errors import ConfigError

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def setting(default, help: str, range: str = ""):  # noqa: A002 - the names the metadata uses
    """A dataclass field with its one-line meaning and its range (see the module docstring)."""
    return dataclasses.field(default=default, metadata={"help": help, "range": range})


def field_spec(cls, name: str, table: dict | None = None) -> tuple[str, str]:
    """(help, range) of field `name`: its own metadata, else `table[name]`, else a base class's metadata (a
    subclass that only changes a default keeps the base field's meaning)."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f.metadata["help"], f.metadata.get("range", "")
        if klass is cls and table and name in table:
            return table[name]
    return "", ""


def field_type(cls, name: str) -> tuple[type, bool]:
    """(type, whether None is allowed) of a dataclass field: `int | None` -> (int, True)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


def _convert(value, kind):
    if kind is bool:
        text = str(value).lower() if isinstance(value, (bool, str)) else None
        if text in TRUE or text in FALSE:
            return text in TRUE
        raise ValueError("expected true or false")
    if isinstance(value, str) and kind in (int, float):  # the command line; YAML reads `1e-4` as a string
        try:
            value = kind(value.strip())
        except ValueError:
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}") from None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError("expected an integer")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("expected a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ValueError("expected a string (quote it in YAML)")
    return value


def in_range(value, spec: str) -> bool:
    if not spec:
        return True
    if spec[0] not in "[(":
        return value in spec.split("|")
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)


def check_value(name: str, value, kind, spec: str, where: str, optional: bool = False, error=ConfigError):
    """`value` as `kind` within `spec` -> the value; `error` (ConfigError; loaders of files pass FormatError)
    "where: name = value: why" otherwise."""
    if value is None:
        if optional:
            return None
        raise error(f"{where}: {name} = null; expected a {kind.__name__} value")
    try:
        value = _convert(value, kind)
    except ValueError as exc:
        raise error(f"{where}: {name} = {value!r}: {exc}") from None
    if not in_range(value, spec):
        allowed = f"one of {spec.replace('|', ', ')}" if spec[0] not in "[(" else spec
        raise error(f"{where}: {name} = {value!r} is outside {allowed}")
    return value


def check_fields(obj, where: str, table: dict | None = None):
    """Check (and convert in place) every field of the dataclass instance `obj` -> obj."""
    cls = type(obj)
    for f in dataclasses.fields(cls):
        kind, optional = field_type(cls, f.name)
        spec = field_spec(cls, f.name, table)[1]
        setattr(obj, f.name, check_value(f.name, getattr(obj, f.name), kind, spec, where, optional))
    return obj


def refuse_unknown(keys, known, where: str) -> None:
    """ConfigError for keys that are not settings, with the closest known names."""
    unknown = sorted(str(k) for k in set(keys) - set(known))
    if unknown:
        hints = [f"{k} -> {m[0]}" for k in unknown for m in [difflib.get_close_matches(k, known, 1, 0.6)] if m]
        hint = f"did you mean {', '.join(hints)}?" if hints else f"known: {', '.join(sorted(known))}"
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; {hint}")
