"""Activation checkpointing: the recompute's gradients equal the plain graph's, against float64 central
differences and torch autograd; dropout draws the same numbers twice; clear errors."""
import numpy as np
import pytest
import torch

import fusegrad as fg
from fusegrad.core.errors import GraphError
from fusegrad.ops.checkpoint import checkpoint
from tests.ops.test_llama_ops import check_grads, t64


def block(w1, w2, b):
    """A residual MLP block over the tensors given: x + silu(x W1^T) W2^T + b."""
    return lambda x: x + fg.linear(fg.silu(fg.linear(x, w1)), w2, b)


def test_grads_match_central_differences(rng):
    x, w1, w2, b = rng.normal(size=(2, 3, 4)), rng.normal(size=(5, 4)), rng.normal(size=(4, 5)), rng.normal(size=4)

    def op(x_, w1_, w2_, b_):
        return checkpoint(block(w1_, w2_, b_), x_, [w1_, w2_, b_]) * 1.5
    check_grads(op, [x, w1, w2, b], rng)


def test_grads_equal_the_plain_graph_and_torch(rng):
    arrays = [rng.normal(size=s).astype(np.float32) for s in [(3, 4), (5, 4), (4, 5), (4,)]]
    plain, ckpt = ([fg.tensor(a, requires_grad=True) for a in arrays] for _ in range(2))
    proj = rng.normal(size=(3, 4)).astype(np.float32)
    (block(*plain[1:])(block(*plain[1:])(plain[0])) * proj).sum().backward()  # the block twice: weights shared
    f = block(*ckpt[1:])
    y = checkpoint(f, checkpoint(f, ckpt[0], ckpt[1:]), ckpt[1:])
    assert y.node.op == "checkpoint"
    (y * proj).sum().backward()
    th = [torch.tensor(a, requires_grad=True) for a in arrays]
    tb = lambda x: x + torch.nn.functional.linear(torch.nn.functional.silu(x @ th[1].T), th[2], th[3])  # noqa: E731
    (tb(tb(th[0])) * torch.tensor(proj)).sum().backward()
    for p, c, t in zip(plain, ckpt, th):
        np.testing.assert_allclose(c.grad, p.grad, rtol=0, atol=1e-6 * np.abs(p.grad).max())  # float32 sum order
        np.testing.assert_allclose(c.grad, t.grad.numpy(), rtol=0, atol=1e-5 * np.abs(p.grad).max())


def test_frozen_input_and_retained_graph(rng):
    """x without grad (a frozen embedding under LoRA): only the params' grads; backward twice accumulates."""
    x = fg.tensor(rng.normal(size=(2, 4)))
    w1, w2, b = (fg.tensor(rng.normal(size=s), requires_grad=True) for s in [(5, 4), (4, 5), (4,)])
    y = checkpoint(block(w1, w2, b), x, [w1, w2, b]).sum()
    y.backward(retain_graph=True)
    once = w1.grad.copy()
    y.backward()
    np.testing.assert_allclose(w1.grad, 2 * once, rtol=1e-6)
    assert x.grad is None


def test_without_grad_it_is_the_function(rng):
    w = fg.tensor(rng.normal(size=(4, 4)), requires_grad=True)
    x = fg.tensor(rng.normal(size=(2, 4)))
    with fg.no_grad():
        y = checkpoint(lambda x_: x_ @ w, x, [w])
    assert y.node is None and not y.requires_grad


def test_dropout_draws_the_same_numbers_in_the_recompute(rng):
    gen = np.random.default_rng(7)
    w = fg.tensor(rng.normal(size=(4, 4)), requires_grad=True)
    x = fg.tensor(rng.normal(size=(3, 4)))

    def dropout_block(x_):
        keep = fg.tensor((gen.random(x_.shape) >= 0.5) * 2.0)
        return (x_ * keep) @ w

    y = checkpoint(dropout_block, x, [w], rngs=[gen, gen])  # a generator named twice is rewound once
    after_forward = gen.bit_generator.state
    y.sum().backward()
    assert gen.bit_generator.state == after_forward  # the recompute's draws are undone
    keep = (np.random.default_rng(7).random((3, 4)) >= 0.5) * 2.0  # the forward's mask
    np.testing.assert_allclose(w.grad, (x.numpy() * keep).T @ np.ones((3, 4)), rtol=1e-6)


def test_params_must_be_leaves(rng):
    w = fg.tensor(rng.normal(size=(4, 4)), requires_grad=True) * 2.0
    with pytest.raises(GraphError, match="leaf"):
        checkpoint(lambda x_: x_ @ w, fg.tensor(rng.normal(size=(2, 4))), [w])
