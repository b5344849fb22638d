"""Tensor and autograd: one topological sweep, accumulation, no_grad/detach, graph release, aliasing."""
import gc
import weakref

import numpy as np
import pytest
import torch

import fusegrad as fg
from fusegrad.core.tensor import Node, Tensor


def test_tensor_defaults_and_dtypes():
    assert fg.tensor([1.0, 2.0]).dtype == np.float32
    assert fg.tensor([1, 2]).dtype == np.int64
    assert fg.tensor([1.0], dtype="float64").dtype == np.float64
    assert fg.tensor(np.zeros((2, 3, 4, 5)), requires_grad=True).shape == (2, 3, 4, 5)
    with pytest.raises(fg.ShapeError, match="floating"):
        fg.tensor([1, 2], requires_grad=True)
    src = np.ones(3, np.float32)
    t = fg.tensor(src)
    src[0] = 5.0
    assert t.tolist() == [1.0, 1.0, 1.0]  # a copy, never the caller's array


def test_shared_input_gets_gradient_once():
    a = fg.tensor([1.0, -2.0, 3.0], requires_grad=True)
    (a + a).sum().backward()
    np.testing.assert_array_equal(a.grad, [2.0, 2.0, 2.0])


def test_shared_intermediate_reached_by_paths_of_different_length():
    # c feeds the root directly and through d: both contributions must arrive before c's backward runs
    a = fg.tensor([0.5, 1.0], dtype="float64", requires_grad=True)
    c = a.exp()
    (c + c * 2).sum().backward()
    np.testing.assert_allclose(a.grad, 3 * np.exp([0.5, 1.0]))


def _residual_chain(lib, x, weights):
    for w in weights:  # x = x + f(x), f(x) = silu(x @ W) * 0.5
        h = x @ w
        f = (h.silu() if lib is fg else torch.nn.functional.silu(h)) * 0.5
        x = x + f
    return (x * x).sum()


@pytest.mark.parametrize("depth", [20, 40])
def test_residual_chain_matches_torch_with_linear_backward_work(rng, depth):
    x0 = rng.standard_normal((4, 8)) * 0.5
    ws = [rng.standard_normal((8, 8)) * 0.2 for _ in range(depth)]
    fx = fg.tensor(x0, dtype="float64", requires_grad=True)
    fws = [fg.tensor(w, dtype="float64", requires_grad=True) for w in ws]
    tx = torch.tensor(x0, requires_grad=True)
    tws = [torch.tensor(w, requires_grad=True) for w in ws]
    with fg.trace() as t:
        _residual_chain(fg, fx, fws).backward()
    _residual_chain(torch, tx, tws).backward()
    np.testing.assert_allclose(fx.grad, tx.grad.numpy(), rtol=1e-10)
    for fw, tw in zip(fws, tws):
        np.testing.assert_allclose(fw.grad, tw.grad.numpy(), rtol=1e-10)
    # every node's backward runs exactly once: 4 ops per block (matmul, silu, mul, add) + mul + sum
    node_backwards = sum(row[1] for (name, cat), row in t.aggregate.items() if cat == "backward")
    assert node_backwards == 4 * depth + 2


def test_grads_accumulate_until_zeroed():
    w = fg.tensor([1.0, 2.0], requires_grad=True)
    for _ in range(3):
        (w * w).sum().backward()
    np.testing.assert_allclose(w.grad, 3 * 2 * np.array([1.0, 2.0]))
    w.zero_grad()
    assert w.grad is None
    (w * 3).sum().backward()
    np.testing.assert_allclose(w.grad, [3.0, 3.0])


def test_no_grad_builds_no_graph():
    w = fg.tensor([1.0, 2.0], requires_grad=True)
    with fg.no_grad():
        assert not fg.is_grad_enabled()
        y = (w * 2).exp().sum()
    assert fg.is_grad_enabled()
    assert not y.requires_grad and y.node is None
    with pytest.raises(fg.ShapeError, match="does not require grad"):
        y.backward()


def test_detach_shares_data_and_cuts_the_graph():
    x = fg.tensor([1.0, 2.0, 3.0], requires_grad=True)
    d = x.detach()
    assert np.shares_memory(d.data, x.data) and not d.requires_grad and d.is_leaf
    (d * x).sum().backward()  # d is a constant: the grad is d, not 2x
    np.testing.assert_array_equal(x.grad, [1.0, 2.0, 3.0])


