"""Elementwise ops with numpy broadcasting; each backward sums the grad back over broadcast axes.

>>> import fusegrad as fg
>>> a = fg.tensor([[1.0], [2.0]], requires_grad=True)   # (2, 1)
>>> b = fg.tensor([10.0, 20.0, 30.0], requires_grad=True)  # (3,)
>>> (a * b).sum().backward()
>>> a.grad.ravel().tolist(), b.grad.tolist()
([60.0, 60.0], [3.0, 3.0, 3.0])
"""
from __future__ import annotations

import numbers

from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import Tensor
from fusegrad.core.trace import span
from fusegrad.ops._util import as_tensor, broadcast_shape, check_float, result, unbroadcast


def _binary_inputs(op: str, a, b):
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        raise ShapeError(f"{op}: at least one operand must be a Tensor")
    a = as_tensor(a, like=b if not isinstance(a, Tensor) else None, op=op)
    b = as_tensor(b, like=a, op=op)
    check_float(op, ("a", a), ("b", b))
    broadcast_shape(op, a, b)
    return a, b


def add(a, b) -> Tensor:
    a, b = _binary_inputs("add", a, b)
    with span("add", "elementwise"):
        out = a.data + b.data
    if a.data.dtype != b.data.dtype:  # a float32 bias on a bf16/fp16 activation (torch --dtype): stays an activation
        out = a.backend.asarray(out, min(a.dtype, b.dtype, key=lambda d: d.itemsize))

    def backward(g):  # d(a+b) = g for both, summed over broadcast axes
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(g, b.shape) if b.requires_grad else None)
    return result(out, "add", (a, b), backward)


def sub(a, b) -> Tensor:
    a, b = _binary_inputs("sub", a, b)
    with span("sub", "elementwise"):
        out = a.data - b.data

    def backward(g):
        return (unbroadcast(g, a.shape) if a.requires_grad else None,
                unbroadcast(-g, b.shape) if b.requires_grad else None)
    return result(out, "sub", (a, b), backward)


def mul(a, b) -> Tensor:
    a, b = _binary_inputs("mul", a, b)
    with span("mul", "elementwise"):
        out = a.data * b.data

    def backward(g):
        return (unbroadcast(g * b.data, a.shape) if a.requires_grad else None,
                unbroadcast(g * a.data, b.shape) if b.requires_grad else None)
    return result(out, "mul", (a, b), backward)


def div(a, b) -> Tensor:
    a, b = _binary_inputs("div", a, b)
    with span("div", "elementwise"):
        out = a.data / b.data

    def backward(g):
        ga = unbroadcast(g / b.data, a.shape) if a.requires_grad else None
        gb = unbroadcast(-g * out / b.data, b.shape) if b.requires_grad else None  # d(a/b)/db = -a/b^2
        return ga, gb
    return result(out, "div", (a, b), backward)


def neg(a: Tensor) -> Tensor:
    check_float("neg", ("a", a))
    return result(-a.data, "neg", (a,), lambda g: (-g,))


def pow(a: Tensor, exponent) -> Tensor:
    """a ** exponent; `exponent` is a number or a tensor (then the grad also flows to it, for a > 0)."""
    if isinstance(exponent, numbers.Number):
        check_float("pow", ("a", a))
        out = a.data ** exponent

        def backward(g):
            return (g * exponent * a.data ** (exponent - 1),)
        return result(out, "pow", (a,), backward)
    a, e = _binary_inputs("pow", a, exponent)
    xp = a.backend.xp
    out = a.data ** e.data

    def backward_t(g):
        ga = unbroadcast(g * e.data * a.data ** (e.data - 1), a.shape) if a.requires_grad else None
        ge = unbroadcast(g * out * xp.log(a.data), e.shape) if e.requires_grad else None
        return ga, ge
    return result(out, "pow", (a, e), backward_t)


def exp(a: Tensor) -> Tensor:
    check_float("exp", ("a", a))
    out = a.backend.xp.exp(a.data)
    return result(out, "exp", (a,), lambda g: (g * out,))


def log(a: Tensor) -> Tensor:
    check_float("log", ("a", a))
    out = a.backend.xp.log(a.data)
    return result(out, "log", (a,), lambda g: (g / a.data,))


def sqrt(a: Tensor) -> Tensor:
    check_float("sqrt", ("a", a))
    out = a.backend.xp.sqrt(a.data)
    return result(out, "sqrt", (a,), lambda g: (g * 0.5 / out,))
