"""Generation's kernels for `JitBackend`: one-row GEMMs on every core and attention over the KV cache.

After the prompt, each new token multiplies ONE row by every weight: a GEMV, bound by how fast the weight
streams from memory, so both cores read half of it each (OpenBLAS's GEMV on two threads was slower than on
one: docs/performance.md). Attention reads the cache in place: rope, the cache write, the scores, the softmax
and the weighted sum of the values are one pass per query head, no copies. Work too small to wake a thread
for runs on the `serial` twin of a kernel.
Shapes: M rows of x (tokens), K inputs, N outputs, B batch, T new tokens, S cache positions.

>>> rng = np.random.default_rng(0)
>>> x, w = rng.standard_normal((1, 64)).astype(np.float32), rng.standard_normal((4096, 64)).astype(np.float32)
>>> takes_gemv(x, w, False, True), bool(np.allclose(gemv_nt(x, w), x @ w.T, atol=1e-4))
(True, True)
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from fusegrad.backends.jit_common import SERIAL_MAX_WORK, fast_exp, is_f32, jit, row_chunks, serial

GEMV_MAX_ROWS = 4  # up to this many rows of x the weight is read once for all of them, row by row
GEMV_MIN_WEIGHT = 1 << 18  # weights of fewer elements (1 MiB) stay in BLAS: waking a second core costs more


@jit
def _gemv_nt(x, w, y, parts):
    # x (M, K), w (N, K) -> y (M, N) = x w^T, w's rows split into `parts` ranges. Four weight rows per pass
    # over x: four memory streams at once (as fast as OpenBLAS's sgemv on one core; one row at a time is 25%
    # slower), and the four rows stay in L1 for every row of x
    M, K = x.shape
    N = w.shape[0]
    for p in prange(parts):
        lo, hi = p * N // parts, (p + 1) * N // parts
        i = lo
        while i + 4 <= hi:
            r0, r1, r2, r3 = w[i], w[i + 1], w[i + 2], w[i + 3]
            for m in range(M):
                xm = x[m]
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for k in range(K):
                    s0 += xm[k] * r0[k]
                    s1 += xm[k] * r1[k]
                    s2 += xm[k] * r2[k]
                    s3 += xm[k] * r3[k]
                y[m, i], y[m, i + 1], y[m, i + 2], y[m, i + 3] = s0, s1, s2, s3
            i += 4
        for j in range(i, hi):
            for m in range(M):
                s = np.float32(0.0)
                for k in range(K):
                    s += x[m, k] * w[j, k]
                y[m, j] = s


def takes_gemv(a, b, trans_a: bool, trans_b: bool) -> bool:
    """True for a @ b^T with a (M <= GEMV_MAX_ROWS, K), b (N, K) a large C-ordered float32 weight: a linear
    layer's forward in generation."""
    return (trans_b and not trans_a and is_f32(a, b) and a.ndim == 2 and b.ndim == 2
            and a.shape[0] <= GEMV_MAX_ROWS and b.size >= GEMV_MIN_WEIGHT and b.flags.c_contiguous)


def gemv_nt(a, b):
    """a (M, K) @ b (N, K)^T -> (M, N) for the arrays `takes_gemv` accepts."""
    y = np.empty((a.shape[0], b.shape[0]), np.float32)
    _gemv_nt(np.ascontiguousarray(a), b, y, row_chunks(b.shape[0]))
    return y


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


_attention_cached_serial = serial(_attention_cached)


def attention_cached(qkv, k_cache, v_cache, start: int, n_heads: int, n_kv_heads: int, cos, sin):
    """`Backend.attention_cached` for float32 numpy arrays (caches C-ordered, written in place)."""
    B, T, _ = qkv.shape
    D = k_cache.shape[3]
    y = np.empty((B, T, n_heads * D), np.float32)
    work = B * n_heads * T * (start + T) * D
    kernel = _attention_cached_serial if work < SERIAL_MAX_WORK else _attention_cached
    kernel(np.ascontiguousarray(qkv), k_cache, v_cache, start, cos, sin, n_heads, y)
    return y
