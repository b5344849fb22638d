"""Llama hyper-parameters and the named presets.

>>> preset("stories15M").dim, preset("default").vocab_size
(288, 258)
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from fusegrad.core.errors import ConfigError
from fusegrad.core.settings import check_value, field_type

# The ranges every LlamaConfig field is checked against (files are checked before anything is allocated)
LIMITS = {"dim": "[1, 65536]", "n_layers": "[1, 1024]", "n_heads": "[1, 1024]", "n_kv_heads": "[1, 1024]",
          "hidden_dim": "[1, 1048576]", "head_dim": "[2, 65536]", "vocab_size": "[1, 4194304]",
          "max_seq_len": "[1, 1048576]", "rope_theta": "(0, inf)", "norm_eps": "(0, 1)", "multiple_of": "[1, 65536]"}


def check_field(name: str, value, where: str, field: str | None = None, error=ConfigError):
    """`value` of LlamaConfig field `name` (called `field` in the file `where`) checked for type and range."""
    kind, optional = field_type(LlamaConfig, name)
    return check_value(field or name, value, kind, LIMITS.get(name, ""), where, optional, error)


# rope_scaling's types -> the numbers each needs (`LlamaConfig.rope_frequencies` says what they do)
ROPE_SCALING = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_len"),
                "linear": ("factor",),
                "yarn": ("factor", "original_max_len", "beta_fast", "beta_slow", "attention_factor"),
                "dynamic": ("factor", "original_max_len")}


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """YaRN's default attention factor for a scaling `factor`, as transformers and llama.cpp work it out."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


@dataclasses.dataclass
class LlamaConfig:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    hidden_dim: int | None = None  # None: llama2.c's rule, 2/3 of 4 dim rounded up to multiple_of
    head_dim: int | None = None  # None: dim / n_heads; pruned checkpoints (Minitron) keep wider heads
    vocab_size: int = 32000
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    multiple_of: int = 32
    qkv_bias: bool = False  # Qwen2: q/k/v projections carry biases (one fused bias (C + 2 KV,))
    rope_scaling: dict | None = None  # {"type": llama3 | linear | yarn | dynamic, "factor": ...}: `rope_frequencies`
    # how to train, not what the model is (so not compared): recompute each block's forward in the backward,
    # keeping only its input. Here so that every copy built from the config (worker processes) does it too
    checkpoint_activations: bool = dataclasses.field(default=False, compare=False)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "rope_scaling":
                setattr(self, f.name, check_field(f.name, getattr(self, f.name), "LlamaConfig"))
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"LlamaConfig: dim {self.dim} must split into n_heads {self.n_heads} heads "
                                  f"(or head_dim be given)")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"LlamaConfig: head_dim {self.head_dim} is not an even size (RoPE rotates pairs)")
        if self.max_seq_len * self.head_dim > 1 << 28:  # the RoPE tables' size
            raise ConfigError(f"LlamaConfig: max_seq_len {self.max_seq_len} x head_dim is over 2^28")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"LlamaConfig: n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self):
        s = self.rope_scaling
        kind = s.get("type", "llama3") if isinstance(s, dict) else None
        if kind not in ROPE_SCALING:
            raise ConfigError(f"LlamaConfig: rope_scaling must be a mapping with a type of {', '.join(ROPE_SCALING)}, "
                              f"got {s!r}"[:300])
        for key in ROPE_SCALING[kind]:
            v = s.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ConfigError(f"LlamaConfig: rope_scaling {kind!r} needs a positive finite {key}, got {v!r}")
        if kind == "dynamic" and self.max_seq_len > s["original_max_len"]:
            raise ConfigError(f"LlamaConfig: dynamic NTK RoPE rescales its base past original_max_len "
                              f"{s['original_max_len']} positions, by the length run; max_seq_len {self.max_seq_len} "
                              f"must not exceed it")

    def rope_frequencies(self, scaled: bool = True) -> np.ndarray:
        """RoPE's (D/2,) float64 inverse wavelengths, scaled by rope_scaling (when set and `scaled`) as Hugging
        Face scales them, by its "type":
        - "llama3" (Llama 3.1; the default): wavelengths beyond original_max_len / low_freq_factor slow down by
          `factor`, those below original_max_len / high_freq_factor stay, the ones between are blended;
        - "linear" (position interpolation): every wavelength slows down by `factor`;
        - "yarn": a linear ramp over the dimensions that turn between beta_fast and beta_slow times within
          original_max_len blends the slowed wavelengths (below it) with the kept ones (above it);
        - "dynamic" (NTK): none; Hugging Face raises the base only for sequences past original_max_len."""
        D = self.head_dim
        freqs = 1.0 / self.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
        s = self.rope_scaling if scaled else None
        if not s:
            return freqs
        kind, factor = s.get("type", "llama3"), float(s["factor"])
        if kind == "dynamic":  # unscaled up to original_max_len positions, and max_seq_len never exceeds it
            return freqs
        if kind == "linear":
            return freqs / factor
        n = float(s["original_max_len"])
        if kind == "yarn":
            def dim(turns):  # the dimension whose wavelength fits `turns` times into n positions
                return D * np.log(n / (turns * 2 * np.pi)) / (2 * np.log(self.rope_theta))
            lo, hi = dim(float(s["beta_fast"])), dim(float(s["beta_slow"]))
            if s.get("truncate", True):
                lo, hi = np.floor(lo), np.ceil(hi)
            lo, hi = max(lo, 0.0), min(hi, D - 1.0)
            ramp = np.clip((np.arange(D // 2) - lo) / (hi - lo if hi != lo else 1e-3), 0.0, 1.0)
            return ramp * freqs / factor + (1 - ramp) * freqs
        lo, hi = float(s["low_freq_factor"]), float(s["high_freq_factor"])
        smooth = np.clip((n * freqs / (2 * np.pi) - lo) / (hi - lo), 0.0, 1.0)
        return (1 - smooth) * freqs / factor + smooth * freqs

    def rope_tables(self, dtype=np.float32):
        """cos, sin (max_seq_len, D/2) of RoPE at `rope_frequencies()`, times YaRN's attention factor (which
        scales q and k alike, so the scores by its square)."""
        angles = np.outer(np.arange(self.max_seq_len, dtype=np.float64), self.rope_frequencies())
        m = float((self.rope_scaling or {}).get("attention_factor", 1.0))
        return (m * np.cos(angles)).astype(dtype), (m * np.sin(angles)).astype(dtype)

    @property
    def q_dim(self) -> int:
        """Width of the attention's queries and output, n_heads x head_dim: dim, except in pruned models."""
        return self.head_dim * self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"LlamaConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        C, L, Hd, V, Q, KV = self.dim, self.n_layers, self.hidden_dim, self.vocab_size, self.q_dim, self.kv_dim
        per_layer = C * (Q + 2 * KV) + Q * C + 3 * C * Hd + 2 * C + (Q + 2 * KV if self.qkv_bias else 0)
        return V * C * (1 if self.tie_embeddings else 2) + L * per_layer + C


# The llama2.c models (sizes from its README); "tiny" is for tests; "default" is `fusegrad train`'s.
PRESETS = {
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64, max_seq_len=32),
    "default": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=258, max_seq_len=128),
    "stories260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172, vocab_size=512,
                        max_seq_len=512),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768, vocab_size=32000, max_seq_len=256),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, vocab_size=32000, max_seq_len=1024),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000, max_seq_len=1024),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
