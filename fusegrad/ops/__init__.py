"""Differentiable ops: each forward beside its explicit backward. Also attaches Tensor's operators.

>>> import fusegrad as fg
>>> x = fg.tensor([[1.0, -2.0]], requires_grad=True)
>>> y = (x * 3 - 1).relu().sum()
>>> y.backward(); x.grad.tolist()
[[3.0, 0.0]]
"""
from fusegrad.core.tensor import Tensor
from fusegrad.ops.activation import gelu, relu, sigmoid, silu
from fusegrad.ops.elementwise import add, div, exp, log, mul, neg, pow, sqrt, sub
from fusegrad.ops.llama import (cached_attention, causal_attention, classifier_cross_entropy, embedding, rms_norm,
                                swiglu)
from fusegrad.ops.matmul import linear, matmul, matmul_nt
from fusegrad.ops.nn import cross_entropy
from fusegrad.ops.reduce import log_softmax, max, mean, softmax, sum
from fusegrad.ops.shape import cat, concat, getitem, permute, reshape, split, transpose, view

__all__ = ["add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "matmul", "matmul_nt", "linear",
           "relu", "sigmoid", "silu", "gelu", "sum", "mean", "max", "softmax", "log_softmax", "cross_entropy",
           "reshape", "view", "permute", "transpose", "concat", "cat", "split", "getitem",
           "embedding", "rms_norm", "causal_attention", "cached_attention", "swiglu", "classifier_cross_entropy"]


def _reflect(fn):
    return lambda self, other: fn(other, self)


Tensor.__add__, Tensor.__radd__ = add, _reflect(add)
Tensor.__sub__, Tensor.__rsub__ = sub, _reflect(sub)
Tensor.__mul__, Tensor.__rmul__ = mul, _reflect(mul)
Tensor.__truediv__, Tensor.__rtruediv__ = div, _reflect(div)
Tensor.__matmul__, Tensor.__rmatmul__ = matmul, lambda self, other: matmul(Tensor(self.backend.asarray(other)), self)
Tensor.__neg__ = neg
Tensor.__pow__ = pow
Tensor.__getitem__ = getitem
Tensor.T = property(lambda self: transpose(self))
for _name in ("exp", "log", "sqrt", "relu", "sigmoid", "silu", "gelu", "sum", "mean", "max", "softmax",
              "log_softmax", "reshape", "view", "permute", "transpose", "split"):
    setattr(Tensor, _name, globals()[_name])
Tensor.matmul = matmul
