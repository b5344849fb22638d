"""Training checkpoints: one safetensors file, arrays plus a JSON header, replaced atomically.

Nested state (model weights, optimizer moments, RNG state, step, config) is flattened: arrays become
safetensors tensors under '/'-joined paths, everything else goes to JSON in the file's metadata. The
file is written beside its final name, fsynced and renamed, so a kill at any moment leaves the last
good checkpoint readable. No pickle, ever.

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
from fusegrad.core.trace import span

_ARRAY = "__array__"


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
    if "fusegrad" not in meta:
        raise FormatError(f"{path}: safetensors file without a fusegrad checkpoint header")
    try:
        header = json.loads(meta["fusegrad"])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: corrupt checkpoint header: {exc}") from None
    return _unflatten(header, arrays, path)
