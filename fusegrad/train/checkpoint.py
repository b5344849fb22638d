"""Training checkpoints: one safetensors file, arrays plus a JSON header, replaced atomically.

Nested state (model weights, optimizer moments, RNG state, step, config) is flattened: arrays become
safetensors tensors under '/'-joined paths, everything else goes to JSON in the file's metadata. The
file is written beside its final name, fsynced and renamed, so a kill at any moment leaves the last
good checkpoint readable. No pickle, ever. Nothing non-finite is written, and every tensor read is checked:
a float tensor holding NaN/inf, a tensor of a dtype that is not a number, or a header that is not what
save_checkpoint writes is a FormatError naming the file and the tensor or field. `value` and `weights` read
fields of a loaded state by path, checked for type, range, dtype and shape (never cast).

>>> import numpy as np, os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
>>> save_checkpoint(path, {"params": {"w": np.ones(2, np.float32)}, "step": 3})
>>> state = load_checkpoint(path)
>>> state["step"], state["params"]["w"].tolist()
(3, [1.0, 1.0])
"""
from __future__ import annotations

import json
import os

import numpy as np

from fusegrad.core.errors import FormatError
from fusegrad.core.fileio import atomic_path
from fusegrad.core.settings import check_value
from fusegrad.core.trace import span

_ARRAY = "__array__"
DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "bool")  # what a checkpoint's tensors may be; anything else (object, strings) is refused


def nonfinite(arrays: dict):
    """The name of the first float array holding NaN or inf, or None."""
    return next((k for k, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()), None)


def _flatten(obj, prefix: str, arrays: dict):
    """Arrays out to `arrays` (keyed by path); returns the JSON-able rest with placeholders."""
    if isinstance(obj, np.ndarray):
        arrays[prefix] = np.ascontiguousarray(obj)
        return {_ARRAY: prefix}
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str) or "/" in key:
                raise FormatError(f"checkpoint: key {key!r} at {prefix or '/'} must be a str without '/'")
        return {k: _flatten(v, f"{prefix}/{k}" if prefix else k, arrays) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", arrays) for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _unflatten(obj, arrays: dict, path: str):
    if isinstance(obj, dict):
        if set(obj) == {_ARRAY}:
            if obj[_ARRAY] not in arrays:
                raise FormatError(f"{path}: checkpoint header names tensor {obj[_ARRAY]!r}, which the file lacks")
            return arrays[obj[_ARRAY]]
        return {k: _unflatten(v, arrays, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, arrays, path) for v in obj]
    return obj


def save_checkpoint(path, state: dict) -> None:
    """Write `state` (nested dicts/lists of arrays, numbers, strings) to `path` atomically."""
    from safetensors.numpy import save_file

    arrays = {}
    header = _flatten(state, "", arrays)
    bad = nonfinite(arrays)
    if bad is not None:
        raise FormatError(f"{path}: tensor {bad} holds NaN or inf; not written (the previous checkpoint is kept)")
    with span("save_checkpoint", "io", tensors=len(arrays)), atomic_path(path) as tmp:
        save_file(arrays, tmp, metadata={"fusegrad": json.dumps(header)})


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by save_checkpoint; FormatError naming the file if it is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such checkpoint file")
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise FormatError(f"{path}: not a readable safetensors checkpoint ({type(exc).__name__}: {exc})") from None
    for key, a in arrays.items():
        if a.dtype.name not in DTYPES:
            raise FormatError(f"{path}: tensor {key} has dtype {a.dtype}, not a number type")
    bad = nonfinite(arrays)
    if bad is not None:
        raise FormatError(f"{path}: tensor {bad} holds NaN or inf")
    if "fusegrad" not in meta:
        raise FormatError(f"{path}: safetensors file without a fusegrad checkpoint header")
    try:
        header = json.loads(meta["fusegrad"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{path}: corrupt checkpoint header: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: checkpoint header is a {type(header).__name__}, not a mapping")
    return _unflatten(header, arrays, path)


def _at(state: dict, key: str, path):
    node = state
    for part in key.split("/"):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise FormatError(f"{path}: checkpoint field {key!r} is missing")
    return node


def value(state: dict, key: str, kind, path, spec: str = "", optional: bool = False):
    """The JSON field at '/'-path `key` as `kind` within `spec` (core.settings ranges); FormatError naming the
    file and field otherwise.

    >>> value({"a": {"step": 3}}, "a/step", int, "ckpt", "[0, inf)"), value({"s": [2.0, 5]}, "s/1", int, "ckpt")
    (3, 5)
    """
    try:
        found = _at(state, key, path)
    except FormatError:
        if optional:
            return None
        raise
    if isinstance(found, (dict, np.ndarray)) or (isinstance(found, list) and kind is not list):
        raise FormatError(f"{path}: checkpoint field {key!r} is a {type(found).__name__}, expected {kind.__name__}")
    if kind is list:
        return found
    return check_value(key, found, kind, spec, f"{path}: checkpoint field", optional, FormatError)


def weights(state: dict, key: str, shapes: dict, path) -> dict:
    """{name: float array} at `key` for every name of `shapes` (name -> shape): each present, a float array
    (float16/32/64, never an int cast to float) of that shape; FormatError naming the file and tensor."""
    found = _at(state, key, path)
    if not isinstance(found, dict):
        raise FormatError(f"{path}: checkpoint field {key!r} is not a mapping of tensors")
    out = {}
    for name, shape in shapes.items():
        a = found.get(name)
        if not isinstance(a, np.ndarray):
            raise FormatError(f"{path}: tensor {key}/{name} is missing")
        if a.dtype.kind != "f" or tuple(a.shape) != tuple(shape):
            raise FormatError(f"{path}: tensor {key}/{name} is {a.dtype}{list(a.shape)}, expected a float tensor "
                              f"of shape {list(shape)}")
        out[name] = a
    return out
