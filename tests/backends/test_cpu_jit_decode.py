"""Generation's numba attention over the KV cache (cpu_jit_decode) against the reference attention_cached, on
both the serial twin (a decode step's little work) and the parallel kernel."""
import numpy as np
import pytest

numba = pytest.importorskip("numba")

from fusegrad.backends import cpu_jit_decode  # noqa: E402
from fusegrad.backends.base import rope_tables  # noqa: E402
from fusegrad.backends.cpu_jit import JitBackend  # noqa: E402
from fusegrad.backends.numpy_backend import NumpyBackend  # noqa: E402

jit, reference = JitBackend(), NumpyBackend()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("B, H, Hkv, D, start, T, parallel", [
    (1, 4, 2, 8, 0, 1, False),      # the first token
    (2, 6, 2, 8, 7, 1, False),      # one new token after seven: the decode step
    (1, 9, 3, 64, 2000, 1, False),  # SmolLM2's heads deep into the cache: still one core
    (2, 4, 4, 16, 3, 40, False),    # a short prompt after a prefix, causal within the block
    (1, 9, 3, 64, 100, 90, True),   # a long prompt: both cores
])
def test_attention_cached_equals_the_reference(rng, monkeypatch, B, H, Hkv, D, start, T, parallel):
    ran, kernel = [], cpu_jit_decode._attention_cached
    for twin, compiled in (("parallel", kernel.parallel), ("_serial", kernel.serial)):
        monkeypatch.setattr(kernel, twin, lambda *a, k=compiled, n=twin: ran.append(n) or k(*a))
    S = start + T + 2
    cos, sin = rope_tables(S, D, 10000.0)
    qkv = f32(rng, B, T, (H + 2 * Hkv) * D)
    k, v = f32(rng, B, Hkv, S, D), f32(rng, B, Hkv, S, D)
    k_ref, v_ref = k.copy(), v.copy()
    y_ref = reference.attention_cached(qkv, k_ref, v_ref, start, H, Hkv, cos, sin)
    y = jit.attention_cached(qkv, k, v, start, H, Hkv, cos, sin)
    assert ran == ["parallel" if parallel and numba.get_num_threads() > 1 else "_serial"]
    assert y.dtype == np.float32 and y.shape == (B, T, H * D)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(k, k_ref, rtol=1e-6, atol=1e-6)  # this block's keys written, rotated
    np.testing.assert_array_equal(v, v_ref)
