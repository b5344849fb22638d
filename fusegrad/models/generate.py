"""Sampling: the model's own forward with a KV cache, so each new token costs one row of every GEMM.

>>> from fusegrad.models import Llama
>>> model = Llama.from_preset("tiny", seed=0)
>>> out = generate(model, [1, 5, 7], max_new_tokens=4, temperature=0.0)
>>> len(out)
7
>>> Sampling(temperature=1.0, top_p=1.0).probabilities(np.array([2.0, 1.0, -1.0]), context=[]).round(3)
array([0.705, 0.259, 0.035])
>>> Sampling(temperature=1.0, top_p=1.0, min_p=0.05).probabilities(np.array([2.0, 1.0, -1.0]), context=[]).round(3)
array([0.731, 0.269, 0.   ])
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from fusegrad import ops
from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.core.fileio import read_json_object
from fusegrad.core.tensor import no_grad
from fusegrad.core.trace import span
from fusegrad.models.gguf_reader import GGUFContents, is_gguf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen, in transformers' order: the repetition penalty on the logits of every id in
    the context so far (prompt included; a positive logit divided by it, a negative one multiplied) or, as
    llama.cpp's penalty_last_n, in its last repeat_last_n ids (-1: all, 0: none), then temperature (0: the most
    likely token), top-k (0: off), top-p (1: off), min-p (0: off)."""
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repeat_last_n: int = -1

    def __post_init__(self):
        checks = {"temperature": self.temperature >= 0, "top_p": 0 < self.top_p <= 1,
                  "top_k": self.top_k >= 0 and float(self.top_k).is_integer(), "min_p": 0 <= self.min_p <= 1,
                  "repetition_penalty": self.repetition_penalty > 0,
                  "repeat_last_n": self.repeat_last_n >= -1 and float(self.repeat_last_n).is_integer()}
        ranges = {"temperature": ">= 0", "top_p": "in (0, 1]", "top_k": "an integer >= 0", "min_p": "in [0, 1]",
                  "repetition_penalty": "> 0", "repeat_last_n": "an integer >= -1"}
        for name, ok in checks.items():
            if not ok:  # NaN fails every comparison, so it lands here too
                raise ConfigError(f"sampling: {name} must be {ranges[name]}, got {getattr(self, name)!r}")
        for name in ("top_k", "repeat_last_n"):  # a JSON 40.0 counts as 40
            object.__setattr__(self, name, int(getattr(self, name)))

    def penalized(self, logits, context) -> np.ndarray:
        """(V,) float64 logits with the repetition penalty applied to the ids in `context`."""
        z = np.array(logits, dtype=np.float64)
        window = context if self.repeat_last_n == -1 else context[max(0, len(context) - self.repeat_last_n):]
        if self.repetition_penalty != 1.0 and len(window):
            seen = np.unique(np.asarray(window, dtype=np.int64))
            z[seen] = np.where(z[seen] < 0, z[seen] * self.repetition_penalty, z[seen] / self.repetition_penalty)
        return z

    def probabilities(self, logits, context) -> np.ndarray:
        """(V,) float64: the distribution the next token is drawn from (temperature > 0)."""
        z = self.penalized(logits, context) / self.temperature
        if 0 < self.top_k < len(z):  # ties with the k-th logit stay, as in transformers
            z[z < np.partition(z, -self.top_k)[-self.top_k]] = -np.inf
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:  # keep a token while the mass ranked above it is below top_p
            order = np.argsort(-p, kind="stable")
            above = np.cumsum(p[order]) - p[order]
            p[order[above >= self.top_p]] = 0.0
            p /= p.sum()
        if self.min_p > 0.0:
            p[p < self.min_p * p.max()] = 0.0
            p /= p.sum()
        return p

    def choose(self, logits, context, rng) -> int:
        if self.temperature == 0:
            return int(np.argmax(self.penalized(logits, context)))
        p = self.probabilities(logits, context)
        return int(rng.choice(len(p), p=p))


