"""Generation's attention for `JitBackend`: the new tokens' queries against the KV cache, read in place.

Rope, the cache write, the scores, the softmax and the weighted sum of the values are one pass per query
head, with no copies. Attention work under DECODE_SERIAL_MAX_WORK multiply-adds (a decode step's one row against
up to ~7000 cached positions of SmolLM2) runs on the kernel's `serial` twin: the parallel kernel wakes numba's
threads (~150 us a call in this VM) while OpenBLAS's, kept spinning by the one-row GEMVs, hold the other
core; past 113 cached positions that cost 10-13 ms a token (docs/performance.md, "Generation, round 7").
Shapes: B batch, T new tokens, H query heads, Hkv kv heads, D head size, S cache positions.

>>> from fusegrad.backends.base import rope_tables
>>> from fusegrad.backends.numpy_backend import NumpyBackend
>>> qkv = np.random.default_rng(0).standard_normal((1, 1, 4 * 8)).astype(np.float32)  # 2 heads, 1 kv head
>>> cos, sin = rope_tables(4, 8, 10000.0)
>>> k, v = np.zeros((2, 1, 1, 4, 8), np.float32), np.zeros((2, 1, 1, 4, 8), np.float32)
>>> y = attention_cached(qkv, k[0], v[0], 0, 2, 1, cos, sin)
>>> bool(np.allclose(y, NumpyBackend().attention_cached(qkv, k[1], v[1], 0, 2, 1, cos, sin), atol=1e-6))
True
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from fusegrad.backends.jit_common import fast_exp, jit

DECODE_SERIAL_MAX_WORK = 1 << 22  # alone the parallel kernel draws level at ~2.4M (4096 positions x 9 heads x 64)


@jit
def _attention_cached(qkv, k_cache, v_cache, start, cos, sin, n_heads, y):
    # qkv (B, T, (H + 2 Hkv) D) at positions start..start+T-1; caches (B, Hkv, S, D); y (B, T, H D).
    # The new keys (rotated) and values go into the caches first; then each query (b, head h, t) is one
    # job: rotate q, score it against positions 0..start+t, softmax, weighted sum of the values
    B, T, _ = qkv.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[3]
    G, half = n_heads // Hkv, D // 2
    scale = np.float32(1.0 / math.sqrt(D))
    for b in range(B):
        for t in range(T):
            src, c, s = qkv[b, t], cos[start + t], sin[start + t]
            for h in range(Hkv):
                x, dst = src[(n_heads + h) * D:(n_heads + h + 1) * D], k_cache[b, h, start + t]
                for i in range(half):
                    dst[2 * i] = x[2 * i] * c[i] - x[2 * i + 1] * s[i]
                    dst[2 * i + 1] = x[2 * i] * s[i] + x[2 * i + 1] * c[i]
                v_cache[b, h, start + t, :] = src[(n_heads + Hkv + h) * D:(n_heads + Hkv + h + 1) * D]
    for job in prange(B * n_heads * T):
        b, h, t = job // (n_heads * T), (job // T) % n_heads, job % T
        x, c, s = qkv[b, t, h * D:(h + 1) * D], cos[start + t], sin[start + t]
        q = np.empty(D, np.float32)
        for i in range(half):
            q[2 * i] = (x[2 * i] * c[i] - x[2 * i + 1] * s[i]) * scale
            q[2 * i + 1] = (x[2 * i] * s[i] + x[2 * i + 1] * c[i]) * scale
        keys, values, n = k_cache[b, h // G], v_cache[b, h // G], start + t + 1
        p = np.empty(n, np.float32)
        mx = np.float32(-np.inf)
        for j in range(n):
            dot = np.float32(0.0)
            for d in range(D):
                dot += q[d] * keys[j, d]
            p[j] = dot
            mx = max(mx, dot)
        z = np.float32(0.0)
        for j in range(n):
            p[j] = fast_exp(p[j] - mx)
            z += p[j]
        out = y[b, t, h * D:(h + 1) * D]
        out[:] = 0.0
        for j in range(n):
            pj = p[j] / z
            for d in range(D):
                out[d] += pj * values[j, d]


def attention_cached(qkv, k_cache, v_cache, start: int, n_heads: int, n_kv_heads: int, cos, sin):
    """`Backend.attention_cached` for float32 numpy arrays (caches C-ordered, written in place)."""
    B, T, _ = qkv.shape
    D = k_cache.shape[3]
    y = np.empty((B, T, n_heads * D), np.float32)
    work = B * n_heads * T * (start + T) * D
    _attention_cached.sized(work, DECODE_SERIAL_MAX_WORK)(np.ascontiguousarray(qkv), k_cache, v_cache, start, cos,
                                                          sin, n_heads, y)
    return y
