"""Sampling: the model's own forward with a KV cache, so each new token costs one row of every GEMM.

>>> from fusegrad.models import Llama
>>> model = Llama.from_preset("tiny", seed=0)
>>> out = generate(model, [1, 5, 7], max_new_tokens=4, temperature=0.0)
>>> len(out)
7
"""
from __future__ import annotations

import numpy as np

from fusegrad import ops
from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import no_grad
from fusegrad.core.trace import span


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
             seed: int | None = None, stop_id: int | None = None, stop_ids=()) -> list:
    """prompt ids -> prompt + new ids; stops early after any of `stop_ids` (every eos id the model
    declares; `stop_id` is one more) or at the context limit."""
    stops = {int(t) for t in stop_ids} | ({int(stop_id)} if stop_id is not None else set())
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ShapeError("generate: the prompt must hold at least one token (e.g. BOS)")
    V, limit = model.config.vocab_size, model.config.max_seq_len
    bad = [t for t in prompt_ids if not 0 <= t < V]
    if bad:
        raise ShapeError(f"generate: prompt token id {bad[0]} is outside the vocabulary [0, {V})")
    if len(prompt_ids) > limit:
        raise ShapeError(f"generate: the prompt's {len(prompt_ids)} tokens exceed max_seq_len {limit}")
    rng = np.random.default_rng(seed)
    cache = model.new_cache(1, min(len(prompt_ids) + max(max_new_tokens, 0), limit))
    out, new = list(prompt_ids), prompt_ids
    # after the prompt each GEMM has one row: memory-bound, and on all of OpenBLAS's threads (they spin between
    # calls, so they start at once; one thread was slower: docs/performance.md, Generation)
    with span("generate", "generate", new=max_new_tokens), no_grad():
        while len(out) - len(prompt_ids) < max_new_tokens and len(out) < limit:
            h = model.hidden(np.array([new]), cache=cache)  # (1, T, C): the new tokens after the cached ones
            logits = ops.matmul_nt(h[:, -1], model.classifier)  # (1, V): the last position's only
            nxt = sample_token(logits.numpy()[0], rng, temperature, top_p)
            out.append(nxt)
            if nxt in stops:
                break
            new = [nxt]
    return out
