"""Numba causal GQA attention: RoPE folded into the head split, a softmax that skips the masked triangle.

`JitBackend.attention_forward/backward` for float32 (the contract of `Backend.attention_forward`); the
score and value GEMMs stay in numpy BLAS.
The forward keeps q, k, v, each score row's logsumexp and, while they fit ATTENTION_PROBS_BUDGET, the
probabilities; past it the backward recomputes a block's probabilities, exp(scores - lse), one block at a
time (memory linear in T).
Layout: the G query heads sharing a kv head are interleaved by position, q (B, Hkv, T G, D) with row
t G + g, so the rows of query block [lo, hi) are ONE contiguous slice [lo G, hi G) — no per-block copy —
and its score GEMM is (hi G - lo G, D) x (D, hi). Keys past the block's last row are never touched; within
the block the softmax (and its backward) stops at each row's own position and writes zeros beyond it.

>>> from fusegrad.backends.base import rope_tables
>>> from fusegrad.backends.numpy_backend import NumpyBackend
>>> qkv = np.random.default_rng(0).standard_normal((1, 5, 3 * 8)).astype(np.float32)
>>> cos, sin = rope_tables(5, 4, 10000.0)
>>> y, saved = attention_forward(qkv, 2, 2, cos, sin)
>>> bool(np.allclose(y, NumpyBackend().attention_forward(qkv, 2, 2, cos, sin)[0], atol=1e-5))
True
"""
from __future__ import annotations

import math

import numpy as np
from numba import prange

from fusegrad.backends.base import ATTENTION_BLOCK, AttentionSaved, blocks, keeps_probs
from fusegrad.backends.jit_common import exp_shifted, fast_exp, jit, row_max, traced_matmul


def query_block(T: int) -> int:
    """Query rows per block for T positions: 64 up to T = 512, where the masked part of the diagonal blocks
    that smaller blocks skip outweighs their smaller GEMMs; ATTENTION_BLOCK past it (docs/performance.md,
    "Issue 16, round 11").

    >>> query_block(256), query_block(2048)
    (64, 128)
    """
    return 64 if T <= 512 else ATTENTION_BLOCK


class JitAttentionSaved(AttentionSaved):
    """The fields of AttentionSaved in this file's layout: q (B, Hkv, T G, D) (query head kv * G + g of
    position t at row t G + g), per block its probabilities (B, Hkv, bq G, hi) (or None) and its score rows'
    logsumexp (B, Hkv, bq G), tables cut to (T, D/2)."""


