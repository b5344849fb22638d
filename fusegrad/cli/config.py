"""Dataclass configs on the command line: a YAML file, then `--key value` overrides, with --help.

>>> import argparse, dataclasses
>>> @dataclasses.dataclass
... class C:
...     lr: float = 0.1
...     name: str = "x"
...     resume: bool = False
>>> p = argparse.ArgumentParser(); add_dataclass_args(p, C)
>>> config_from_args(C, p.parse_args(["--lr", "0.5", "--resume"]))
C(lr=0.5, name='x', resume=True)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from fusegrad.core.errors import FormatError


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _field_type(cls, field):
    hint = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _converter(kind):
    if kind is bool:
        return _parse_bool
    return kind


def add_dataclass_args(parser: argparse.ArgumentParser, cls, help_texts: dict | None = None) -> None:
    """One `--name` option per field (also `--name-with-dashes`); bools take an optional true/false."""
    parser.add_argument("--config", metavar="YAML", help="a YAML file of settings; options given here override it")
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        extra = dict(nargs="?", const=True) if kind is bool else {}
        text = (help_texts or {}).get(f.name, "")
        parser.add_argument(*flags, dest=f.name, type=_converter(kind), default=argparse.SUPPRESS,
                            metavar=kind.__name__.upper(), help=f"{text} (default: {f.default!r})".strip(), **extra)


def config_from_args(cls, args: argparse.Namespace):
    """Defaults <- YAML file <- command-line options. Unknown YAML keys are an error naming them."""
    values = {}
    path = getattr(args, "config", None)
    if path:
        values.update(load_yaml(path, cls))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


def load_yaml(path, cls) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FormatError(f"{path}: config file not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise FormatError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FormatError(f"{path}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    out = {}
    for key, value in data.items():
        kind = _field_type(cls, fields[key])
        if value is None or isinstance(value, kind) or (kind is float and isinstance(value, int)):
            out[key] = value
        else:
            try:
                out[key] = _converter(kind)(value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise FormatError(f"{path}: setting {key!r} must be {kind.__name__}, got {value!r} ({exc})") from None
    return out
