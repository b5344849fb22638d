"""The matmul family, backward written out, every GEMM through the backend with transpose flags.

C = A @ B:      dA = dC @ B^T            dB = A^T @ dC
C = A @ B^T:    dA = dC @ B              dB = dC^T @ A          (matmul_nt: B^T is never materialised)

Batched operands broadcast over leading axes like numpy.matmul; grads are summed back over them.

>>> import fusegrad as fg
>>> a = fg.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
>>> b = fg.tensor([[5.0, 6.0], [7.0, 8.0]], requires_grad=True)
>>> fg.matmul_nt(a, b).tolist()
[[17.0, 23.0], [39.0, 53.0]]
>>> fg.matmul_nt(a, b).sum().backward()
>>> a.grad.tolist(), b.grad.tolist()
([[12.0, 14.0], [12.0, 14.0]], [[4.0, 6.0], [4.0, 6.0]])
"""
from __future__ import annotations

import numpy as np

from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import Tensor
from fusegrad.ops._util import as_tensor, check_float, result, unbroadcast
from fusegrad.ops.elementwise import add


def _check(op: str, a: Tensor, b: Tensor, trans_b: bool):
    check_float(op, ("a", a), ("b", b))
    if a.ndim < 1 or b.ndim < 1:
        raise ShapeError(f"{op}: operands must be at least 1-D, got a {a.shape}, b {b.shape}")
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(f"{op}: operands must be at least 2-D (reshape vectors to (1, n) or (n, 1)), "
                         f"got a {a.shape}, b {b.shape}")
    k_b = b.shape[-1] if trans_b else b.shape[-2]
    if a.shape[-1] != k_b:
        raise ShapeError(f"{op}: inner dimensions differ: a is {a.shape}, b is {b.shape}")
    if a.ndim == b.ndim == 2:
        return
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ShapeError(f"{op}: batch dimensions do not broadcast: a is {a.shape}, b is {b.shape}") from None


def _gemm_op(op: str, a: Tensor, b: Tensor, trans_b: bool) -> Tensor:
    a = as_tensor(a, like=b if isinstance(b, Tensor) else None, op=op)
    b = as_tensor(b, like=a, op=op)
    _check(op, a, b, trans_b)
    be = a.backend
    out = be.gemm(a.data, b.data, trans_b=trans_b)  # (..., M, N)

    def backward(g):  # g: (..., M, N)
        ga = gb = None
        if a.requires_grad:  # dA = g @ op(B)^T: (..., M, N) x (..., N, K)
            ga = unbroadcast(be.gemm(g, b.data, trans_b=not trans_b), a.shape)
        if b.requires_grad:
            if trans_b:  # dB = g^T @ A: (..., N, M) x (..., M, K)
                gb = be.gemm(g, a.data, trans_a=True)
            else:  # dB = A^T @ g: (..., K, M) x (..., M, N)
                gb = be.gemm(a.data, g, trans_a=True)
            gb = unbroadcast(gb, b.shape)
        return ga, gb
    return result(out, op, (a, b), backward)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for (..., M, K) x (..., K, N) -> (..., M, N)."""
    return _gemm_op("matmul", a, b, trans_b=False)


def matmul_nt(a: Tensor, b: Tensor) -> Tensor:
    """a @ b^T for (..., M, K) x (..., N, K) -> (..., M, N), without a transposed copy of b."""
    return _gemm_op("matmul_nt", a, b, trans_b=True)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x W^T (+ b) with W stored (out, in) like torch.nn.Linear; x is (..., in) -> (..., out).

    Leading axes of x fold into one GEMM of (tokens, in) x (in, out) on views of the arrays: one node, not
    reshape, matmul_nt and reshape (a generation step runs 120 of these per token).
    """
    x, weight = as_tensor(x, op="linear"), as_tensor(weight, op="linear")
    check_float("linear", ("x", x), ("weight", weight))
    x_shape, w_shape = x.data.shape, weight.data.shape  # read once: this op runs 120 times a generated token
    if len(w_shape) != 2:
        raise ShapeError(f"linear: weight must be 2-D (out, in), got shape {tuple(w_shape)}")
    if not x_shape or x_shape[-1] != w_shape[1]:
        raise ShapeError(f"linear: x has {x_shape[-1] if x_shape else 0} features (shape {tuple(x_shape)}), "
                         f"weight expects {w_shape[1]} (shape {tuple(w_shape)})")
    (n_out, n_in), be = w_shape, x.backend
    x2 = x.data.reshape(-1, n_in)  # (N, in)
    out = be.gemm(x2, weight.data, trans_b=True).reshape(tuple(x_shape[:-1]) + (n_out,))

    def backward(g):  # g (..., out) -> dx (..., in) = g W, dW (out, in) = g^T x
        g2 = g.reshape(-1, n_out)
        dx = be.gemm(g2, weight.data).reshape(x_shape) if x.requires_grad else None
        dw = be.gemm(g2, x2, trans_a=True) if weight.requires_grad else None
        return dx, dw
    y = result(out, "linear", (x, weight), backward)
    if bias is not None:
        bias = as_tensor(bias, like=weight, op="linear")
        if bias.shape != (weight.shape[0],):
            raise ShapeError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
        y = add(y, bias)
    return y
