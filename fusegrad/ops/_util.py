"""What every op shares: building its result node, checking its contract, un-broadcasting grads."""
from __future__ import annotations

import numbers

import numpy as np

from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import FLOAT_DTYPES, Node, Tensor, default_dtype_for, is_floating, is_grad_enabled


def as_tensor(x, like: Tensor | None = None, op: str = "op") -> Tensor:
    """A Tensor from a Tensor, python scalar or array; scalars take the dtype of `like`."""
    if isinstance(x, Tensor):
        return x
    if like is not None:
        if isinstance(x, (numbers.Number, list, tuple)):  # python values have no dtype: take like's
            return Tensor(like.backend.asarray(x, like.dtype), backend=like.backend)
        return Tensor(like.backend.asarray(x), backend=like.backend)
    if isinstance(x, (numbers.Number, list, tuple, np.ndarray)):
        return Tensor(np.asarray(x, dtype=default_dtype_for(x)))
    raise ShapeError(f"{op}: expected a Tensor, array or number, got {type(x).__name__}")


def result(data, op: str, inputs: tuple, backward, backend=None) -> Tensor:
    """The op's output; attaches the backward node only if grad is on and some input needs it."""
    if is_grad_enabled():
        for t in inputs:
            if t.requires_grad:
                return Tensor(data, requires_grad=True, node=Node(op, inputs, backward),
                              backend=backend or inputs[0].backend)
    return Tensor(data, backend=backend or inputs[0].backend)


def check_float(op: str, *named):
    """named: ("a", tensor), ... — all floating and of one dtype, else ShapeError. Inside a backend's
    mixed-precision block (`Backend.precision`), float32 parameters meet activations of its compute dtype."""
    first = named[0][1].data.dtype
    if first in FLOAT_DTYPES:  # the common case (all the same numpy float dtype), checked cheaply
        for _, t in named:
            if t.data.dtype != first:
                break
        else:
            return
    dtypes = []
    for name, t in named:
        if not is_floating(t.dtype):
            raise ShapeError(f"{op}: {name} must be a floating tensor, got dtype {t.dtype}")
        dtypes.append((name, t.dtype))
    kinds = {d for _, d in dtypes}
    if len(kinds) > 1 and kinds != {np.dtype(np.float32), named[0][1].backend.compute_dtype()}:
        listed = ", ".join(f"{n} is {d}" for n, d in dtypes)
        raise ShapeError(f"{op}: dtypes differ: {listed}")


def broadcast_shape(op: str, a: Tensor, b: Tensor) -> tuple:
    a_shape, b_shape = tuple(a.data.shape), tuple(b.data.shape)
    if a_shape == b_shape:
        return a_shape
    try:
        return tuple(np.broadcast_shapes(a_shape, b_shape))
    except ValueError:
        raise ShapeError(f"{op}: shapes do not broadcast: a is {a.shape}, b is {b.shape}") from None


def unbroadcast(grad, shape: tuple):
    """Sum `grad` over the axes that broadcasting added or stretched, so it has `shape`."""
    if tuple(grad.shape) == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(i + extra for i, d in enumerate(shape) if d == 1 and grad.shape[i + extra] != 1)
    return grad.sum(axis=axes, keepdims=True).reshape(shape)


def normalize_axis(op: str, axis, ndim: int) -> tuple:
    """Axis argument -> tuple of non-negative axes; ShapeError when out of range."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis) if isinstance(axis, (tuple, list)) else None
    if axes is None or not all(isinstance(ax, numbers.Integral) for ax in axes):
        raise ShapeError(f"{op}: axis must be an integer or a tuple of integers, got {axis!r}")
    out = []
    for ax in axes:
        if not -ndim <= ax < max(ndim, 1):
            raise ShapeError(f"{op}: axis {ax} is out of range for a {ndim}-D tensor")
        out.append(ax % max(ndim, 1))
    if len(set(out)) != len(out):
        raise ShapeError(f"{op}: repeated axis in {axis}")
    return tuple(out)
