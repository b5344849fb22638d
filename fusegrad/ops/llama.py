"""The Llama ops, each forward beside its backward, computed by the backend's fused kernels.

Shapes: B batch, T time, C model dim, H query heads, Hkv kv heads, D head dim, Hd FFN hidden, V vocab.

>>> import numpy as np, fusegrad as fg
>>> x = fg.tensor(np.ones((2, 4)), dtype="float32", requires_grad=True)
>>> w = fg.tensor(np.full(4, 2.0), dtype="float32", requires_grad=True)
>>> fg.rms_norm(x, w, eps=0.0).tolist()[0]
[2.0, 2.0, 2.0, 2.0]
"""
from __future__ import annotations

import numpy as np

from fusegrad.core.errors import GraphError, ShapeError
from fusegrad.core.tensor import RowsGrad, Tensor, is_grad_enabled, is_graph_retained
from fusegrad.core.trace import span
from fusegrad.ops._util import check_float, result


def _int_ids(op: str, ids, vocab_size: int):
    ids = ids.numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ShapeError(f"{op}: token ids must be integers, got dtype {ids.dtype}")
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"{op}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def embedding(weight: Tensor, ids) -> Tensor:
    """weight (V, C), ids (...) int -> (..., C); backward scatter-adds rows (repeats accumulate)."""
    check_float("embedding", ("weight", weight))
    if weight.ndim != 2:
        raise ShapeError(f"embedding: weight must be (V, C), got shape {weight.shape}")
    V, C = weight.shape
    be = weight.backend
    ids = be.asarray(_int_ids("embedding", ids, V))  # on the weight's device (numpy: the same array)
    out = be.embedding_forward(weight.data, ids)

    def backward(g):
        g = g.reshape(-1, C)  # (N, C)
        if g.dtype == weight.data.dtype:  # scattered where it lands: into a tied classifier's dW, or made dense
            return (RowsGrad(be, ids.reshape(-1), g, (V, C)),)
        with span("embedding_backward", "elementwise"):  # bf16 activation grads into a float32 weight
            return (be.embedding_backward(g, ids.reshape(-1), V),)
    return result(out, "embedding", (weight,), backward)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x (..., C) * rsqrt(mean(x^2) + eps) * weight (C,)."""
    check_float("rms_norm", ("x", x), ("weight", weight))
    x_shape, w_shape = x.data.shape, weight.data.shape  # read once: 61 of these a generated token
    if len(w_shape) != 1 or not x_shape or x_shape[-1] != w_shape[0]:
        raise ShapeError(f"rms_norm: weight must be ({x_shape[-1] if x_shape else '?'},) to match x "
                         f"{tuple(x_shape)}, got {tuple(w_shape)}")
    be, C = x.backend, x_shape[-1]
    x2 = x.data.reshape(-1, C)
    with span("rms_norm", "elementwise"):
        y, rstd = be.rmsnorm_forward(x2, weight.data, eps)

    def backward(g):
        with span("rms_norm_backward", "elementwise"):
            dx, dw = be.rmsnorm_backward(g.reshape(-1, C), x2, weight.data, rstd, x.requires_grad,
                                         weight.requires_grad)
        return (dx.reshape(x_shape) if dx is not None else None, dw)
    return result(y.reshape(x_shape), "rms_norm", (x, weight), backward)


def _check_attention(op: str, qkv: Tensor, n_heads: int, n_kv_heads: int, rope_cos, positions: int):
    check_float(op, ("qkv", qkv))
    if qkv.ndim != 3:
        raise ShapeError(f"{op}: qkv must be (B, T, (H + 2 Hkv) D), got shape {qkv.shape}")
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ShapeError(f"{op}: n_heads {n_heads} must be a positive multiple of n_kv_heads {n_kv_heads}")
    width = qkv.shape[2]
    D, rem = divmod(width, n_heads + 2 * n_kv_heads)
    if rem or D % 2:
        raise ShapeError(f"{op}: qkv width {width} is not (n_heads + 2 n_kv_heads) x even head_dim "
                         f"for n_heads {n_heads}, n_kv_heads {n_kv_heads}")
    if rope_cos.shape[0] < positions or rope_cos.shape[1] != D // 2:
        raise ShapeError(f"{op}: rope tables are {rope_cos.shape}, need at least ({positions}, {D // 2})")


def causal_attention(qkv: Tensor, n_heads: int, n_kv_heads: int, rope_cos, rope_sin) -> Tensor:
    """Causal grouped-query self-attention with RoPE, on the packed output of the fused QKV GEMM.

    qkv (B, T, (H + 2 Hkv) D) -> (B, T, H D). The backward returns the packed grad (B, T, (H + 2 Hkv) D),
    i.e. concat(dq, dk, dv), which the fused QKV projection turns into dx with ONE GEMM.
    rope_cos, rope_sin: (T_max, D/2) tables (`fusegrad.backends.base.rope_tables`).
    """
    _check_attention("causal_attention", qkv, n_heads, n_kv_heads, rope_cos, qkv.shape[1])
    B, T, _ = qkv.shape
    be = qkv.backend
    with span("attention", "attention", B=B, T=T, H=n_heads):
        y, saved = be.attention_forward(qkv.data, n_heads, n_kv_heads, rope_cos, rope_sin)

    def backward(g):
        with span("attention_backward", "attention", B=B, T=T, H=n_heads):
            return (be.attention_backward(g, saved, n_heads, n_kv_heads),)
    return result(y, "causal_attention", (qkv,), backward)


def cached_attention(qkv: Tensor, k_cache, v_cache, start: int, n_heads: int, n_kv_heads: int, rope_cos,
                     rope_sin) -> Tensor:
    """`causal_attention` for tokens at positions start..start+T-1 whose earlier keys and values are in
    k_cache, v_cache (B, Hkv, S_max, D) arrays of qkv's backend; this block's go in too. For generation:
    it has no backward (raises GraphError when a grad would be needed)."""
    _check_attention("cached_attention", qkv, n_heads, n_kv_heads, rope_cos, start + qkv.shape[1])
    if is_grad_enabled() and qkv.requires_grad:
        raise GraphError("cached_attention has no backward: run it under fusegrad.no_grad()")
    if start + qkv.shape[1] > k_cache.shape[2] or qkv.shape[0] != k_cache.shape[0]:
        raise ShapeError(f"cached_attention: {start + qkv.shape[1]} positions of batch {qkv.shape[0]} do not fit "
                         f"the cache {tuple(k_cache.shape)}")
    be = qkv.backend
    with span("attention_cached", "attention", B=qkv.shape[0], T=qkv.shape[1], H=n_heads):
        y = be.attention_cached(qkv.data, k_cache, v_cache, start, n_heads, n_kv_heads, rope_cos, rope_sin)
    return Tensor(y, backend=be)


def swiglu(h13: Tensor) -> Tensor:
    """silu(h1) * h3 on the packed output of the fused W1/W3 GEMM: h13 (..., 2 Hd) -> (..., Hd).

    The backward returns concat(dh1, dh3), so the fused projection's dx is ONE GEMM: [dh1, dh3] @ [W1; W3].
    """
    check_float("swiglu", ("h13", h13))
    if not h13.data.shape or h13.data.shape[-1] % 2:
        raise ShapeError(f"swiglu: last dim must be even (h1 and h3 packed), got shape {h13.shape}")
    be = h13.backend
    with span("swiglu", "elementwise"):
        out = be.swiglu_forward(h13.data)

    def backward(g):
        with span("swiglu_backward", "elementwise"):
            return (be.swiglu_backward(g, h13.data),)
    return result(out, "swiglu", (h13,), backward)


LOGITS_CHUNK_BYTES = 128 << 20  # float32 logits per classifier chunk: 1024 rows at V = 32000


def logits_chunk_rows(vocab_size: int) -> int:
    """Rows per classifier chunk: a fixed logits budget, so memory does not grow with batch x seq; fewer,
    larger chunks re-read W and dW less (docs/performance.md).

    >>> logits_chunk_rows(32000), logits_chunk_rows(256), logits_chunk_rows(10 ** 7)
    (1024, 131072, 16)
    """
    rows = LOGITS_CHUNK_BYTES // (4 * vocab_size)
    return rows - rows % 64 if rows >= 64 else max(16, rows)  # whole 64-row panels for the GEMMs


def classifier_cross_entropy(h: Tensor, weight: Tensor, targets, chunk: int | None = None) -> Tensor:
    """Mean cross-entropy of logits h W^T against targets, never materialising the (N, V) logits.

    h (N, C), weight (V, C), targets (N,) int -> scalar. The grads of h and W are formed chunk by chunk
    (`chunk` rows, default `logits_chunk_rows(V)`) during the forward (only when something needs them)
    and scaled by the loss grad in the backward.
    """
    check_float("classifier_cross_entropy", ("h", h), ("weight", weight))
    if h.ndim != 2 or weight.ndim != 2 or h.shape[1] != weight.shape[1]:
        raise ShapeError(f"classifier_cross_entropy: need h (N, C) and weight (V, C), got h {h.shape}, "
                         f"weight {weight.shape}")
    t = _int_ids("classifier_cross_entropy", targets, weight.shape[0])
    if t.shape != (h.shape[0],):
        raise ShapeError(f"classifier_cross_entropy: targets must have shape ({h.shape[0]},), got {t.shape}")
    need_dh = is_grad_enabled() and h.requires_grad
    need_dw = is_grad_enabled() and weight.requires_grad
    be = h.backend
    chunk = chunk or logits_chunk_rows(weight.shape[0])
    with span("classifier_cross_entropy", "classifier", N=h.shape[0], V=weight.shape[0]):
        loss, dh, dw = be.classifier_cross_entropy(h.data, weight.data, t, chunk, need_dh, need_dw)

    def backward(g):
        # scale the arrays the forward made in place (no (V, C) temporary, no host read of g), unless the
        # graph is retained: the receiver may change them before this node runs again
        scale = g.reshape(())
        if is_graph_retained() or g.dtype != weight.dtype:
            return tuple(None if a is None else a * scale for a in (dh, dw))
        for a in (dh, dw):
            if a is not None:
                a *= scale
        return dh, dw
    # the loss in the weight's dtype: float32 when h holds bf16 activations (mixed precision)
    return result(be.asarray(loss, weight.dtype), "classifier_cross_entropy", (h, weight), backward)
