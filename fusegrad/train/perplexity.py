"""Perplexity of a model on a text: what `fusegrad perplexity` prints.

The tokens are cut into windows of seq_len + 1 that overlap by one token (TokenDataset.iter_batches), so every
token but the first is predicted once, from the tokens before it in its window; the loss is the mean over all
of them, in nats per token, and the perplexity its exp. Bits per byte divide the same total by the UTF-8 bytes
the predicted tokens decode to, so models with different tokenizers can be compared.

>>> from fusegrad.models import Llama
>>> from fusegrad.data.tokenizer import ByteTokenizer
>>> from fusegrad.data.prepare import prepare
>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> _ = prepare(None, d, val_fraction=0.1)
>>> r = perplexity(Llama.from_preset("default", seed=0), TokenDataset(d, 64, "val"), max_tokens=640)
>>> r["tokens"], r["windows"], round(r["loss"], 1)   # untrained: near ln(258) = 5.55, a guess among the ids
(640, 10, 5.3)
"""
from __future__ import annotations

import math

from fusegrad.core.errors import ConfigError
from fusegrad.core.tensor import no_grad
from fusegrad.core.trace import span
from fusegrad.data.shards import TokenDataset


def perplexity(model, data: TokenDataset, batch_size: int = 8, max_tokens: int | None = None,
               tokenizer=None) -> dict:
    """{"perplexity", "loss" (nats per token), "tokens" (predicted), "windows", and with a tokenizer
    "bits_per_byte"} of `model` on the windows of `data`, the first `max_tokens` predictions (None: all)."""
    if batch_size < 1 or (max_tokens is not None and max_tokens < data.seq_len):
        raise ConfigError(f"perplexity: need batch_size >= 1 and max_tokens >= seq_len {data.seq_len}, got "
                          f"batch_size {batch_size}, max_tokens {max_tokens}")
    windows = None if max_tokens is None else max_tokens // data.seq_len
    total, tokens, n_bytes, n_windows = 0.0, 0, 0, 0
    with no_grad(), span("perplexity", "eval"):
        for batch in data.iter_batches(batch_size):  # (b, seq_len + 1)
            batch = batch if windows is None else batch[:windows - n_windows]
            n = batch.shape[0] * data.seq_len
            total += model.loss(batch).item() * n  # float64 sum of float32 means
            tokens, n_windows = tokens + n, n_windows + batch.shape[0]
            if tokenizer is not None:
                n_bytes += sum(len(tokenizer.decode(w[1:]).encode("utf-8")) for w in batch)
            if n_windows == windows:
                break
    loss = total / tokens
    out = {"perplexity": math.exp(loss), "loss": loss, "tokens": tokens, "windows": n_windows}
    if tokenizer is not None and n_bytes:
        out["bits_per_byte"] = total / math.log(2) / n_bytes
    return out
