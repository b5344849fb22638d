"""Reference implementations of the fused kernels, in plain numpy.

Each is the oracle its faster versions (JIT CPU, torch, Neural Engine) are tested against. Shapes in
comments: B batch, T time, C channels, H heads, D head size, V vocabulary.
"""
from __future__ import annotations

import math

import numpy as np


# -- RMSNorm ------------------------------------------------------------------------------------------
def rmsnorm_forward(x, weight, eps: float):
    """x (N, C), weight (C,) -> y (N, C), rstd (N, 1) where y = x * rstd * weight."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * rstd * weight, rstd


def rmsnorm_backward(dy, x, weight, rstd, need_dx: bool = True, need_dw: bool = True):
    """dy, x (N, C), rstd (N, 1) -> dx (N, C), dw (C,): dx = rstd * (dxhat - xhat * mean(dxhat * xhat))."""
    xhat = x * rstd
    dw = np.sum(dy * xhat, axis=0) if need_dw else None
    dx = None
    if need_dx:
        dxhat = dy * weight
        dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))
    return dx, dw


# -- RoPE (llama2.c convention: rotate interleaved pairs x[2i], x[2i+1]) ---------------------------------
def rope_tables(seq_len: int, head_dim: int, theta: float, dtype=np.float32):
    """cos, sin (T, D/2) for positions 0..T-1, frequency theta^(-2i/D) for pair i."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(seq_len, dtype=np.float64), freqs)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def rope_apply(x, cos, sin, inverse: bool = False):
    """x (..., T, H, D) rotated per position; inverse=True rotates back (the backward of rope)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None, :], (-sin if inverse else sin)[:, None, :]  # (T, 1, D/2) broadcast over heads
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


# -- causal self-attention with grouped-query heads, on the packed qkv ------------------------------------
ATTENTION_BLOCK = 128  # query rows per block: keys past the block's last row are never touched


def _split_heads(qkv, n_heads: int, n_kv_heads: int, cos, sin):
    """qkv (B, T, (H + 2 Hkv) D) -> q (B, Hkv, G, T, D) and k, v (B, Hkv, T, D), rope applied to q, k."""
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    G = n_heads // n_kv_heads
    q = rope_apply(qkv[..., :n_heads * D].reshape(B, T, n_heads, D), cos[:T], sin[:T])
    k = rope_apply(qkv[..., n_heads * D:(n_heads + n_kv_heads) * D].reshape(B, T, n_kv_heads, D), cos[:T], sin[:T])
    v = qkv[..., (n_heads + n_kv_heads) * D:].reshape(B, T, n_kv_heads, D)
    q = np.ascontiguousarray(q.reshape(B, T, n_kv_heads, G, D).transpose(0, 2, 3, 1, 4))  # (B, Hkv, G, T, D)
    k = np.ascontiguousarray(k.transpose(0, 2, 1, 3))  # (B, Hkv, T, D)
    v = np.ascontiguousarray(v.transpose(0, 2, 1, 3))
    return q, k, v


def _blocks(T: int, block: int):
    return [(lo, min(lo + block, T)) for lo in range(0, T, block)]


def attention_forward(qkv, n_heads: int, n_kv_heads: int, cos, sin, block: int = ATTENTION_BLOCK):
    """qkv (B, T, (H + 2 Hkv) D) -> out (B, T, H D) and what the backward needs.

    Query block [lo, hi) attends to keys [0, hi) only: the masked triangle beyond it is skipped. The G
    query heads sharing a kv head are folded into the GEMM rows: (G bq, D) x (D, hi) per kv head.
    """
    B, T, _ = qkv.shape
    q, k, v = _split_heads(qkv, n_heads, n_kv_heads, cos, sin)
    G, D = q.shape[2], q.shape[-1]
    scale = 1.0 / np.sqrt(D)
    out = np.empty_like(q)  # (B, Hkv, G, T, D)
    probs = []
    for lo, hi in _blocks(T, block):
        bq = hi - lo
        qb = q[:, :, :, lo:hi].reshape(B, n_kv_heads, G * bq, D)
        s = np.matmul(qb, k[:, :, :hi].swapaxes(-1, -2))  # (B, Hkv, G bq, hi)
        s *= scale
        s[..., np.tile(np.arange(lo, hi), G)[:, None] < np.arange(hi)[None, :]] = -np.inf  # causal mask
        s -= s.max(axis=-1, keepdims=True)
        p = np.exp(s, out=s)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, :, :, lo:hi] = np.matmul(p, v[:, :, :hi]).reshape(B, n_kv_heads, G, bq, D)
        probs.append(p)
    y = out.transpose(0, 3, 1, 2, 4).reshape(B, T, n_heads * D)  # head h = kv_head * G + g (llama2.c)
    return y, (q, k, v, probs, cos, sin, block)


def attention_backward(dy, saved, n_heads: int, n_kv_heads: int):
    """dy (B, T, H D) -> dqkv (B, T, (H + 2 Hkv) D), packed: the fused QKV backward consumes it whole."""
    q, k, v, probs, cos, sin, block = saved
    B, Hkv, G, T, D = q.shape
    scale = 1.0 / np.sqrt(D)
    do = np.ascontiguousarray(dy.reshape(B, T, Hkv, G, D).transpose(0, 2, 3, 1, 4))  # (B, Hkv, G, T, D)
    dq = np.empty_like(q)
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for (lo, hi), p in zip(_blocks(T, block), probs):
        bq = hi - lo
        do_b = do[:, :, :, lo:hi].reshape(B, Hkv, G * bq, D)
        dv[:, :, :hi] += np.matmul(p.swapaxes(-1, -2), do_b)  # (B, Hkv, hi, D)
        dp = np.matmul(do_b, v[:, :, :hi].swapaxes(-1, -2))  # (B, Hkv, G bq, hi)
        dp -= np.sum(dp * p, axis=-1, keepdims=True)
        ds = np.multiply(p, dp, out=dp)
        ds *= scale
        dq[:, :, :, lo:hi] = np.matmul(ds, k[:, :, :hi]).reshape(B, Hkv, G, bq, D)
        dk[:, :, :hi] += np.matmul(ds.swapaxes(-1, -2), q[:, :, :, lo:hi].reshape(B, Hkv, G * bq, D))
    dqkv = np.empty((B, T, (n_heads + 2 * Hkv) * D), dtype=dy.dtype)
    c, s = cos[:T], sin[:T]
    dqkv[..., :n_heads * D] = rope_apply(dq.transpose(0, 3, 1, 2, 4).reshape(B, T, n_heads, D), c, s,
                                         inverse=True).reshape(B, T, -1)
    dqkv[..., n_heads * D:(n_heads + Hkv) * D] = rope_apply(dk.transpose(0, 2, 1, 3), c, s,
                                                            inverse=True).reshape(B, T, -1)
    dqkv[..., (n_heads + Hkv) * D:] = dv.transpose(0, 2, 1, 3).reshape(B, T, -1)
    return dqkv


# -- SwiGLU on the packed W1/W3 output ------------------------------------------------------------------
def _sigmoid(x):
    """1 / (1 + exp(-x)) with exp only of -|x|: no overflow (and no RuntimeWarning) for very negative x."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0, e) / (1.0 + e)


