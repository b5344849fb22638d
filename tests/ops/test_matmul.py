"""The matmul family: the seed's properties, LoRA-style grads through tracked transposes, and a backward
that hands BLAS strided views (transpose flags) instead of transposed copies."""
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusegrad as fg

side = st.integers(1, 8)


@given(m=side, k=side, n=side, batch=st.lists(st.integers(1, 3), max_size=2))
def test_output_shapes_for_random_dims(m, k, n, batch):
    b = tuple(batch)
    assert fg.matmul(fg.tensor(np.ones(b + (m, k))), fg.tensor(np.ones((k, n)))).shape == b + (m, n)
    assert fg.matmul_nt(fg.tensor(np.ones((m, k))), fg.tensor(np.ones(b + (n, k)))).shape == b + (m, n)
    assert fg.linear(fg.tensor(np.ones(b + (m, k))), fg.tensor(np.ones((n, k)))).shape == b + (m, n)


@given(m=st.integers(1, 6), k=st.integers(1, 6), seed=st.integers(0, 500))
def test_a_times_identity_is_a(m, k, seed):
    a = np.random.default_rng(seed).standard_normal((m, k)).astype(np.float32)
    np.testing.assert_allclose((fg.tensor(a) @ fg.tensor(np.eye(k, dtype=np.float32))).numpy(), a, atol=1e-6)


@given(m=st.integers(1, 6), k=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 500))
def test_matmul_nt_equals_matmul_with_transposed_copy(m, k, n, seed):
    r = np.random.default_rng(seed)
    a, b = r.standard_normal((m, k)), r.standard_normal((n, k))
    got = fg.matmul_nt(fg.tensor(a, dtype="float64"), fg.tensor(b, dtype="float64")).numpy()
    np.testing.assert_allclose(got, a @ np.ascontiguousarray(b.T), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, a.astype(np.float64) @ b.T, rtol=1e-12)


def test_transpose_grad_flows_back_to_original_layout():
    a = fg.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    a.T.backward(np.array([[10.0, 40.0], [20.0, 50.0], [30.0, 60.0]]))
    np.testing.assert_array_equal(a.grad, [[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])


@given(r=st.integers(1, 4), d_in=st.integers(1, 6), d_out=st.integers(1, 6), n=st.integers(1, 5),
       seed=st.integers(0, 500))
def test_lora_parameter_used_transposed_gets_its_grad(r, d_in, d_out, n, seed):
    # y = x A^T B^T with A (r, in), B (out, r) used through .T: grads arrive in the parameters' layouts
    g = np.random.default_rng(seed)
    x, a, b = g.standard_normal((n, d_in)), g.standard_normal((r, d_in)), g.standard_normal((d_out, r))
    fa, fb = fg.tensor(a, dtype="float64", requires_grad=True), fg.tensor(b, dtype="float64", requires_grad=True)
    ((fg.tensor(x, dtype="float64") @ fa.T @ fb.T) ** 2).sum().backward()
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    ((torch.tensor(x) @ ta.T @ tb.T) ** 2).sum().backward()
    assert fa.grad.shape == (r, d_in) and fb.grad.shape == (d_out, r)
    np.testing.assert_allclose(fa.grad, ta.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fb.grad, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


class GemmSpy:
    """Wraps the numpy backend's gemm: records every call's operands and the bytes it allocated."""

    def __init__(self, backend):
        self.backend, self.inner, self.calls = backend, backend.gemm, []

    def __call__(self, a, b, trans_a=False, trans_b=False):
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        out = self.inner(a, b, trans_a, trans_b)
        self.calls.append((a, b, trans_a, trans_b, out, tracemalloc.get_traced_memory()[1] - before))
        return out


@pytest.mark.parametrize("op", ["matmul", "matmul_nt"])
def test_backward_passes_views_to_gemm_and_allocates_only_the_grads(monkeypatch, op):
    rng = np.random.default_rng(0)
    x = fg.tensor(rng.standard_normal((512, 1024)), dtype="float32", requires_grad=True)
    w_shape = (1024, 1024) if op == "matmul" else (768, 1024)
    w = fg.tensor(rng.standard_normal(w_shape), dtype="float32", requires_grad=True)
    y = getattr(fg, op)(x, w)
    upstream = np.ones(y.shape, np.float32)
    backend = fg.backends.get_backend("numpy")
    spy = GemmSpy(backend)
    monkeypatch.setattr(backend, "gemm", spy, raising=False)
    tracemalloc.start()
    try:
        y.backward(upstream)
    finally:
        tracemalloc.stop()
    assert len(spy.calls) == 2
    slack = 64 * 1024
    originals = [x.data, w.data, upstream]
    for a, b, trans_a, trans_b, out, allocated in spy.calls:
        # operands are the saved arrays or the upstream grad themselves, never a transposed copy
        assert any(np.shares_memory(a, o) for o in originals) and any(np.shares_memory(b, o) for o in originals)
        assert allocated <= out.nbytes + slack, f"GEMM allocated {allocated} B for a {out.nbytes} B result"
    # the transpositions travel as flags: dA = g B^T (g B for nt), dB = A^T g (g^T A for nt)
    flags = {(c[2], c[3]) for c in spy.calls}
    assert flags == ({(False, True), (True, False)} if op == "matmul" else {(False, False), (True, False)})
    assert x.grad.shape == x.shape and w.grad.shape == w.shape


def test_backward_gemms_are_correct_for_all_flag_paths(rng):
    # dA = g op(B)^T and dB for both matmul and matmul_nt, checked against explicit numpy float64
    a, b, bt, g = (rng.standard_normal(s) for s in [(3, 4), (4, 5), (5, 4), (3, 5)])
    for op, b_arr, db_ref in [(fg.matmul, b, a.T @ g), (fg.matmul_nt, bt, g.T @ a)]:
        fa = fg.tensor(a, dtype="float64", requires_grad=True)
        fb = fg.tensor(b_arr, dtype="float64", requires_grad=True)
        op(fa, fb).backward(g)
        da_ref = g @ (b_arr.T if op is fg.matmul else b_arr)
        np.testing.assert_allclose(fa.grad, da_ref, rtol=1e-12)
        np.testing.assert_allclose(fb.grad, db_ref, rtol=1e-12)
