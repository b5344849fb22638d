"""`JitBackend`: the numpy backend with numba kernels for float32, parallel over the cores, compiled once
and cached on disk. "numpy" names it when numba imports (FUSEGRAD_JIT=0: the plain `NumpyBackend`).

Each override takes the compiled path only for float32 arrays it was built for and hands anything else
(float64 gradient checks, odd layouts) to the reference in `Backend`, so no other dtype triggers a
compile. GEMMs stay in numpy BLAS; these kernels do what sits between them, each in one or two passes
over memory, writing in place where the caller allows. Attention lives in `cpu_jit_attention`, NF4
dequantization in `cpu_jit_nf4`, ggml's blocks in `cpu_jit_ggml`.
Shapes: N rows (tokens), C channels, Hd FFN hidden, V vocabulary.

>>> from fusegrad.backends.numpy_backend import NumpyBackend
>>> x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
>>> y, rstd = JitBackend().rmsnorm_forward(x, np.ones(8, np.float32), 1e-5)
>>> bool(np.allclose(y, NumpyBackend().rmsnorm_forward(x, np.ones(8, np.float32), 1e-5)[0], atol=1e-6))
True
"""
from __future__ import annotations

import math
import time

import numba
import numpy as np
from numba import prange

from fusegrad.backends import cpu_jit_attention, cpu_jit_decode, cpu_jit_ggml, cpu_jit_nf4, openblas
from fusegrad.backends.base import ATTENTION_BLOCK, rope_tables
from fusegrad.backends.jit_common import (SERIAL_MAX_WORK, exp_shifted, fast_exp, is_f32, jit, row_chunks, row_max,
                                          traced_matmul)
from fusegrad.core.trace import span
from fusegrad.backends.numpy_backend import NumpyBackend


# -- RMSNorm ------------------------------------------------------------------------------------------
@jit
def _rmsnorm_forward(x, w, eps, y, rstd):  # x, y (N, C); w (C,); rstd (N, 1)
    N, C = x.shape
    for i in prange(N):
        ss = 0.0
        for j in range(C):
            ss += x[i, j] * x[i, j]
        r = np.float32(1.0 / math.sqrt(ss / C + eps))
        rstd[i, 0] = r
        for j in range(C):
            y[i, j] = x[i, j] * r * w[j]


