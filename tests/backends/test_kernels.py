"""Every backend's kernels against the reference bodies of the kernel contract (fusegrad.backends.base),
run by the plain NumpyBackend: that backend's own GEMM and scatter-add, the numba JitBackend, torch on its
CPU device, and the ANE simulator's GEMM (fp16 operands). A new backend joins by adding its name to
BACKENDS."""
import numpy as np
import pytest

from fusegrad.backends import base, get_backend
from fusegrad.backends.numpy_backend import NumpyBackend

REF = NumpyBackend()
BACKENDS = ["numpy", "numpy-jit", "torch:cpu"]


def make(name):
    if name == "numpy":
        return NumpyBackend()
    if name == "numpy-jit":
        pytest.importorskip("numba")
        from fusegrad.backends.cpu_jit import JitBackend
        return JitBackend()
    pytest.importorskip(name.split(":")[0])
    pytest.importorskip("array_api_compat")
    return get_backend(name)


@pytest.fixture(params=BACKENDS)
def be(request):
    return make(request.param)


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def close(be, got, want, tol=2e-5):
    got = be.to_numpy(got) if got is not None and not isinstance(got, (float, np.ndarray)) else got
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64), rtol=tol, atol=tol)


def test_every_override_is_declared_in_the_contract(be):
    for cls in type(be).__mro__:
        if cls is base.Backend:
            break
        for name, member in vars(cls).items():
            if callable(member) and not name.startswith("_") and name != "cpu_gemm":  # numpy's BLAS, for the ANE
                assert hasattr(base.Backend, name), f"{cls.__name__}.{name} is not declared in base.Backend"


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm(be, rng, trans_a, trans_b):
    a, b = f32(rng, 2, *((7, 5) if trans_a else (5, 7))), f32(rng, *((3, 7) if trans_b else (7, 3)))
    close(be, be.gemm(be.asarray(a), be.asarray(b), trans_a, trans_b), REF.gemm(a, b, trans_a, trans_b))


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_accumulate_into_a_column_slice(be, rng, trans_a, trans_b):
    """LoRA's y[:, rows] += u B^T: c a strided view; operands stored row-major, then as transposed views."""
    a, b = f32(rng, *((7, 5) if trans_a else (5, 7))), f32(rng, *((3, 7) if trans_b else (7, 3)))
    product = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    y = f32(rng, 5, 9)
    want, y_be = y.astype(np.float64), be.asarray(y.copy())
    for column_major in (False, True):
        stored = [be.asarray(np.ascontiguousarray(x.T)).T if column_major else be.asarray(x) for x in (a, b)]
        be.gemm_accumulate(y_be[:, 2:5], *stored, trans_a, trans_b, alpha=0.5)
        want[:, 2:5] += 0.5 * product
        close(be, y_be, want)
    with pytest.raises(base.ShapeError, match=r"gemm_accumulate: c is \(5, 2\)"):
        be.gemm_accumulate(y_be[:, 2:4], be.asarray(a), be.asarray(b), trans_a, trans_b)


