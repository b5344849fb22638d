"""Pointwise nonlinearities.

>>> import fusegrad as fg
>>> fg.relu(fg.tensor([-1.0, 2.0])).tolist()
[0.0, 2.0]
"""
from __future__ import annotations

import math

from fusegrad.core.errors import ConfigError
from fusegrad.core.tensor import Tensor
from fusegrad.core.trace import span
from fusegrad.ops._util import check_float, result


def relu(a: Tensor) -> Tensor:
    check_float("relu", ("a", a))
    xp, mask = a.backend.xp, a.data > 0
    # maximum/where, not x * mask: -1.0 * False is -0.0
    return result(xp.maximum(a.data, 0), "relu", (a,), lambda g: (xp.where(mask, g, 0),))


def sigmoid(a: Tensor) -> Tensor:
    check_float("sigmoid", ("a", a))
    xp = a.backend.xp
    out = 1 / (1 + xp.exp(-a.data))
    return result(out, "sigmoid", (a,), lambda g: (g * out * (1 - out),))


def silu(a: Tensor) -> Tensor:
    """x * sigmoid(x); backward: s * (1 + x * (1 - s))."""
    check_float("silu", ("a", a))
    xp = a.backend.xp
    with span("silu", "elementwise"):
        s = 1 / (1 + xp.exp(-a.data))
        out = a.data * s

    def backward(g):
        return (g * s * (1 + a.data * (1 - s)),)
    return result(out, "silu", (a,), backward)


def gelu(a: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (erf) by default or the tanh approximation, as torch.nn.functional.gelu."""
    check_float("gelu", ("a", a))
    xp, x = a.backend.xp, a.data
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        inner = c * (x + 0.044715 * x ** 3)
        t = xp.tanh(inner)
        out = 0.5 * x * (1 + t)

        def backward(g):
            return (g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)),)
    elif approximate == "none":
        cdf = 0.5 * (1 + a.backend.erf(x / math.sqrt(2)))
        out = x * cdf

        def backward(g):
            pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
            return (g * (cdf + x * pdf),)
    else:
        raise ConfigError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return result(out, "gelu", (a,), backward)
