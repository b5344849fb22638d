"""Sampling with a KV cache: each new token costs one row of every GEMM, not a pass over the prefix.

>>> import numpy as np
>>> from fusegrad.models import Llama
>>> from fusegrad.models.generate import generate
>>> model = Llama.from_preset("tiny", seed=0)
>>> out = generate(model, [1, 5, 7], max_new_tokens=4, temperature=0.0)
>>> len(out)
7
"""
from __future__ import annotations

import numpy as np

from fusegrad.backends.reference import rmsnorm_forward, rope_apply, swiglu_forward
from fusegrad.core.errors import ShapeError
from fusegrad.core.trace import span


class KVCache:
    """Rotated keys and values per layer: (L, Hkv, T_max, D) each, filled up to `length`."""

    def __init__(self, config, dtype=np.float32):
        c = config
        self.k = np.zeros((c.n_layers, c.n_kv_heads, c.max_seq_len, c.head_dim), dtype)
        self.v = np.zeros_like(self.k)
        self.length = 0


def _weights(model) -> dict:
    return {n: t.data for n, t in model.params.items()}


def forward_cached(model, tokens, cache: KVCache) -> np.ndarray:
    """Run new tokens (T,) at positions cache.length.. -> logits of the last one (V,); grows the cache."""
    c, w = model.config, _weights(model)
    tokens = np.asarray(tokens)
    T, start = len(tokens), cache.length
    if start + T > c.max_seq_len:
        raise ShapeError(f"generate: {start + T} tokens exceed max_seq_len {c.max_seq_len}")
    D, H, Hkv = c.head_dim, c.n_heads, c.n_kv_heads
    G = H // Hkv
    gemm = model.params["norm"].backend.gemm
    cos, sin = model.rope_cos[start:start + T], model.rope_sin[start:start + T]
    x = w["tok_embeddings"][tokens]  # (T, C)
    positions = np.arange(start, start + T)
    for i in range(c.n_layers):
        h, _ = rmsnorm_forward(x, w[f"layers.{i}.attention_norm"], c.norm_eps)
        qkv = gemm(h, w[f"layers.{i}.wqkv"], trans_b=True)  # (T, C + 2 KV)
        q = rope_apply(qkv[:, :c.dim].reshape(T, H, D), cos, sin)
        k = rope_apply(qkv[:, c.dim:c.dim + c.kv_dim].reshape(T, Hkv, D), cos, sin)
        cache.k[i, :, start:start + T] = k.transpose(1, 0, 2)
        cache.v[i, :, start:start + T] = qkv[:, c.dim + c.kv_dim:].reshape(T, Hkv, D).transpose(1, 0, 2)
        keys, values = cache.k[i, :, :start + T], cache.v[i, :, :start + T]  # (Hkv, S, D)
        qh = q.reshape(T, Hkv, G, D).transpose(1, 0, 2, 3).reshape(Hkv, T * G, D)  # rows (t, g)
        s = np.matmul(qh, keys.swapaxes(-1, -2)) / np.sqrt(D)  # (Hkv, T G, S)
        query_pos = np.repeat(positions, G)
        s[:, query_pos[:, None] < np.arange(start + T)[None, :]] = -np.inf
        s = np.exp(s - s.max(axis=-1, keepdims=True))
        s /= s.sum(axis=-1, keepdims=True)
        a = np.matmul(s, values).reshape(Hkv, T, G, D).transpose(1, 0, 2, 3).reshape(T, c.dim)
        x = x + gemm(a, w[f"layers.{i}.wo"], trans_b=True)
        h, _ = rmsnorm_forward(x, w[f"layers.{i}.ffn_norm"], c.norm_eps)
        x = x + gemm(swiglu_forward(gemm(h, w[f"layers.{i}.w13"], trans_b=True)), w[f"layers.{i}.w2"], trans_b=True)
    cache.length = start + T
    h, _ = rmsnorm_forward(x[-1:], w["norm"], c.norm_eps)
    return gemm(h, model.classifier.data, trans_b=True)[0]


def sample_token(logits, rng, temperature: float = 1.0, top_p: float = 1.0) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling over the smallest set with mass >= top_p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[:int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


def generate(model, prompt_ids, max_new_tokens: int = 100, temperature: float = 0.8, top_p: float = 0.9,
             seed: int | None = None, stop_id: int | None = None) -> list:
    """prompt ids -> prompt + new ids (stops early at `stop_id` or the context limit)."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ShapeError("generate: the prompt must hold at least one token (e.g. BOS)")
    V = model.config.vocab_size
    bad = [t for t in prompt_ids if not 0 <= t < V]
    if bad:
        raise ShapeError(f"generate: prompt token id {bad[0]} is outside the vocabulary [0, {V})")
    rng = np.random.default_rng(seed)
    cache = KVCache(model.config, model.dtype)
    out = list(prompt_ids)
    with span("generate", "generate", new=max_new_tokens):
        logits = forward_cached(model, prompt_ids, cache)
        for _ in range(max_new_tokens):
            if len(out) >= model.config.max_seq_len:  # the context is full
                break
            nxt = sample_token(logits, rng, temperature, top_p)
            out.append(nxt)
            if nxt == stop_id or len(out) >= model.config.max_seq_len:
                break
            logits = forward_cached(model, [nxt], cache)
    return out