@jit
def _split_heads_rope(qkv, cos, sin, n_heads, q, k, v):
    # qkv (B, T, (H + 2 Hkv) D) -> q (B, Hkv, T G, D), k, v (B, Hkv, T, D); rope rotates pairs (2i, 2i+1).
    # 1-D row views (src, dst) keep the inner loops simple enough to vectorise
    B, T, _ = qkv.shape
    Hkv, D = k.shape[1], k.shape[3]
    G = n_heads // Hkv
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        src, c, s = qkv[b, t], cos[t], sin[t]
        for h in range(n_heads + Hkv):
            if h < n_heads:  # query head h = kv head h // G, group member h % G (llama2.c order)
                dst = q[b, h // G, t * G + h % G]
            else:
                dst = k[b, h - n_heads, t]
            x = src[h * D:(h + 1) * D]
            for i in range(D // 2):
                x0, x1 = x[2 * i], x[2 * i + 1]
                dst[2 * i] = x0 * c[i] - x1 * s[i]
                dst[2 * i + 1] = x0 * s[i] + x1 * c[i]
        for h in range(Hkv):
            v[b, h, t, :] = src[(n_heads + Hkv + h) * D:(n_heads + Hkv + h + 1) * D]


@jit
def _causal_softmax(s, lo, bq, G, scale, lse):
    # s (R, n) scores of block rows, bq G rows per (b, kv head); row r is at position lo + (r % (bq G)) // G.
    # -> probabilities in place, lse (R,) the rows' logsumexp of the scaled scores. scale is float32 and each
    # row a 1-D view, so the loops stay in float32 and vectorise
    R, n = s.shape
    for r in prange(R):
        valid = lo + (r % (bq * G)) // G + 1  # keys 0..pos
        row = s[r]
        mx = row_max(row, valid)
        z = np.float32(0.0)
        if math.isfinite(mx):  # no NaN, every exponent <= 0
            for j in range(valid):
                e = exp_shifted((row[j] - mx) * scale)
                row[j] = e
                z += e
        else:
            for j in range(valid):
                e = fast_exp((row[j] - mx) * scale)
                row[j] = e
                z += e
        inv = np.float32(1.0) / z
        for j in range(valid):
            row[j] *= inv
        for j in range(valid, n):
            row[j] = 0.0
        lse[r] = mx * scale + np.log(z)


@jit
def _causal_probs_from_lse(s, lo, bq, G, scale, lse):
    # the backward's recompute: s (R, n) scores -> exp(s scale - lse) in place (no max, no sum); zeros past
    # each row's position
    R, n = s.shape
    for r in prange(R):
        valid = lo + (r % (bq * G)) // G + 1
        row, m = s[r], lse[r]
        if math.isfinite(m):  # the forward's scores had no NaN: exponents <= 0 up to rounding
            for j in range(valid):
                row[j] = exp_shifted(row[j] * scale - m)
        else:
            for j in range(valid):
                row[j] = fast_exp(row[j] * scale - m)
        for j in range(valid, n):
            row[j] = 0.0


@jit
def _causal_softmax_backward(p, dp, lo, bq, G, scale):
    # dp (R, n) -> ds = p * (dp - sum(dp * p)) * scale, in place; zeros past each row's position
    R, n = dp.shape
    for r in prange(R):
        valid = lo + (r % (bq * G)) // G + 1
        prow, drow = p[r], dp[r]
        dot = np.float32(0.0)
        for j in range(valid):
            dot += prow[j] * drow[j]
        for j in range(valid):
            drow[j] = prow[j] * (drow[j] - dot) * scale
        for j in range(valid, n):
            drow[j] = 0.0


@jit
def _block_rows(heads, flat, lo, G, to_flat):
    # heads (B, Hkv, bq G, D) <-> flat[:, lo:lo+bq] (B, T, H D), query head hk G + g at row i G + g: to the
    # flat layout (the block's output into y) or from it (dy into the block's query-row layout)
    B, Hkv, R, D = heads.shape
    bq = R // G
    for bt in prange(B * bq):
        b, i = bt // bq, bt % bq
        for hk in range(Hkv):
            for g in range(G):
                base = (hk * G + g) * D
                for d in range(D):
                    if to_flat:
                        flat[b, lo + i, base + d] = heads[b, hk, i * G + g, d]
                    else:
                        heads[b, hk, i * G + g, d] = flat[b, lo + i, base + d]


@jit
def _merge_grads_rope(dq, dk, dv, cos, sin, dqkv):
    # dq (B, Hkv, T G, D), dk, dv (B, Hkv, T, D) -> dqkv (B, T, (H + 2 Hkv) D), rope rotated back
    B, Hkv, T, D = dk.shape
    G = dq.shape[2] // T
    H = Hkv * G
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        out, c, s = dqkv[b, t], cos[t], sin[t]
        for h in range(H + Hkv):
            x = dq[b, h // G, t * G + h % G] if h < H else dk[b, h - H, t]
            o = out[h * D:(h + 1) * D]
            for i in range(D // 2):
                x0, x1 = x[2 * i], x[2 * i + 1]
                o[2 * i] = x0 * c[i] + x1 * s[i]
                o[2 * i + 1] = x1 * c[i] - x0 * s[i]
        for h in range(Hkv):
            out[(H + Hkv + h) * D:(H + Hkv + h + 1) * D] = dv[b, h, t]


def attention_forward(qkv, n_heads: int, n_kv_heads: int, cos, sin, block: int | None = None):
    """float32 qkv (B, T, (H + 2 Hkv) D) -> y (B, T, H D), JitAttentionSaved; block: query rows per block
    (None: `query_block(T)`)."""
    B, T, width = qkv.shape
    block = block or query_block(T)
    D = width // (n_heads + 2 * n_kv_heads)
    G = n_heads // n_kv_heads
    cos, sin = np.ascontiguousarray(cos[:T]), np.ascontiguousarray(sin[:T])
    q = np.empty((B, n_kv_heads, T * G, D), np.float32)
    k = np.empty((B, n_kv_heads, T, D), np.float32)
    v = np.empty_like(k)
    _split_heads_rope(np.ascontiguousarray(qkv), cos, sin, n_heads, q, k, v)
    scale = np.float32(1.0 / math.sqrt(D))
    y = np.empty((B, T, n_heads * D), np.float32)
    probs = [] if keeps_probs(B, n_heads, T, block) else None
    lse = []
    for lo, hi in blocks(T, block):
        s = traced_matmul(q[:, :, lo * G:hi * G], k[:, :, :hi].swapaxes(-1, -2), "attention")  # (B, Hkv, bq G, hi)
        lse.append(np.empty(s.shape[:-1], np.float32))
        _causal_softmax(s.reshape(-1, hi), lo, hi - lo, G, scale, lse[-1].reshape(-1))
        _block_rows(traced_matmul(s, v[:, :, :hi], "attention"), y, lo, G, True)
        if probs is not None:
            probs.append(s)
    return y, JitAttentionSaved(q, k, v, probs, lse, cos, sin, block)


def attention_backward(dy, saved: JitAttentionSaved, n_heads: int, n_kv_heads: int):
    """dy (B, T, H D) -> dqkv (B, T, (H + 2 Hkv) D) float32; probabilities not kept are recomputed from lse."""
    q, k, v, cos, sin, block = saved.q, saved.k, saved.v, saved.cos, saved.sin, saved.block
    B, Hkv, T, D = k.shape
    G = q.shape[2] // T
    scale = np.float32(1.0 / math.sqrt(D))
    dy = np.ascontiguousarray(dy, dtype=np.float32)
    dq = np.empty_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for i, (lo, hi) in enumerate(blocks(T, block)):
        bq = hi - lo
        if saved.probs is not None:
            p = saved.probs[i]
        else:
            p = traced_matmul(q[:, :, lo * G:hi * G], k[:, :, :hi].swapaxes(-1, -2), "attention")  # (B, Hkv, bq G, hi)
            _causal_probs_from_lse(p.reshape(-1, hi), lo, bq, G, scale, saved.lse[i].reshape(-1))
        do = np.empty((B, Hkv, bq * G, D), np.float32)
        _block_rows(do, dy, lo, G, False)
        dv[:, :, :hi] += traced_matmul(p.swapaxes(-1, -2), do, "attention")  # (B, Hkv, hi, D)
        dp = traced_matmul(do, v[:, :, :hi].swapaxes(-1, -2), "attention")  # (B, Hkv, bq G, hi)
        _causal_softmax_backward(p.reshape(-1, hi), dp.reshape(-1, hi), lo, bq, G, scale)
        traced_matmul(dp, k[:, :, :hi], "attention", out=dq[:, :, lo * G:hi * G])
        dk[:, :, :hi] += traced_matmul(dp.swapaxes(-1, -2), q[:, :, lo * G:hi * G], "attention")
    dqkv = np.empty((B, T, (n_heads + 2 * Hkv) * D), np.float32)
    _merge_grads_rope(dq, dk, dv, cos, sin, dqkv)
    return dqkv