# what a checkpoint may declare: generation_config.json's keys (Sampling's own names), GGUF's general.sampling.*
GGUF_SAMPLING_KEYS = {"temperature": "general.sampling.temp", "top_p": "general.sampling.top_p",
                      "top_k": "general.sampling.top_k", "min_p": "general.sampling.min_p",
                      "repetition_penalty": "general.sampling.penalty_repeat",
                      "repeat_last_n": "general.sampling.penalty_last_n"}
LLAMACPP_REPEAT_LAST_N = 64  # llama.cpp's penalty_last_n where a GGUF gives penalty_repeat alone


def declared_sampling(path) -> dict:
    """The sampling settings a checkpoint declares ({Sampling field: value}): a Hugging Face directory's
    generation_config.json (`do_sample: false` means greedy, temperature 0), a GGUF file's general.sampling.*
    keys; {} for anything else. Each is checked as Sampling checks it, naming the file."""
    path = os.fspath(path)
    if is_gguf(path):
        meta = GGUFContents(path).metadata
        declared = {field: meta[key] for field, key in GGUF_SAMPLING_KEYS.items() if key in meta}
        if "repetition_penalty" in declared:  # meant as llama.cpp means it: over its window
            declared.setdefault("repeat_last_n", LLAMACPP_REPEAT_LAST_N)
    elif os.path.isfile(os.path.join(path, "generation_config.json")):
        path = os.path.join(path, "generation_config.json")
        raw = read_json_object(path, "the generation config")
        declared = {field: raw[field] for field in GGUF_SAMPLING_KEYS if raw.get(field) is not None}
        if raw.get("do_sample") is False:  # transformers then decodes greedily, whatever the temperature says
            declared["temperature"] = 0.0
    else:
        return {}
    for field, value in declared.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FormatError(f"{path}: sampling setting {field} must be a number, got {value!r}")
    try:
        Sampling(**declared)
    except ConfigError as e:
        raise FormatError(f"{path}: {e}") from None
    return declared


def sample_token(logits, rng, temperature: float = 1.0, top_p: float = 1.0) -> int:
    """One token from (V,) logits: greedy at temperature 0, else nucleus sampling (Sampling without penalty)."""
    return Sampling(temperature=temperature, top_p=top_p).choose(logits, (), rng)


def generate(model, prompt_ids, max_new_tokens: int = 100, temperature: float = 0.8, top_p: float = 0.9,
             seed: int | None = None, stop_id: int | None = None, stop_ids=(),
             sampling: Sampling | None = None) -> list:
    """prompt ids -> prompt + new ids; stops early after any of `stop_ids` (every eos id the model
    declares; `stop_id` is one more) or at the context limit. `sampling` (top-k, min-p, repetition penalty
    too) replaces temperature and top_p when given."""
    prompt_ids = [int(t) for t in prompt_ids]
    return prompt_ids + list(stream(model, prompt_ids, max_new_tokens, sampling or Sampling(temperature, top_p), seed,
                                    stop_ids=tuple(stop_ids) + (() if stop_id is None else (stop_id,))))