def swiglu_forward(h13):
    """h13 (N, 2 Hd) = [h1 | h3] -> silu(h1) * h3 (N, Hd)."""
    hd = h13.shape[-1] // 2
    h1, h3 = h13[..., :hd], h13[..., hd:]
    return h1 * _sigmoid(h1) * h3


def swiglu_backward(g, h13):
    """g (N, Hd) -> dh13 (N, 2 Hd) = [dh1 | dh3], packed for the fused W1/W3 backward GEMM."""
    hd = h13.shape[-1] // 2
    h1, h3 = h13[..., :hd], h13[..., hd:]
    sig = _sigmoid(h1)
    dh13 = np.empty_like(h13)
    dh13[..., :hd] = g * h3 * sig * (1.0 + h1 * (1.0 - sig))
    dh13[..., hd:] = g * h1 * sig
    return dh13


# -- embedding ------------------------------------------------------------------------------------------
def embedding_backward(g, tokens, vocab_size: int):
    """g (N, C), tokens (N,) -> dW (V, C): scatter-add, repeated tokens accumulate."""
    dw = np.zeros((vocab_size, g.shape[-1]), dtype=g.dtype)
    np.add.at(dw, tokens, g)
    return dw


# -- classifier + cross-entropy, chunked ----------------------------------------------------------------
def classifier_cross_entropy(h, weight, targets, chunk: int = 256, need_dh: bool = True, need_dw: bool = True):
    """h (N, C), weight (V, C), targets (N,) -> (mean loss, dh (N, C), dW (V, C)).

    Rows go through in chunks: logits (chunk, V) live one chunk at a time, and their gradient
    (softmax - onehot) / N is folded into dh and dW right away, so neither the full (N, V) logits nor
    the probabilities ever exist. Grads are for a loss grad of 1; the op scales them by the real one.
    """
    N = h.shape[0]
    total = 0.0
    dh = np.empty_like(h) if need_dh else None
    dw = np.zeros_like(weight) if need_dw else None
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        logits = np.matmul(h[lo:hi], weight.T)  # (n, V)
        logits -= logits.max(axis=-1, keepdims=True)
        rows = np.arange(hi - lo)
        picked = logits[rows, targets[lo:hi]]
        p = np.exp(logits, out=logits)
        z = p.sum(axis=-1, keepdims=True)
        total += float(np.sum(np.log(z[:, 0]) - picked, dtype=np.float64))
        if need_dh or need_dw:
            p /= z * N
            p[rows, targets[lo:hi]] -= 1.0 / N  # p is now dlogits for this chunk
            if need_dh:
                np.matmul(p, weight, out=dh[lo:hi])
            if need_dw:
                dw += np.matmul(p.T, h[lo:hi])
    return total / N, dh, dw


