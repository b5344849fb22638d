"""Reductions: sum, mean, max; and the row-wise softmax family.

>>> import fusegrad as fg
>>> x = fg.tensor([[1.0, 5.0], [3.0, 2.0]], requires_grad=True)
>>> x.max(axis=1).sum().backward()
>>> x.grad.tolist()
[[0.0, 1.0], [1.0, 0.0]]
"""
from __future__ import annotations

import numbers

import numpy as np

from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import Tensor
from fusegrad.core.trace import span
from fusegrad.ops._util import check_float, normalize_axis, result


def _expand_back(g, shape: tuple, axes: tuple, keepdims: bool):
    """Reshape a reduced grad so it broadcasts against the input of `shape`."""
    if keepdims:
        return g
    return g.reshape(tuple(1 if i in axes else d for i, d in enumerate(shape)))


def sum(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    check_float("sum", ("a", a))
    axes = normalize_axis("sum", axis, a.ndim)
    xp = a.backend.xp
    out = xp.sum(a.data, axis=axes, keepdims=keepdims)

    def backward(g):
        return (xp.broadcast_to(_expand_back(g, a.shape, axes, keepdims), a.shape),)
    return result(out, "sum", (a,), backward)


def mean(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    check_float("mean", ("a", a))
    axes = normalize_axis("mean", axis, a.ndim)
    xp = a.backend.xp
    count = 1
    for ax in axes:
        count *= a.shape[ax]
    out = xp.mean(a.data, axis=axes, keepdims=keepdims)

    def backward(g):
        return (xp.broadcast_to(_expand_back(g, a.shape, axes, keepdims) / count, a.shape),)
    return result(out, "mean", (a,), backward)


def max(a: Tensor, axis=None, keepdims: bool = False) -> Tensor:
    """Max over axes; ties share the grad equally (so finite differences and torch's amax agree)."""
    check_float("max", ("a", a))
    axes = normalize_axis("max", axis, a.ndim)
    xp = a.backend.xp
    out = xp.max(a.data, axis=axes, keepdims=True)

    def backward(g):
        hit = (a.data == out).astype(a.dtype)  # a bool mask would promote the grad to float64
        share = hit / xp.sum(hit, axis=axes, keepdims=True)
        return (share * _expand_back(g, a.shape, axes, keepdims),)
    return result(out if keepdims else xp.squeeze(out, axis=axes), "max", (a,), backward)


def _one_axis(op: str, axis, ndim: int) -> int:
    if not isinstance(axis, numbers.Integral):
        raise ShapeError(f"{op}: axis must be one integer, got {axis!r}")
    return normalize_axis(op, axis, ndim)[0]


def softmax(a: Tensor, axis: int = -1) -> Tensor:
    check_float("softmax", ("a", a))
    ax = _one_axis("softmax", axis, a.ndim)
    xp = a.backend.xp
    with span("softmax", "elementwise"):
        e = xp.exp(a.data - xp.max(a.data, axis=ax, keepdims=True))
        out = e / xp.sum(e, axis=ax, keepdims=True)

    def backward(g):  # dx = y * (g - sum(g * y))
        return (out * (g - xp.sum(g * out, axis=ax, keepdims=True)),)
    return result(out, "softmax", (a,), backward)


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
    check_float("log_softmax", ("a", a))
    ax = _one_axis("log_softmax", axis, a.ndim)
    xp = a.backend.xp
    # bf16/fp16 logits (torch --dtype) are widened: the softmax and the loss after it are float32 (as autocast)
    x = a.backend.asarray(a.data, np.float32) if a.dtype.itemsize < 4 else a.data
    with span("log_softmax", "elementwise"):
        shifted = x - xp.max(x, axis=ax, keepdims=True)
        out = shifted - xp.log(xp.sum(xp.exp(shifted), axis=ax, keepdims=True))

    def backward(g):  # dx = g - softmax * sum(g)
        return (g - xp.exp(out) * xp.sum(g, axis=ax, keepdims=True),)
    return result(out, "log_softmax", (a,), backward)
