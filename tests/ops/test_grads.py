"""Every op: a float64 central-difference gradient check and a PyTorch autograd oracle on random shapes.

Each case gives inputs for random dims d = (d0, d1, d2, d3), the op in fusegrad and the same op in torch.
The scalar checked is sum(out * R) for a fixed random R, so every output element gets its own weight.
"""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fusegrad as fg


def rand(r, *shape):
    return r.standard_normal(shape)


def pos(r, *shape):
    return r.uniform(0.5, 2.0, shape)


def away0(r, *shape):  # |x| >= 0.2: no kink of relu/abs inside the finite-difference step
    return r.uniform(0.2, 2.0, shape) * r.choice([-1.0, 1.0], shape)


@dataclasses.dataclass
class Case:
    name: str
    inputs: callable  # (rng, d) -> list of arrays (float: differentiable; int: not)
    fg: callable
    th: callable


C = Case
CASES = [
    C("add", lambda r, d: [rand(r, d[0], d[1]), rand(r, d[1])], lambda a, b: a + b, lambda a, b: a + b),
    C("add_scalar", lambda r, d: [rand(r, d[0])], lambda a: 2.0 + a, lambda a: 2.0 + a),
    C("sub", lambda r, d: [rand(r, d[0], 1, d[2]), rand(r, d[1], d[2])], lambda a, b: a - b, lambda a, b: a - b),
    C("rsub", lambda r, d: [rand(r, d[0], d[1])], lambda a: 1.0 - a, lambda a: 1.0 - a),
    C("mul", lambda r, d: [rand(r, d[0], d[1]), rand(r, d[0], 1)], lambda a, b: a * b, lambda a, b: a * b),
    C("div", lambda r, d: [rand(r, d[0], d[1]), away0(r, d[1])], lambda a, b: a / b, lambda a, b: a / b),
    C("rdiv", lambda r, d: [away0(r, d[0], d[1])], lambda a: 1.5 / a, lambda a: 1.5 / a),
    C("neg", lambda r, d: [rand(r, d[0], d[1])], lambda a: -a, lambda a: -a),
    C("pow_float", lambda r, d: [pos(r, d[0], d[1])], lambda a: a ** 2.5, lambda a: a ** 2.5),
    C("pow_int", lambda r, d: [rand(r, d[0], d[1])], lambda a: a ** 3, lambda a: a ** 3),
    C("pow_tensor", lambda r, d: [pos(r, d[0], d[1]), rand(r, d[1])], fg.pow, torch.pow),
    C("exp", lambda r, d: [rand(r, d[0], d[1])], fg.exp, torch.exp),
    C("log", lambda r, d: [pos(r, d[0], d[1])], fg.log, torch.log),
    C("sqrt", lambda r, d: [pos(r, d[0], d[1])], fg.sqrt, torch.sqrt),
    C("matmul_2d", lambda r, d: [rand(r, d[0], d[1]), rand(r, d[1], d[2])], lambda a, b: a @ b, torch.matmul),
    C("matmul_batched", lambda r, d: [rand(r, d[3], d[0], d[1]), rand(r, d[3], d[1], d[2])],
      fg.matmul, torch.matmul),
    C("matmul_broadcast_batch", lambda r, d: [rand(r, d[3], 1, d[0], d[1]), rand(r, 2, d[1], d[2])],
      fg.matmul, torch.matmul),
    C("matmul_2d_rhs", lambda r, d: [rand(r, d[3], d[0], d[1]), rand(r, d[1], d[2])], fg.matmul, torch.matmul),
    C("matmul_nt", lambda r, d: [rand(r, d[0], d[1]), rand(r, d[2], d[1])], fg.matmul_nt, lambda a, b: a @ b.T),
    C("matmul_nt_batched", lambda r, d: [rand(r, d[3], d[0], d[1]), rand(r, d[2], d[1])],
      fg.matmul_nt, lambda a, b: a @ b.T),
    C("linear", lambda r, d: [rand(r, d[3], d[0], d[1]), rand(r, d[2], d[1]), rand(r, d[2])], fg.linear, F.linear),
    C("linear_nobias", lambda r, d: [rand(r, d[0], d[1]), rand(r, d[2], d[1])], fg.linear, F.linear),
    C("transpose", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: fg.transpose(a, 0, 2),
      lambda a: a.transpose(0, 2)),
    C("T", lambda r, d: [rand(r, d[0], d[1])], lambda a: a.T, lambda a: a.T),
    C("permute", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: a.permute(2, 0, 1),
      lambda a: a.permute(2, 0, 1)),
    C("reshape", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: a.reshape(a.shape[2], -1),
      lambda a: a.reshape(a.shape[2], -1)),
    C("view", lambda r, d: [rand(r, d[0], d[1])], lambda a: a.view(-1), lambda a: a.view(-1)),
    C("concat", lambda r, d: [rand(r, d[0], d[1]), rand(r, d[2], d[1])], lambda a, b: fg.concat([a, b, a]),
      lambda a, b: torch.cat([a, b, a])),
    C("concat_axis1", lambda r, d: [rand(r, d[0], d[1]), rand(r, d[0], d[2])],
      lambda a, b: fg.concat([a, b], axis=1), lambda a, b: torch.cat([a, b], dim=1)),
    C("split", lambda r, d: [rand(r, d[0], d[1] + d[2])],
      lambda a: fg.concat(fg.split(a, [1, a.shape[1] - 1], axis=1)[::-1], axis=1),
      lambda a: torch.cat(torch.split(a, [1, a.shape[1] - 1], dim=1)[::-1], dim=1)),
    C("split_equal", lambda r, d: [rand(r, 2 * d[0], d[1])], lambda a: (lambda p, q: p * q)(*fg.split(a, 2)),
      lambda a: (lambda p, q: p * q)(*torch.chunk(a, 2))),
    C("getitem_slices", lambda r, d: [rand(r, d[0] + 1, d[1], d[2])], lambda a: a[1:, ::2, -1],
      lambda a: a[1:, ::2, -1]),
    C("getitem_int", lambda r, d: [rand(r, d[0], d[1])], lambda a: a[-1], lambda a: a[-1]),
    C("getitem_array_repeats", lambda r, d: [rand(r, d[0], d[1])], lambda a: a[np.array([0, 0, -1, 0])],
      lambda a: a[torch.tensor([0, 0, -1, 0])]),
    C("getitem_two_arrays", lambda r, d: [rand(r, d[0], d[1])],
      lambda a: a[np.array([0, -1, 0]), np.array([0, 0, -1])],
      lambda a: a[torch.tensor([0, -1, 0]), torch.tensor([0, 0, -1])]),
    C("relu", lambda r, d: [away0(r, d[0], d[1])], fg.relu, torch.relu),
    C("sigmoid", lambda r, d: [rand(r, d[0], d[1])], fg.sigmoid, torch.sigmoid),
    C("silu", lambda r, d: [rand(r, d[0], d[1])], fg.silu, F.silu),
    C("gelu", lambda r, d: [rand(r, d[0], d[1])], fg.gelu, F.gelu),
    C("gelu_tanh", lambda r, d: [rand(r, d[0], d[1])], lambda a: fg.gelu(a, approximate="tanh"),
      lambda a: F.gelu(a, approximate="tanh")),
    C("sum_all", lambda r, d: [rand(r, d[0], d[1])], lambda a: a.sum(), lambda a: a.sum()),
    C("sum_axis", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: a.sum(axis=1), lambda a: a.sum(dim=1)),
    C("sum_keepdims", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: a.sum(axis=(0, 2), keepdims=True),
      lambda a: a.sum(dim=(0, 2), keepdim=True)),
    C("mean_all", lambda r, d: [rand(r, d[0], d[1])], lambda a: a.mean(), lambda a: a.mean()),
    C("mean_axis", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: a.mean(axis=-1), lambda a: a.mean(dim=-1)),
    C("max_all", lambda r, d: [rand(r, d[0], d[1])], lambda a: a.max(), lambda a: a.amax()),
    C("max_axis", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: a.max(axis=1), lambda a: a.amax(dim=1)),
    C("max_keepdims", lambda r, d: [rand(r, d[0], d[1])], lambda a: a.max(axis=0, keepdims=True),
      lambda a: a.amax(dim=0, keepdim=True)),
    C("softmax", lambda r, d: [rand(r, d[0], d[1])], lambda a: a.softmax(), lambda a: a.softmax(-1)),
    C("softmax_axis0", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: fg.softmax(a, axis=0),
      lambda a: a.softmax(0)),
    C("log_softmax", lambda r, d: [rand(r, d[0], d[1], d[2])], lambda a: a.log_softmax(),
      lambda a: a.log_softmax(-1)),
    C("cross_entropy", lambda r, d: [rand(r, d[0] + d[3], d[1] + 1), r.integers(0, d[1] + 1, d[0] + d[3])],
      fg.cross_entropy, F.cross_entropy),
]