def test_intermediate_grad_freed_as_soon_as_consumed():
    seen = []

    def probe(t):  # identity op that remembers (weakly) the grad it consumed
        def backward(g):
            seen.append(weakref.ref(g))
            alive = [r() is not None for r in seen[:-1]]
            observed.append(alive)
            return (g * 1.0,)
        return Tensor(t.data.copy(), requires_grad=True, node=Node("probe", (t,), backward))

    observed = []
    x = fg.tensor(np.ones(1000), requires_grad=True)
    y = x
    for _ in range(4):
        y = probe(y)
    y.sum().backward()
    assert len(observed) == 4
    assert all(not any(alive) for alive in observed)  # no earlier grad is alive while a later node runs


def test_graph_released_after_backward():
    x = fg.tensor(np.ones((3, 4)), requires_grad=True)
    w = fg.tensor(np.ones((4, 5)), requires_grad=True)
    h = (x @ w).relu()
    ref = weakref.ref(h)
    loss = h.sum()
    del h
    gc.collect()
    assert ref() is not None  # held by the graph
    loss.backward()
    gc.collect()
    assert ref() is None  # the graph (and the activations it saved) went with the sweep
    with pytest.raises(fg.GraphError, match="retain_graph"):
        loss.backward()


def test_retain_graph_allows_second_backward():
    x = fg.tensor([1.0, 2.0], requires_grad=True)
    loss = (x * x).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_allclose(x.grad, 2 * 2 * np.array([1.0, 2.0]))


def test_grad_is_numpy_of_the_leaf_dtype_and_never_aliases():
    a = fg.tensor(np.arange(6.0).reshape(2, 3), dtype="float32", requires_grad=True)
    b = fg.tensor(np.ones((2, 3)), dtype="float32", requires_grad=True)
    c = fg.tensor(np.ones(3), dtype="float32", requires_grad=True)
    upstream = np.ones((2, 3), np.float32)
    (a + b + c.reshape(1, 3)).backward(upstream)
    grads = [a.grad, b.grad, c.grad]
    assert all(type(g) is np.ndarray and g.dtype == np.float32 for g in grads)
    for i, g in enumerate(grads):
        assert not np.shares_memory(g, upstream)
        for t in (a, b, c):
            assert not np.shares_memory(g, t.data)
        for h in grads[i + 1:]:
            assert not np.shares_memory(g, h)


def test_backward_copies_only_grads_that_are_really_shared(monkeypatch):
    # a freed grad's id is soon reused by a new array: only a live, handed-out array may count as shared
    backend = type(fg.backends.get_backend("numpy"))
    copied = []
    real_copy = backend.copy
    monkeypatch.setattr(backend, "copy", lambda self, a: copied.append(a.shape) or real_copy(self, a))
    x = fg.tensor(np.ones((64, 64), np.float32), requires_grad=True)
    y = x
    for _ in range(100):
        y = (y * 2.0).reshape(32, 128).reshape(64, 64)
    y.sum().backward()
    assert copied == []
    assert np.all(x.grad == np.float32(2.0 ** 100))
    w = fg.tensor(np.ones((64, 64), np.float32), requires_grad=True)
    ((w + w.reshape(64, 64)) * 3.0).sum().backward()  # add hands one array to both inputs:
    assert len(copied) == 1  # the second holder gets a copy
    assert np.all(w.grad == 6.0)


def test_two_leaves_never_share_a_grad_array_that_two_ops_return():
    shared = np.ones(3, np.float32)  # an op may hand back an array it holds; two such ops, one array
    a = fg.tensor(np.zeros(3), dtype="float32", requires_grad=True)
    b = fg.tensor(np.zeros(3), dtype="float32", requires_grad=True)
    x = Tensor(np.zeros(3, np.float32), requires_grad=True, node=Node("x", (a,), lambda g: (shared,)))
    y = Tensor(np.zeros(3, np.float32), requires_grad=True, node=Node("y", (b,), lambda g: (shared,)))
    (x + y).sum().backward()
    assert not np.shares_memory(a.grad, b.grad)
    a.grad += 1.0  # in place on one leaf's grad, as an optimizer or clipping does
    assert np.all(b.grad == 1.0)


