"""Generation's numba kernels (cpu_jit_decode) against numpy's BLAS and the reference attention_cached, on both
drivers (serial for small work, parallel for large); and that the JitBackend routes what they are for to them."""
import numpy as np
import pytest

pytest.importorskip("numba")

from fusegrad.backends import cpu_jit_decode, jit_common  # noqa: E402
from fusegrad.backends.base import rope_tables  # noqa: E402
from fusegrad.backends.cpu_jit import JitBackend  # noqa: E402
from fusegrad.backends.numpy_backend import NumpyBackend  # noqa: E402
from fusegrad.core.trace import trace  # noqa: E402

jit, reference = JitBackend(), NumpyBackend()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_gemv_equals_blas(rng, rows):
    x, w = f32(rng, rows, 576), f32(rng, 1001, 576)  # not a whole number of 4-row blocks
    assert cpu_jit_decode.takes_gemv(x, w, False, True)
    np.testing.assert_allclose(cpu_jit_decode.gemv_nt(x, w), x @ w.T, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(cpu_jit_decode.gemv_nt(x[:, ::2], w[:, :288]), x[:, ::2] @ w[:, :288].T,
                               rtol=1e-5, atol=1e-4)  # a strided x is copied, not misread


def test_gemv_takes_only_a_few_rows_times_a_large_c_ordered_float32_weight(rng):
    x, w = f32(rng, 1, 512), f32(rng, 512, 512)
    assert cpu_jit_decode.takes_gemv(x, w, False, True)
    assert not cpu_jit_decode.takes_gemv(x, w, False, False)  # x @ w: w's columns are not rows
    assert not cpu_jit_decode.takes_gemv(x.T, w, True, True)
    assert not cpu_jit_decode.takes_gemv(f32(rng, cpu_jit_decode.GEMV_MAX_ROWS + 1, 512), w, False, True)
    assert not cpu_jit_decode.takes_gemv(x, w[:, :256], False, True)  # too small, and not C-ordered
    assert not cpu_jit_decode.takes_gemv(x, w.T, False, True)
    assert not cpu_jit_decode.takes_gemv(x.astype(np.float64), w.astype(np.float64), False, True)


def test_jit_backend_gemm_runs_a_linear_forward_on_one_row_as_the_gemv(rng, monkeypatch):
    x, w = f32(rng, 1, 512), f32(rng, 1024, 512)
    calls = []
    monkeypatch.setattr(cpu_jit_decode, "gemv_nt", lambda a, b: calls.append(a.shape) or a @ b.T)
    with trace() as t:
        y = jit.gemm(x, w, trans_b=True)
    assert calls == [(1, 512)] and y.shape == (1, 1024)
    assert t.totals(by="category")["matmul"]["count"] == 1  # still traced as a GEMM
    jit.gemm(f32(rng, 64, 512), w, trans_b=True)  # many rows: BLAS
    assert len(calls) == 1


@pytest.mark.parametrize("B, H, Hkv, D, start, T", [
    (1, 4, 2, 8, 0, 1),     # the first token
    (2, 6, 2, 8, 7, 1),     # one new token after seven: the decode step, serial
    (1, 9, 3, 64, 120, 1),  # SmolLM2's heads deep into the cache: parallel
    (2, 4, 4, 16, 3, 40),   # a prompt after a prefix: parallel, causal within the block
])
def test_attention_cached_equals_the_reference(rng, B, H, Hkv, D, start, T):
    S = start + T + 2
    work = B * H * T * (start + T) * D
    assert (work < jit_common.SERIAL_MAX_WORK) == (T == 1 and D <= 8)  # both drivers are covered
    cos, sin = rope_tables(S, D, 10000.0)
    qkv = f32(rng, B, T, (H + 2 * Hkv) * D)
    k, v = f32(rng, B, Hkv, S, D), f32(rng, B, Hkv, S, D)
    k_ref, v_ref = k.copy(), v.copy()
    y_ref = reference.attention_cached(qkv, k_ref, v_ref, start, H, Hkv, cos, sin)
    y = jit.attention_cached(qkv, k, v, start, H, Hkv, cos, sin)
    assert y.dtype == np.float32 and y.shape == (B, T, H * D)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(k, k_ref, rtol=1e-6, atol=1e-6)  # this block's keys written, rotated
    np.testing.assert_array_equal(v, v_ref)
