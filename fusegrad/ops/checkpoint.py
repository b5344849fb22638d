"""Activation checkpointing: a function's activations are dropped after its forward and rebuilt in the
backward, trading one more forward for memory (a decoder block keeps only its input).

>>> import numpy as np, fusegrad as fg
>>> w = fg.tensor(np.full((3, 3), 0.5), requires_grad=True)
>>> x = fg.tensor(np.ones((2, 3)), requires_grad=True)
>>> y = checkpoint(lambda x_: (x_ @ w).relu() * 2, x, [w])
>>> y.sum().backward()
>>> x.grad.tolist(), w.grad.tolist()[0]
([[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]], [4.0, 4.0, 4.0])
"""
from __future__ import annotations

from fusegrad.core.errors import GraphError
from fusegrad.core.tensor import Tensor, enable_grad, is_grad_enabled, run_backward
from fusegrad.ops._util import result


def checkpoint(fn, x: Tensor, params, rngs=()) -> Tensor:
    """fn(x) -> Tensor, keeping only x (and fn's output) for the backward, which runs fn(x) again with grad
    and backpropagates through that.

    params: every tensor fn reads besides x that may need grad; leaves (model weights, adapters), whose
    `.grad` the recompute's backward accumulates into directly. rngs: numpy Generators fn draws from
    (dropout): rewound for the recompute so it draws the same numbers, then put back where they were.
    Without grad (evaluation, generation) it is just fn(x).
    """
    params = tuple(params)
    if not (is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return fn(x)
    inner = [p for p in params if p.requires_grad and not p.is_leaf]
    if inner:
        raise GraphError(f"checkpoint: params must be leaf tensors (weights); {len(inner)} are results of ops")
    rngs = list({id(r): r for r in rngs}.values())
    states = [r.bit_generator.state for r in rngs]
    # the forward runs with grad on (so dropout draws as it will in the recompute); its graph, holding the
    # activations, is dropped as soon as the output array is taken
    out = fn(Tensor(x.data, requires_grad=x.requires_grad, backend=x.backend)).data

    def backward(g):
        now = [r.bit_generator.state for r in rngs]
        for r, state in zip(rngs, states):
            r.bit_generator.state = state
        x_in = Tensor(x.data, requires_grad=x.requires_grad, backend=x.backend)
        try:
            with enable_grad():
                y = fn(x_in)
        finally:
            for r, state in zip(rngs, now):
                r.bit_generator.state = state
        run_backward(y, g)  # params' grads go into their .grad here; x's comes back through this node
        dx, x_in.grad = x_in.grad, None
        return (dx,) + (None,) * len(params)
    return result(out, "checkpoint", (x,) + params, backward)