dims = st.tuples(*[st.integers(1, 4)] * 4)
seeds = st.integers(0, 2 ** 16)


def _fg_inputs(arrays, dtype, requires_grad=True):
    return [fg.tensor(x, dtype=dtype, requires_grad=requires_grad) if x.dtype.kind == "f" else fg.tensor(x)
            for x in arrays]


def _weights(case, arrays, r):
    with fg.no_grad():
        out = case.fg(*_fg_inputs(arrays, "float64", requires_grad=False))
    return r.standard_normal(out.shape)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@settings(max_examples=6)
@given(d=dims, seed=seeds)
def test_gradcheck_float64(case, d, seed):
    r = np.random.default_rng(seed)
    arrays = case.inputs(r, d)
    weights = _weights(case, arrays, r)

    def scalar(xs):
        with fg.no_grad():
            return float(np.sum(case.fg(*_fg_inputs(xs, "float64", requires_grad=False)).numpy() * weights))

    tensors = _fg_inputs(arrays, "float64")
    out = case.fg(*tensors)
    (out * fg.tensor(weights, dtype="float64")).sum().backward()
    eps = 1e-6
    for x, t in zip(arrays, tensors):
        if x.dtype.kind != "f":
            continue
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            orig = x[idx]
            x[idx] = orig + eps
            plus = scalar(arrays)
            x[idx] = orig - eps
            minus = scalar(arrays)
            x[idx] = orig
            numeric[idx] = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(t.grad, numeric, rtol=1e-5, atol=1e-7, err_msg=case.name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@settings(max_examples=6)
@given(d=dims, seed=seeds)
def test_matches_torch_autograd(case, d, seed):
    r = np.random.default_rng(seed)
    arrays = case.inputs(r, d)
    weights = _weights(case, arrays, r)
    tensors = _fg_inputs(arrays, "float32")  # the production dtype against a float64 oracle
    out = case.fg(*tensors)
    (out * fg.tensor(weights, dtype="float32")).sum().backward()
    th = [torch.tensor(x, requires_grad=True) if x.dtype.kind == "f" else torch.tensor(x) for x in arrays]
    th_out = case.th(*th)
    (th_out * torch.tensor(weights)).sum().backward()
    assert out.shape == tuple(th_out.shape) and out.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), th_out.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=case.name)
    for t, tt in zip(tensors, th):
        if tt.grad is None:
            continue
        assert type(t.grad) is np.ndarray and t.grad.dtype == np.float32, case.name
        np.testing.assert_allclose(t.grad, tt.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=case.name)