# -- AdamW ----------------------------------------------------------------------------------------------
def adamw_update(p, g, m, v, lr, beta1, beta2, eps, wd, step, tmp=None) -> None:
    """One AdamW step on float32 arrays, in place on p, m, v (torch.optim.AdamW, amsgrad off).

    p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).   `step` is t, counted from 1.
    `tmp` is a float32 scratch array of p's shape (allocated when None).

    >>> p, g = np.float32([1.0]), np.float32([2.0])
    >>> m, v = np.zeros(1, np.float32), np.zeros(1, np.float32)
    >>> adamw_update(p, g, m, v, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.0, step=1)
    >>> print(p, m, v)
    [0.9] [0.2] [0.2]
    """
    if tmp is None:
        tmp = np.empty_like(p)
    if wd:
        p *= 1.0 - lr * wd
    m *= beta1
    np.multiply(g, 1.0 - beta1, out=tmp)
    m += tmp
    v *= beta2
    np.multiply(g, g, out=tmp)
    tmp *= 1.0 - beta2
    v += tmp
    step_size = lr / (1.0 - beta1 ** step)
    np.sqrt(v, out=tmp)
    tmp /= math.sqrt(1.0 - beta2 ** step)
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp


# -- gradient sums ------------------------------------------------------------------------------------------
def accumulate(out, x) -> None:
    """out += x in place (a data-parallel helper's grads into the model's).

    >>> out = np.ones(2, np.float32); accumulate(out, np.float32([1.0, 2.0])); out.tolist()
    [2.0, 3.0]
    """
    out += x