def test_leaf_grads_accumulate_in_place_as_torch_does():
    w = fg.tensor(np.ones(4), dtype="float32", requires_grad=True)
    (w * 2.0).sum().backward()
    first = w.grad
    (w * 3.0).sum().backward()
    assert w.grad is first and np.all(first == 5.0)  # no second array of the weight's size
    buffer = np.zeros(4, np.float32)
    w.grad = buffer  # a buffer set beforehand is filled in place (data-parallel workers' shared grads)
    (w * 4.0).sum().backward()
    assert w.grad is buffer and np.all(buffer == 4.0)
    w.grad = np.broadcast_to(np.float32(1.0), (4,))  # read-only: a new array instead
    (w * 1.0).sum().backward()
    assert w.grad.flags.writeable and np.all(w.grad == 2.0)


def test_backward_rejects_bad_seed_grad():
    y = fg.tensor([1.0, 2.0], requires_grad=True) * 2
    with pytest.raises(fg.ShapeError, match="one-element"):
        y.backward()
    with pytest.raises(fg.ShapeError, match=r"\(3,\).*\(2,\)"):
        y.backward(np.ones(3))


@pytest.mark.parametrize("frozen", ["x", "w", "none"])
def test_only_inputs_that_require_grad_get_gemms(frozen):
    x = fg.tensor(np.ones((4, 6)), requires_grad=frozen != "x")
    w = fg.tensor(np.ones((6, 5)), requires_grad=frozen != "w")
    with fg.trace() as t:
        y = (x @ w).sum()
        forward = t.counters["dispatch:numpy"]
        y.backward()
        backward = t.counters["dispatch:numpy"] - forward
    assert forward == 1
    assert backward == (1 if frozen != "none" else 2)
    assert (x.grad is None) == (frozen == "x") and (w.grad is None) == (frozen == "w")


def _tied_loss(lib, w, ids, targets):
    """A tied embedding and classifier: the weight's grad is the classifier's dW plus the embedding's rows."""
    if lib is torch:
        h = torch.exp(torch.nn.functional.embedding(torch.as_tensor(ids), w))
        return torch.nn.functional.cross_entropy(h @ w.T, torch.as_tensor(targets))
    return fg.classifier_cross_entropy(fg.embedding(w, ids).exp(), w, targets)


def test_tied_embedding_grad_is_scattered_into_the_classifier_dw(rng, monkeypatch):
    backend = type(fg.backends.get_backend("numpy"))
    calls = []
    real_into = backend.embedding_backward_into
    monkeypatch.setattr(backend, "embedding_backward", lambda *a: calls.append("dense"))  # no (V, C) zeros
    monkeypatch.setattr(backend, "embedding_backward_into", lambda *a: calls.append("into") or real_into(*a))
    w0 = rng.standard_normal((50, 8)).astype(np.float32)
    ids = np.array([3, 7, 3, 49, 0, 3])  # repeated rows accumulate
    targets = np.array([1, 7, 7, 0, 49, 2])
    w = fg.tensor(w0, requires_grad=True)
    _tied_loss(fg, w, ids, targets).backward()
    wt = torch.tensor(w0, requires_grad=True)
    _tied_loss(torch, wt, ids, targets).backward()
    assert calls == ["into"]
    np.testing.assert_allclose(w.grad, wt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_embedding_rows_grad_accumulates_into_a_leaf_and_goes_dense_into_an_op(rng):
    w0 = rng.standard_normal((10, 4))
    ids = np.array([[1, 1, 9], [0, 1, 4]])
    counts = np.bincount(ids.ravel(), minlength=10)[:, None] * np.ones((1, 4))
    for dtype in ("float32", "float64"):  # float64 takes the reference scatter
        w = fg.tensor(w0, dtype=dtype, requires_grad=True)
        fg.embedding(w, ids).sum().backward()
        first = w.grad
        assert first.dtype == dtype and first.shape == (10, 4)
        np.testing.assert_array_equal(first, counts)
        fg.embedding(w, ids).sum().backward()  # the rows go into the existing .grad in place
        assert w.grad is first
        np.testing.assert_array_equal(first, 2 * counts)
        v = fg.tensor(w0, dtype=dtype, requires_grad=True)
        (fg.embedding(v * 3.0, ids) * 2.0).sum().backward()  # the mul's backward gets a dense array
        np.testing.assert_array_equal(v.grad, 6 * counts)
        u = fg.tensor(w0, dtype=dtype, requires_grad=True)
        (fg.embedding(u, ids) + fg.embedding(u, ids[::-1]) * 2.0).sum().backward()  # two row grads meet
        np.testing.assert_array_equal(u.grad, 3 * counts)