def _composite(lib, x, w, b):
    """A graph where h, s and y are each consumed several times."""
    h = lib["linear"](x, w, b)  # (N, out)
    s = lib["silu"](h)
    y = s * h + lib["softmax"](s) * s
    z = lib["cat"]([y, h, s.exp()])
    return (z * z).mean() + lib["amax"](y).sum() + lib["log_softmax"](h - s).sum() * 0.1


FG = {"linear": fg.linear, "silu": fg.silu, "softmax": lambda a: a.softmax(-1), "cat": lambda ts: fg.concat(ts, 1),
      "amax": lambda a: a.max(axis=1), "log_softmax": lambda a: a.log_softmax(-1)}
TH = {"linear": F.linear, "silu": F.silu, "softmax": lambda a: a.softmax(-1), "cat": lambda ts: torch.cat(ts, 1),
      "amax": lambda a: a.amax(dim=1), "log_softmax": lambda a: a.log_softmax(-1)}


def test_composite_graph_with_shared_nodes(rng):
    arrays = [rand(rng, 5, 4), rand(rng, 3, 4), rand(rng, 3)]
    tensors = [fg.tensor(x, dtype="float64", requires_grad=True) for x in arrays]
    _composite(FG, *tensors).backward()
    th = [torch.tensor(x, requires_grad=True) for x in arrays]
    _composite(TH, *th).backward()
    eps = 1e-6
    for x, t, tt in zip(arrays, tensors, th):
        np.testing.assert_allclose(t.grad, tt.grad.numpy(), rtol=1e-10)
        for idx in np.ndindex(x.shape):  # and central differences
            orig = x[idx]
            vals = []
            for v in (orig + eps, orig - eps):
                x[idx] = v
                with fg.no_grad():
                    vals.append(_composite(FG, *[fg.tensor(a, dtype="float64") for a in arrays]).item())
            x[idx] = orig
            assert abs((vals[0] - vals[1]) / (2 * eps) - t.grad[idx]) < 1e-6


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow"])
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       seed=seeds)
def test_binary_broadcast_grads_match_torch(op, shapes, seed):
    # random broadcasting patterns, 0-d included: grads are summed back to each input's own shape
    r = np.random.default_rng(seed)
    a, b = pos(r, *shapes.input_shapes[0]), away0(r, *shapes.input_shapes[1])
    fa, fb = fg.tensor(a, dtype="float64", requires_grad=True), fg.tensor(b, dtype="float64", requires_grad=True)
    out = getattr(fg, op)(fa, fb)
    weights = r.standard_normal(out.shape)
    (out * fg.tensor(weights, dtype="float64")).sum().backward()
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    (getattr(torch, op)(ta, tb) * torch.tensor(weights)).sum().backward()
    assert out.shape == shapes.result_shape
    np.testing.assert_allclose(fa.grad, ta.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fb.grad, tb.grad.numpy(), rtol=1e-10, atol=1e-12)