@jit
def _rmsnorm_backward(dy, x, w, rstd, dx, dw_parts, need_dx, need_dw):
    # rows split into len(dw_parts) ranges; range p sums its dw into dw_parts[p] (C,) in float64, no races
    N, C = x.shape
    P = dw_parts.shape[0]
    for p in prange(P):
        for i in range(p * N // P, (p + 1) * N // P):
            r = rstd[i, 0]
            if need_dw:
                for j in range(C):
                    dw_parts[p, j] += dy[i, j] * x[i, j] * r
            if need_dx:
                dot = 0.0  # mean(dxhat * xhat)
                for j in range(C):
                    dot += dy[i, j] * w[j] * x[i, j] * r
                m = np.float32(dot / C)
                for j in range(C):
                    dx[i, j] = r * (dy[i, j] * w[j] - x[i, j] * r * m)


# -- SwiGLU on the packed [h1 | h3] -------------------------------------------------------------------
@jit
def _swiglu_forward(h13, out):  # h13 (N, 2 Hd) -> out (N, Hd)
    N, Hd = out.shape
    for i in prange(N):
        for j in range(Hd):
            a = h13[i, j]
            out[i, j] = a / (np.float32(1.0) + fast_exp(-a)) * h13[i, Hd + j]


@jit
def _swiglu_backward(g, h13, dh13):  # g (N, Hd) -> dh13 (N, 2 Hd) = [dh1 | dh3]
    N, Hd = g.shape
    one = np.float32(1.0)
    for i in prange(N):
        for j in range(Hd):
            a, b, gij = h13[i, j], h13[i, Hd + j], g[i, j]
            sig = one / (one + fast_exp(-a))
            dh13[i, j] = gij * b * sig * (one + a * (one - sig))
            dh13[i, Hd + j] = gij * a * sig


# -- embedding backward ---------------------------------------------------------------------------------
@jit
def _scatter_add_rows(dw, rows, x, scale, n_parts):
    # dw[rows[i]] += scale * x[i] for every i. Columns split into n_parts ranges: each thread scatters its
    # columns for every row, so repeated rows never race; row order is kept, so the sums match a serial
    # scatter-add (the embedding backward, and the onehot's part of the classifier's dW)
    N, C = x.shape
    for p in prange(n_parts):
        lo, hi = p * C // n_parts, (p + 1) * C // n_parts
        for i in range(N):
            t = rows[i]
            for j in range(lo, hi):
                dw[t, j] += x[i, j] * scale


# -- classifier cross-entropy: per-chunk softmax and loss; the GEMMs stay in BLAS -------------------------
# dlogits = diag(s) E - onehot / N with E = exp(logits - row max), s = 1 / (N sum E). Only E is formed, in
# place of the logits (n, V): s and the onehot are applied to the (n, C) sides of the two GEMMs, so the
# (n, V) buffer is read once more by the softmax instead of three times (max, exp, scale).
@jit
def _exp_rows(logits, targets, losses, inv_sum):
    # logits (n, V) -> E in place; losses (n,) = logsumexp - target logit; inv_sum (n,) = 1 / sum E.
    # A NaN logit makes the row's loss NaN (through the max or the sum), so the trainer sees it
    n, V = logits.shape
    for i in prange(n):
        row = logits[i]
        mx = row_max(row, V)
        picked = row[targets[i]] - mx
        z = np.float32(0.0)
        if math.isfinite(mx):  # every row[j] - mx <= 0 and not NaN
            for j in range(V):
                e = exp_shifted(row[j] - mx)
                row[j] = e
                z += e
        else:
            for j in range(V):
                e = fast_exp(row[j] - mx)
                row[j] = e
                z += e
        losses[i] = math.log(z) - picked
        inv_sum[i] = np.float32(1.0) / z


@jit
def _scale_minus_rows(x, s, w, targets, inv_n):
    # x (n, C) = s_i x_i - w[t_i] / N: dh from E W
    n, C = x.shape
    for i in prange(n):
        si, wt = s[i], w[targets[i]]
        for j in range(C):
            x[i, j] = x[i, j] * si - wt[j] * inv_n


@jit
def _scale_rows(h, s, out):  # out (n, C) = s_i h_i
    n, C = h.shape
    for i in prange(n):
        si = s[i]
        for j in range(C):
            out[i, j] = h[i, j] * si


def accumulate_gemm(c, a, b, trans_a: bool = False, scratch=None):
    """c (M, N) += op(a) @ b (M, K) x (K, N) for a C-contiguous c, as a classifier GEMM; returns the scratch it
    used. In place by sgemm with beta = 1 when numpy's BLAS is reachable; else the product in `scratch` (made on
    first use) added in a second pass."""
    run = openblas.sgemm_accumulate(c, a, b, trans_a=trans_a)
    if run is not None:
        with span("gemm", "matmul", m=c.shape[0], k=b.shape[0], n=c.shape[1], batch=1, backend="numpy",
                  op="classifier"):
            run()
        return scratch
    scratch = np.empty_like(c) if scratch is None else scratch
    traced_matmul(a.T if trans_a else a, b, "classifier", out=scratch)
    _add_into(c.reshape(-1), scratch.reshape(-1))
    return scratch


# -- classifier cross-entropy with a frozen weight (LoRA, evaluation): vocabulary blocks -------------------
# No dW, so no (n, V) buffer either: the logits come VOCAB_BLOCK columns at a time, are exponentiated while in
# cache, and their E W is added into dh right away. The shift is each row's max over the first block, moved
# only when a later logit passes it by 60 (exps stay below e^60, far from float32's range).
VOCAB_BLOCK = 1024  # logits columns a block (docs/performance.md, "Issue 16, round 10")


@jit
def _exp_block(logits, col0, targets, shift, z, picked, u):
    # logits (n, Vb) of vocabulary columns [col0, col0 + Vb) -> exp(logits - shift) in place. Per row: shift (n,)
    # (-inf before the first block), z (n,) += the exps' sum, picked (n,) = the target's logit if in this block,
    # u (n, C) the E W so far, scaled with z by exp(old - new) when the shift moves
    n, Vb = logits.shape
    for i in prange(n):
        row = logits[i]
        mx = row_max(row, Vb)
        t = targets[i] - col0
        if 0 <= t < Vb:
            picked[i] = row[t]
        m = shift[i]
        if not mx <= m + np.float32(60.0):  # the first finite block, a logit far above the shift, or a NaN
            if math.isfinite(m):
                c = fast_exp(m - mx)
                z[i] *= c
                for k in range(u.shape[1]):
                    u[i, k] *= c
            shift[i] = m = mx
        s = np.float32(0.0)
        if math.isfinite(m):  # every exponent <= 60 and none NaN
            for j in range(Vb):
                e = exp_shifted(row[j] - m)
                row[j] = e
                s += e
        elif m == -np.inf:  # every logit so far is -inf: nothing to add
            for j in range(Vb):
                row[j] = 0.0
        else:  # a NaN or +inf logit: the row's loss becomes NaN, as in _exp_rows
            for j in range(Vb):
                e = fast_exp(row[j] - m)
                row[j] = e
                s += e
        z[i] += s


def frozen_classifier_cross_entropy(h, weight, targets, chunk: int, need_dh: bool):
    """float32 h (N, C), weight (V, C), int64 targets (N,) -> (mean loss, dh (N, C) or None), no dW."""
    (N, C), V = h.shape, weight.shape[0]
    buf = np.empty((chunk, min(VOCAB_BLOCK, V)), np.float32)
    dh = np.zeros_like(h) if need_dh else None
    no_dh = np.empty((chunk, 0), np.float32)
    inv_n = np.float32(1.0 / N)
    total = 0.0
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        n = hi - lo
        shift, z, picked = np.full(n, -np.inf, np.float32), np.zeros(n, np.float32), np.empty(n, np.float32)
        u = dh[lo:hi] if need_dh else no_dh[:n]  # (n, C): E W, unnormalised
        for v0 in range(0, V, VOCAB_BLOCK):
            w_block = weight[v0:v0 + VOCAB_BLOCK]
            e = buf[:n, :w_block.shape[0]]
            traced_matmul(h[lo:hi], w_block.T, "classifier", out=e)  # (n, Vb) logits, then exp(logits - shift)
            with span("classifier_softmax", "classifier", rows=n, V=w_block.shape[0]):
                _exp_block(e, v0, targets[lo:hi], shift, z, picked, u)
            if need_dh:
                accumulate_gemm(u, e, w_block)
        total += float(np.sum(shift.astype(np.float64) + np.log(z.astype(np.float64)) - picked))
        if need_dh:
            _scale_minus_rows(u, inv_n / z, weight, targets[lo:hi], inv_n)  # dh = E W / (N z) - W[t] / N
    return total / N, dh


# -- AdamW ------------------------------------------------------------------------------------------------
@jit
def _adamw(p, g, m, v, lr, beta1, beta2, eps, wd, step_size, bias2_sqrt, grad_scale):
    decay, gs = np.float32(1.0 - lr * wd), np.float32(grad_scale)
    b1, b2 = np.float32(beta1), np.float32(beta2)
    c1, c2 = np.float32(1.0 - beta1), np.float32(1.0 - beta2)
    ss, bs, e = np.float32(step_size), np.float32(bias2_sqrt), np.float32(eps)
    for i in prange(p.size):
        gi = gs * g[i]
        mi = b1 * m[i] + c1 * gi
        vi = b2 * v[i] + c2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - ss * (mi / (math.sqrt(vi) / bs + e))


@jit
def _add_into(out, x):  # out += x, flat, both cores (numpy's add runs on one)
    for i in prange(out.size):
        out[i] += x[i]


class JitBackend(NumpyBackend):
    """NumpyBackend whose fused kernels run compiled for float32 (numba); anything else: the reference."""

    def rmsnorm_forward(self, x, weight, eps: float):
        if not is_f32(x, weight) or x.ndim != 2:
            return super().rmsnorm_forward(x, weight, eps)
        x, weight = np.ascontiguousarray(x), np.ascontiguousarray(weight)
        y = np.empty_like(x)
        rstd = np.empty((x.shape[0], 1), np.float32)
        _rmsnorm_forward.sized(x.size)(x, weight, float(eps), y, rstd)
        return y, rstd

    def rmsnorm_backward(self, dy, x, weight, rstd, need_dx: bool = True, need_dw: bool = True):
        if not is_f32(dy, x, weight, rstd) or x.ndim != 2:
            return super().rmsnorm_backward(dy, x, weight, rstd, need_dx, need_dw)
        dy, x, rstd = np.ascontiguousarray(dy), np.ascontiguousarray(x), np.ascontiguousarray(rstd)
        N, C = x.shape
        dx = np.empty_like(x) if need_dx else np.empty((0, C), np.float32)
        parts = np.zeros((row_chunks(N), C if need_dw else 0), np.float64)
        _rmsnorm_backward(dy, x, np.ascontiguousarray(weight), rstd, dx, parts, bool(need_dx), bool(need_dw))
        return (dx if need_dx else None), (parts.sum(axis=0).astype(np.float32) if need_dw else None)

    def attention_forward(self, qkv, n_heads: int, n_kv_heads: int, cos, sin, block: int | None = None):
        if not is_f32(qkv, cos, sin):
            return super().attention_forward(qkv, n_heads, n_kv_heads, cos, sin, block or ATTENTION_BLOCK)
        return cpu_jit_attention.attention_forward(qkv, n_heads, n_kv_heads, cos, sin, block)

    def attention_backward(self, dy, saved, n_heads: int, n_kv_heads: int):
        if not isinstance(saved, cpu_jit_attention.JitAttentionSaved):  # the forward ran the reference
            return super().attention_backward(dy, saved, n_heads, n_kv_heads)
        return cpu_jit_attention.attention_backward(dy, saved, n_heads, n_kv_heads)

    def attention_cached(self, qkv, k_cache, v_cache, start: int, n_heads: int, n_kv_heads: int, cos, sin):
        if not (is_f32(qkv, k_cache, v_cache, cos, sin) and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
            return super().attention_cached(qkv, k_cache, v_cache, start, n_heads, n_kv_heads, cos, sin)
        return cpu_jit_decode.attention_cached(qkv, k_cache, v_cache, start, n_heads, n_kv_heads, cos, sin)

    def swiglu_forward(self, h13):
        if not is_f32(h13):
            return super().swiglu_forward(h13)
        h2 = np.ascontiguousarray(h13).reshape(-1, h13.shape[-1])
        out = np.empty((h2.shape[0], h2.shape[1] // 2), np.float32)
        _swiglu_forward.sized(out.size)(h2, out)
        return out.reshape(h13.shape[:-1] + (out.shape[1],))

    def swiglu_backward(self, g, h13):
        if not is_f32(g, h13):
            return super().swiglu_backward(g, h13)
        h2 = np.ascontiguousarray(h13).reshape(-1, h13.shape[-1])
        dh13 = np.empty_like(h2)
        _swiglu_backward(np.ascontiguousarray(g).reshape(h2.shape[0], -1), h2, dh13)
        return dh13.reshape(h13.shape)

    def embedding_backward_into(self, dw, g, tokens) -> None:
        if not (is_f32(g, dw) and g.ndim == 2 and dw.ndim == 2 and dw.flags.c_contiguous):
            return super().embedding_backward_into(dw, g, tokens)
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        _scatter_add_rows(dw, tokens, np.ascontiguousarray(g), np.float32(1.0), row_chunks(g.shape[1]))

    def classifier_cross_entropy(self, h, weight, targets, chunk: int = 256, need_dh: bool = True,
                                     need_dw: bool = True):
        """Like the reference. With dW: one logits buffer (chunk, V) reused by every chunk, dW accumulated in
        place; without (a frozen weight): `frozen_classifier_cross_entropy`, in vocabulary blocks."""
        if not is_f32(h, weight) or h.ndim != 2:
            return super().classifier_cross_entropy(h, weight, targets, chunk, need_dh, need_dw)
        h, weight = np.ascontiguousarray(h), np.ascontiguousarray(weight)
        targets = np.ascontiguousarray(targets, dtype=np.int64)
        (N, C), V = h.shape, weight.shape[0]
        chunk = max(1, min(chunk, N))
        if not need_dw:
            return (*frozen_classifier_cross_entropy(h, weight, targets, chunk, need_dh), None)
        buf = np.empty((chunk, V), np.float32)
        losses, inv_sum = np.empty(chunk, np.float64), np.empty(chunk, np.float32)
        hs = np.empty((chunk, C), np.float32)
        dh = np.empty_like(h) if need_dh else None
        dw = np.empty_like(weight)
        inv_n = np.float32(1.0 / N)
        scratch, total = None, 0.0
        for lo in range(0, N, chunk):
            hi = min(lo + chunk, N)
            n = hi - lo
            e = buf[:n]
            traced_matmul(h[lo:hi], weight.T, "classifier", out=e)  # (n, V) logits, then E
            with span("classifier_softmax", "classifier", rows=n, V=V):
                _exp_rows(e, targets[lo:hi], losses[:n], inv_sum[:n])
            total += float(losses[:n].sum())
            s = inv_sum[:n] * inv_n  # (n,)
            if need_dh:
                traced_matmul(e, weight, "classifier", out=dh[lo:hi])  # (n, C) = E W, then diag(s) E W - W[t] / N
                _scale_minus_rows(dh[lo:hi], s, weight, targets[lo:hi], inv_n)
            _scale_rows(h[lo:hi], s, hs[:n])  # dW += E^T diag(s) h
            if lo == 0:
                traced_matmul(e.T, hs[:n], "classifier", out=dw)  # the first chunk writes dW: no zero fill
            else:
                scratch = accumulate_gemm(dw, e, hs[:n], True, scratch)
        _scatter_add_rows(dw, targets, h, -inv_n, row_chunks(C))  # dW -= onehot^T h / N
        return total / N, dh, dw

    def dequantize_nf4(self, q, code, out=None):
        """Straight from the packed codes into `out` (a new array when None), q/k rows permuted on the way."""
        if out is None:
            out = np.empty(q.shape, np.float32)
        elif not (is_f32(out) and out.flags.c_contiguous):
            return super().dequantize_nf4(q, code, out)
        return cpu_jit_nf4.dequantize_nf4(q, code, out)

    def dequantize_ggml(self, q, out=None):
        """Straight from the file's blocks into `out` (a new array when None), rows permuted on the way."""
        if out is None:
            out = np.empty(q.shape, np.float32)
        elif not (is_f32(out) and out.flags.c_contiguous):
            return super().dequantize_ggml(q, out)
        return cpu_jit_ggml.dequantize_ggml(q, out)

    def adamw_update(self, p, g, m, v, lr, beta1, beta2, eps, wd, step, tmp=None, grad_scale=1.0) -> None:
        """The reference's math in one parallel pass, in place on p, m, v (tmp is unused)."""
        if not all(is_f32(a) and a.flags.c_contiguous and a.shape == p.shape for a in (p, g, m, v)):
            return super().adamw_update(p, g, m, v, lr, beta1, beta2, eps, wd, step, tmp, grad_scale)
        _adamw.sized(p.size)(  # a norm's or an adapter's few weights: serially
            p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), float(lr), float(beta1), float(beta2),
            float(eps), float(wd), lr / (1.0 - beta1 ** step), math.sqrt(1.0 - beta2 ** step), float(grad_scale))

    def accumulate(self, out, x) -> None:
        """out += x on every core for C-contiguous float32 arrays of one shape."""
        if not (is_f32(out, x) and out.shape == x.shape and out.flags.c_contiguous and x.flags.c_contiguous):
            return super().accumulate(out, x)
        _add_into.sized(out.size)(out.reshape(-1), x.reshape(-1))

    def prewarm_kernels(self) -> float:
        """Compile (first run) or load from the disk cache (later runs) every kernel, both twins (a worker's
        slice runs the serial ones); seconds taken.

        >>> JitBackend().prewarm_kernels() >= 0.0
        True
        """
        t0 = time.perf_counter()
        self._call_every_kernel()
        if numba.get_num_threads() > 1:
            threads = numba.get_num_threads()
            numba.set_num_threads(1)  # this thread's count only
            try:
                self._call_every_kernel()
            finally:
                numba.set_num_threads(threads)
        return time.perf_counter() - t0

    def _call_every_kernel(self) -> None:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, 8)).astype(np.float32)
        w = np.ones(8, np.float32)
        y, rstd = self.rmsnorm_forward(x, w, 1e-5)
        self.rmsnorm_backward(y, x, w, rstd)
        self.swiglu_backward(x[:, :4], x)
        self.swiglu_forward(x)
        self.embedding_backward(x, np.array([0, 1, 1, 2]), 3)
        self.classifier_cross_entropy(x, x, np.array([0, 1, 2, 3]), chunk=2)
        qkv = rng.standard_normal((1, 4, 3 * 8)).astype(np.float32)  # 2 heads of size 4
        cos, sin = rope_tables(4, 4, 10000.0)
        out, saved = self.attention_forward(qkv, 2, 2, cos, sin, block=2)
        self.attention_backward(out, saved, 2, 2)
        big = np.ones((SERIAL_MAX_WORK // 8, 16), np.float32)  # large enough for the parallel twins
        self.rmsnorm_forward(big, big[0], 1e-5)
        self.swiglu_forward(big)
        k_cache = np.zeros((1, 2, 4, 4), np.float32)
        self.attention_cached(qkv[:, :2], k_cache, np.zeros_like(k_cache), 0, 2, 2, cos, sin)
        for g in (x, big):  # the serial twins, then (more threads) the parallel ones
            p = g.copy()
            self.adamw_update(p, g, np.zeros_like(g), np.zeros_like(g), 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
            self.accumulate(p, g)
        cpu_jit_nf4.prewarm()
        cpu_jit_ggml.prewarm()
