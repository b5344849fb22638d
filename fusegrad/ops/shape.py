"""Views and rearrangements: reshape/view, transpose/permute, concat/split, indexing.

Each backward routes the grad to the ORIGINAL tensor (the seed's `transpose_tracked`): a parameter used
transposed, as LoRA's A is, receives its gradient in its own layout.

>>> import fusegrad as fg
>>> A = fg.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)   # (r, in) = (2, 3)
>>> x = fg.tensor([[1.0, 1.0, 1.0]])                                       # (1, in)
>>> (x @ A.T).sum().backward()                                             # (1, r)
>>> A.grad.tolist()
[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import Tensor
from fusegrad.ops._util import normalize_axis, result


def reshape(a: Tensor, *shape) -> Tensor:
    """A view when the layout allows (numpy semantics); `-1` infers one dimension."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else tuple(shape)
    if not all(isinstance(d, (int, np.integer)) and d >= -1 for d in shape) or shape.count(-1) > 1:
        raise ShapeError(f"reshape: shape must be integers with at most one -1, got {shape}")
    known = math.prod(d for d in shape if d != -1)
    if (-1 in shape and (known == 0 or a.numel() % known)) or (-1 not in shape and known != a.numel()):
        raise ShapeError(f"reshape: cannot reshape a tensor of shape {a.shape} ({a.numel()} elements) into {shape}")
    out = a.data.reshape(shape)
    return result(out, "reshape", (a,), lambda g: (g.reshape(a.shape),))


view = reshape


def permute(a: Tensor, *axes) -> Tensor:
    axes = tuple(axes[0]) if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else tuple(axes)
    if len(axes) != a.ndim:
        raise ShapeError(f"permute: need {a.ndim} axes for shape {a.shape}, got {axes}")
    axes = normalize_axis("permute", axes, a.ndim)
    inverse = tuple(np.argsort(axes))
    xp = a.backend.xp
    out = xp.permute_dims(a.data, axes)  # a strided view
    return result(out, "permute", (a,), lambda g: (xp.permute_dims(g, inverse),))


def transpose(a: Tensor, dim0: int = -2, dim1: int = -1) -> Tensor:
    """Swap two axes (default: the last two) as a view; the grad is swapped back onto `a`."""
    if a.ndim < 2:
        raise ShapeError(f"transpose: tensor must be at least 2-D, got shape {a.shape}")
    (d0,), (d1,) = normalize_axis("transpose", dim0, a.ndim), normalize_axis("transpose", dim1, a.ndim)
    axes = list(range(a.ndim))
    axes[d0], axes[d1] = axes[d1], axes[d0]
    return permute(a, axes)


def concat(tensors, axis: int = 0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ShapeError("concat: need at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or t.ndim == 0:
            raise ShapeError(f"concat: tensor {i} must be a Tensor of at least 1-D, got "
                             f"{type(t).__name__} of shape {getattr(t, 'shape', None)}")
    first = tensors[0]
    (ax,) = normalize_axis("concat", axis, first.ndim)
    for i, t in enumerate(tensors[1:], 1):
        if t.ndim != first.ndim or any(d != e for j, (d, e) in enumerate(zip(t.shape, first.shape)) if j != ax):
            raise ShapeError(f"concat: tensor {i} has shape {t.shape}, tensor 0 has {first.shape}; "
                             f"all dims but axis {ax} must match")
        if t.dtype != first.dtype:
            raise ShapeError(f"concat: dtypes differ: tensor 0 is {first.dtype}, tensor {i} is {t.dtype}")
    xp = first.backend.xp
    out = xp.concat([t.data for t in tensors], axis=ax)
    bounds = np.cumsum([0] + [t.shape[ax] for t in tensors])

    def backward(g):
        index = [slice(None)] * g.ndim
        grads = []
        for t, lo, hi in zip(tensors, bounds[:-1], bounds[1:]):
            index[ax] = slice(int(lo), int(hi))
            grads.append(g[tuple(index)] if t.requires_grad else None)
        return tuple(grads)
    return result(out, "concat", tuple(tensors), backward)


cat = concat


def split(a: Tensor, sizes, axis: int = 0) -> list:
    """Split into pieces of the given sizes (a list) or into `sizes` equal pieces (an int); views."""
    (ax,) = normalize_axis("split", axis, a.ndim)
    n = a.shape[ax]
    if isinstance(sizes, numbers.Integral):
        if sizes <= 0 or n % sizes:
            raise ShapeError(f"split: axis {ax} of length {n} does not split into {sizes} equal parts")
        sizes = [n // sizes] * sizes
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or np.sum(sizes) != n:
        raise ShapeError(f"split: sizes {sizes} do not add up to axis {ax} of length {n} (shape {a.shape})")
    outs, lo = [], 0
    for s in sizes:
        index = [slice(None)] * a.ndim
        index[ax] = slice(lo, lo + s)
        outs.append(getitem(a, tuple(index)))
        lo += s
    return outs


def _index_key(key):
    """Tensor indices -> arrays, so the key is a plain numpy index."""
    if isinstance(key, Tensor):
        return key.data
    if isinstance(key, tuple):
        return tuple(k.data if isinstance(k, Tensor) else k for k in key)
    return key


def _is_basic(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return all(k is None or k is Ellipsis or isinstance(k, (slice, numbers.Integral)) for k in keys)


def getitem(a: Tensor, key) -> Tensor:
    """a[key] with numpy semantics: slices and ints give a view; integer arrays gather, and their
    backward scatter-adds (repeated indices accumulate)."""
    key = _index_key(key)
    try:
        out = a.data[key]
    except (IndexError, TypeError, ValueError) as exc:
        raise ShapeError(f"index: cannot index a tensor of shape {a.shape} with {key!r}: {exc}") from None
    basic = _is_basic(key)
    xp = a.backend.xp

    def backward(g):
        grad = xp.zeros(a.shape, dtype=g.dtype, device=a.backend.device)
        if basic:
            grad[key] = g
        else:
            a.backend.index_add(grad, key, g)  # numpy: np.add.at
        return (grad,)
    return result(out, "index", (a,), backward)