def stream(model, prompt_ids, max_new_tokens: int, sampling: Sampling, seed=None, stop_ids=(), cache=None):
    """The new ids, one at a time as each is chosen (the last one a stop id, if one came). seed: an int, None or a
    numpy Generator to draw from. cache: a KVCache whose first `cache.length` positions hold the first ids of
    `prompt_ids` (not computed again), or None for a new one."""
    stops = {int(t) for t in stop_ids}
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise ShapeError("generate: the prompt must hold at least one token (e.g. BOS)")
    V, limit = model.config.vocab_size, model.config.max_seq_len
    bad = [t for t in prompt_ids if not 0 <= t < V]
    if bad:
        raise ShapeError(f"generate: prompt token id {bad[0]} is outside the vocabulary [0, {V})")
    if len(prompt_ids) > limit:
        raise ShapeError(f"generate: the prompt's {len(prompt_ids)} tokens exceed max_seq_len {limit}")
    rng = np.random.default_rng(seed)  # a Generator is used as it is
    need = min(len(prompt_ids) + max(max_new_tokens, 0), limit)
    if cache is None:
        cache = model.new_cache(1, need)
    elif not (0 <= cache.length < len(prompt_ids) and cache.max_len >= need):
        raise ShapeError(f"generate: a cache holding {cache.length} of {cache.max_len} positions cannot continue a "
                         f"prompt of {len(prompt_ids)} ids by {max_new_tokens}")
    out, new = list(prompt_ids), prompt_ids[cache.length:]  # out: the context the repetition penalty looks at
    # after the prompt each GEMM has one row: memory-bound, and on all of OpenBLAS's threads (they spin between
    # calls, so they start at once; one thread was slower: docs/performance.md, Generation)
    with span("generate", "generate", new=max_new_tokens), no_grad():
        while len(out) - len(prompt_ids) < max_new_tokens and len(out) < limit:
            h = model.hidden(np.array([new]), cache=cache)  # (1, T, C): the new tokens after the cached ones
            logits = ops.matmul_nt(h[:, -1], model.classifier)  # (1, V): the last position's only
            nxt = sampling.choose(logits.numpy()[0], out, rng)
            out.append(nxt)
            yield nxt
            if nxt in stops:
                break
            new = [nxt]


class Conversation:
    """A chat's turns generated one after another, keeping the KV cache: each turn computes only the ids after
    the longest prefix its prompt (the whole conversation, rendered again) shares with what is cached.

    >>> from fusegrad.models import Llama
    >>> chat = Conversation(Llama.from_preset("tiny", seed=0), Sampling(temperature=0.0))
    >>> first = list(chat.reply([1, 5, 7], 3))
    >>> chat.computed  # the prompt's 3 positions and 2 of the 3 new ids (the last is not run until it is needed)
    5
    >>> len(list(chat.reply([1, 5, 7] + first + [9], 3))), chat.computed  # 5 cached, not run again: 2 + 2 more
    (3, 9)
    """

    def __init__(self, model, sampling: Sampling, seed=None, stop_ids=()):
        self.model, self.sampling, self.stop_ids = model, sampling, tuple(stop_ids)
        self.rng = np.random.default_rng(seed)
        self.cache, self.cached = None, []  # cached: the ids whose keys and values the cache holds
        self.computed = 0  # positions run through the model so far, all turns together

    def reply(self, prompt_ids, max_new_tokens: int):
        prompt_ids = [int(t) for t in prompt_ids]
        common = 0
        for a, b in zip(self.cached, prompt_ids[:-1]):  # the last prompt id is always run: its logits pick
            if a != b:
                break
            common += 1
        need = min(len(prompt_ids) + max(max_new_tokens, 0), self.model.config.max_seq_len)
        if self.cache is None or self.cache.max_len < need:
            self.cache = self._grown(need, common)
        self.cache.length = common
        self.computed -= common
        new = []
        for token in stream(self.model, prompt_ids, max_new_tokens, self.sampling, self.rng, self.stop_ids,
                            self.cache):
            new.append(token)
            yield token
        self.cached = (prompt_ids + new)[:self.cache.length]
        self.computed += self.cache.length

    def _grown(self, need: int, keep: int):
        """A cache for `need` positions (twice the old one's, within max_seq_len) holding the old one's first
        `keep`."""
        old = self.cache
        size = need if old is None else min(max(need, 2 * old.max_len), self.model.config.max_seq_len)
        cache = self.model.new_cache(1, size)
        for layer in range(len(cache.k) if keep else 0):
            cache.k[layer][:, :, :keep] = old.k[layer][:, :, :keep]
            cache.v[layer][:, :, :keep] = old.v[layer][:, :, :keep]
        return cache