def test_gemm_accumulate_outside_blas_reach_takes_the_reference(rng):
    """float64 operands, or c a transposed view: the reference's product and add, same result."""
    be = NumpyBackend()
    a, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    c = np.zeros((4, 2))
    be.gemm_accumulate(c, a, b)
    np.testing.assert_allclose(c, a @ b)
    ct = np.zeros((2, 4), np.float32)
    be.gemm_accumulate(ct.T, a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_allclose(ct.T, a @ b, rtol=1e-5, atol=1e-6)


def test_rmsnorm(be, rng):
    x, w, dy = f32(rng, 6, 16), f32(rng, 16), f32(rng, 6, 16)
    y, rstd = be.rmsnorm_forward(be.asarray(x), be.asarray(w), 1e-5)
    y_ref, rstd_ref = REF.rmsnorm_forward(x, w, 1e-5)
    close(be, y, y_ref), close(be, rstd, rstd_ref)
    for need_dx, need_dw in [(True, True), (True, False), (False, True)]:
        got = be.rmsnorm_backward(be.asarray(dy), be.asarray(x), be.asarray(w), rstd, need_dx, need_dw)
        for g, want in zip(got, REF.rmsnorm_backward(dy, x, w, rstd_ref, need_dx, need_dw)):
            assert (g is None) == (want is None)
            if want is not None:
                close(be, g, want, 1e-4)


@pytest.mark.parametrize("inverse", [False, True])
def test_rope(be, rng, inverse):
    x = f32(rng, 2, 5, 3, 8)
    cos, sin = base.rope_tables(5, 8, 10000.0)
    close(be, be.rope_apply(be.asarray(x), be.asarray(cos), be.asarray(sin), inverse),
          REF.rope_apply(x, cos, sin, inverse))


@pytest.mark.parametrize("probs_budget", [base.ATTENTION_PROBS_BUDGET, 0], ids=["probs-kept", "recomputed"])
@pytest.mark.parametrize("B, T, H, Hkv, D, block", [(2, 7, 4, 2, 6, 3), (1, 9, 6, 1, 4, 128), (1, 5, 2, 2, 8, 2)])
def test_attention_forward_backward(be, rng, B, T, H, Hkv, D, block, probs_budget, monkeypatch):
    """Against the reference that keeps its probabilities; budget 0: the backend keeps only q, k, v and the
    rows' logsumexp, and its backward recomputes them."""
    qkv, dy = f32(rng, B, T, (H + 2 * Hkv) * D), f32(rng, B, T, H * D)
    cos, sin = base.rope_tables(T + 3, D, 10000.0)
    y_ref, saved_ref = REF.attention_forward(qkv, H, Hkv, cos, sin, block)
    assert saved_ref.probs is not None
    monkeypatch.setattr(base, "ATTENTION_PROBS_BUDGET", probs_budget)
    y, saved = be.attention_forward(be.asarray(qkv), H, Hkv, cos, sin, block)
    assert getattr(saved, "probs", None) is None or probs_budget
    close(be, y, y_ref, 1e-4)
    close(be, be.attention_backward(be.asarray(dy), saved, H, Hkv), REF.attention_backward(dy, saved_ref, H, Hkv), 1e-4)


def test_attention_cached_equals_the_full_forward(be, rng):
    B, T, H, Hkv, D = 2, 9, 4, 2, 6
    qkv = f32(rng, B, T, (H + 2 * Hkv) * D)
    cos, sin = base.rope_tables(16, D, 10000.0)
    k, v = be.zeros((B, Hkv, 12, D), np.float32), be.zeros((B, Hkv, 12, D), np.float32)
    parts = [be.attention_cached(be.asarray(qkv[:, lo:hi]), k, v, lo, H, Hkv, cos, sin) for lo, hi in [(0, 5), (5, 6), (6, 9)]]
    got = np.concatenate([be.to_numpy(p) for p in parts], axis=1)
    close(be, got, REF.attention_forward(qkv, H, Hkv, cos, sin)[0], 1e-4)
    assert got.dtype == np.float32


def test_swiglu(be, rng):
    h13, g = f32(rng, 5, 12, scale=3.0), f32(rng, 5, 6)
    close(be, be.swiglu_forward(be.asarray(h13)), REF.swiglu_forward(h13))
    close(be, be.swiglu_backward(be.asarray(g), be.asarray(h13)), REF.swiglu_backward(g, h13), 1e-4)


def test_embedding_backward_and_index_add(be, rng):
    g, tokens = f32(rng, 6, 4), np.array([1, 3, 1, 0, 3, 3])
    close(be, be.embedding_backward(be.asarray(g), tokens, 5), REF.embedding_backward(g, tokens, 5))
    target, want = be.zeros((5, 4), np.float32), np.zeros((5, 4), np.float32)
    be.index_add(target, tokens, be.asarray(g))
    REF.index_add(want, tokens, g)
    close(be, target, want)
    be.embedding_backward_into(target, be.asarray(g), tokens)  # a tied weight's rows, into its other grad
    close(be, target, want + REF.embedding_backward(g, tokens, 5))


@pytest.mark.parametrize("chunk", [3, 256])
def test_classifier_cross_entropy(be, rng, chunk):
    h, w, t = f32(rng, 7, 8), f32(rng, 11, 8), rng.integers(0, 11, 7)
    want = REF.classifier_cross_entropy(h, w, t, chunk)
    for need_dh, need_dw in [(True, True), (False, True), (True, False)]:
        got = be.classifier_cross_entropy(be.asarray(h), be.asarray(w), t, chunk, need_dh, need_dw)
        close(be, got[0], want[0])
        for g, ref, need in zip(got[1:], want[1:], (need_dh, need_dw)):
            assert (g is None) == (not need)
            if need:
                close(be, g, ref, 1e-4)


def test_adamw_accumulate_sum_of_squares(be, rng):
    p, g, m, v = f32(rng, 4, 5), f32(rng, 4, 5), f32(rng, 4, 5) * 0.1, np.abs(f32(rng, 4, 5))
    arrays = [be.asarray(a.copy()) for a in (p, m, v)]
    for step, clip in ((1, 1.0), (2, 0.37)):  # the second step folds in a gradient clip's factor
        be.adamw_update(arrays[0], be.asarray(g), arrays[1], arrays[2], 1e-2, 0.9, 0.95, 1e-8, 0.1, step, grad_scale=clip)
        REF.adamw_update(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step, grad_scale=clip)
    for got, want in zip(arrays, (p, m, v)):
        close(be, got, want)
    be.accumulate(arrays[0], be.asarray(g))
    close(be, arrays[0], p + g)
    assert float(be.sum_of_squares([be.asarray(g), be.asarray(m)])) == pytest.approx(float(REF.sum_of_squares([g, m])), rel=1e-6)


def test_ane_sim_gemm_against_the_reference(rng):
    be = get_backend("ane-sim")
    a, w = f32(rng, 16, 32), f32(rng, 24, 32)
    want = REF.gemm(a, w, trans_b=True)
    got = be.gemm(a, w, trans_b=True)  # fp16 operands on the simulator
    np.testing.assert_allclose(got, want, atol=5e-3 * np.abs(want).max())
    assert be.kernels_built >= 1
