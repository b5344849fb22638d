"""A Llama-family decoder (llama2.c conventions inside, Hugging Face names outside).

Q/K/V live in ONE fused weight `wqkv` (C + 2 KV, C) and W1/W3 in ONE `w13` (2 Hd, C): forward, backward dx
and backward dW are one GEMM each (the seed's `concat(dq, dk, dv) -> dx` and `concat(dh1, dh3) -> dx`).
The classifier and the loss are one chunked op: the (tokens x vocab) logits never exist.

>>> import numpy as np
>>> from fusegrad.models import Llama
>>> model = Llama.from_preset("tiny", seed=0)
>>> tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 17))
>>> loss = model.loss(tokens)       # (B, T+1) -> scalar next-token cross-entropy
>>> loss.backward()
>>> sorted(model.grad_dict())[:2]
['model.embed_tokens.weight', 'model.layers.0.input_layernorm.weight']
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

import fusegrad as fg
from fusegrad.backends.reference import rope_tables
from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import Tensor


@dataclasses.dataclass
class LlamaConfig:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    hidden_dim: int | None = None  # None: llama2.c's rule, 2/3 of 4 dim rounded up to multiple_of
    vocab_size: int = 32000
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    multiple_of: int = 32

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ShapeError(f"LlamaConfig: {name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ShapeError(f"LlamaConfig: dim {self.dim} must split into n_heads {self.n_heads} heads of even size")
        if self.n_heads % self.n_kv_heads:
            raise ShapeError(f"LlamaConfig: n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
            raise ShapeError(f"LlamaConfig: unknown keys {sorted(unknown)}")
        return cls(**d)

    def num_params(self) -> int:
        C, L, Hd, V, KV = self.dim, self.n_layers, self.hidden_dim, self.vocab_size, self.kv_dim
        per_layer = C * (C + 2 * KV) + C * C + 3 * C * Hd + 2 * C
        return V * C * (1 if self.tie_embeddings else 2) + L * per_layer + C


# The llama2.c models (sizes from its README); "tiny" is for tests.
PRESETS = {
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64, max_seq_len=32),
    "stories260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172, vocab_size=512,
                        max_seq_len=512),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768, vocab_size=32000, max_seq_len=256),
    "stories42M": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, vocab_size=32000, max_seq_len=1024),
    "stories110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, vocab_size=32000, max_seq_len=1024),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise ShapeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


class Llama:
    """Parameters are Tensors in `self.params` under llama2.c-style names with fused QKV and W1/W3."""

    def __init__(self, config: LlamaConfig, params: dict | None = None, seed: int = 0, dtype=np.float32):
        self.config = config
        self.dtype = np.dtype(dtype)
        self.params = params if params is not None else self._init_params(seed)
        self.adapters = {}  # projection name -> callable(x) -> y replacing its linear (LoRA, fusegrad.finetune)
        c = config
        self.rope_cos, self.rope_sin = rope_tables(c.max_seq_len, c.head_dim, c.rope_theta, self.dtype)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **overrides) -> "Llama":
        return cls(preset(name, **overrides), seed=seed)

    # -- parameters ------------------------------------------------------------------------------
    def _init_params(self, seed: int) -> dict:
        """Normal(0, 0.02) weights, residual projections scaled by 1/sqrt(2 L) (GPT-2 / llama2.c), norms 1."""
        c, rng = self.config, np.random.default_rng(seed)

        def normal(shape, std=0.02):
            return fg.tensor(rng.normal(0.0, std, shape).astype(self.dtype), requires_grad=True)

        def ones(n):
            return fg.tensor(np.ones(n, self.dtype), requires_grad=True)

        resid_std = 0.02 / math.sqrt(2 * c.n_layers)
        p = {"tok_embeddings": normal((c.vocab_size, c.dim))}
        for i in range(c.n_layers):
            p[f"layers.{i}.attention_norm"] = ones(c.dim)
            p[f"layers.{i}.wqkv"] = normal((c.dim + 2 * c.kv_dim, c.dim))
            p[f"layers.{i}.wo"] = normal((c.dim, c.dim), resid_std)
            p[f"layers.{i}.ffn_norm"] = ones(c.dim)
            p[f"layers.{i}.w13"] = normal((2 * c.hidden_dim, c.dim))
            p[f"layers.{i}.w2"] = normal((c.dim, c.hidden_dim), resid_std)
        p["norm"] = ones(c.dim)
        if not c.tie_embeddings:
            p["output"] = normal((c.vocab_size, c.dim))
        return p

    def parameters(self) -> list:
        return [t for t in self.params.values() if t.requires_grad]

    def named_parameters(self) -> list:
        return [(n, t) for n, t in self.params.items() if t.requires_grad]

    def zero_grad(self) -> None:
        for t in self.params.values():
            t.grad = None

    @property
    def classifier(self) -> Tensor:
        return self.params["tok_embeddings"] if self.config.tie_embeddings else self.params["output"]

    def num_params(self) -> int:
        return sum(t.numel() for t in self.params.values())

    # -- forward -----------------------------------------------------------------------------------
    def project(self, name: str, x: Tensor) -> Tensor:
        """x (..., in) @ W^T for the projection `name`. An attached adapter computes the whole projection:
        base GEMM plus its deltas in one op, so a frozen (or NF4) base gets only its dx GEMM."""
        adapter = self.adapters.get(name)
        return fg.linear(x, self.params[name]) if adapter is None else adapter(x)

    def check_tokens(self, tokens, extra: int = 0) -> np.ndarray:
        tokens = tokens.numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ShapeError(f"Llama: tokens must be an integer array (B, T{'+1' if extra else ''}), "
                             f"got {tokens.dtype} {tokens.shape}")
        if tokens.shape[1] - extra > self.config.max_seq_len or tokens.shape[1] <= extra:
            raise ShapeError(f"Llama: sequence length {tokens.shape[1] - extra} must be in [1, "
                             f"max_seq_len {self.config.max_seq_len}]")
        return tokens

    def hidden(self, tokens) -> Tensor:
        """tokens (B, T) -> final-normed hidden states (B, T, C)."""
        c, p = self.config, self.params
        tokens = self.check_tokens(tokens)
        x = fg.embedding(p["tok_embeddings"], tokens)  # (B, T, C)
        for i in range(c.n_layers):
            h = fg.rms_norm(x, p[f"layers.{i}.attention_norm"], c.norm_eps)
            qkv = self.project(f"layers.{i}.wqkv", h)  # (B, T, C + 2 KV): one GEMM
            a = fg.causal_attention(qkv, c.n_heads, c.n_kv_heads, self.rope_cos, self.rope_sin)  # (B, T, C)
            x = x + self.project(f"layers.{i}.wo", a)
            h = fg.rms_norm(x, p[f"layers.{i}.ffn_norm"], c.norm_eps)
            h13 = self.project(f"layers.{i}.w13", h)  # (B, T, 2 Hd): one GEMM
            x = x + self.project(f"layers.{i}.w2", fg.swiglu(h13))
        return fg.rms_norm(x, p["norm"], c.norm_eps)

    def loss(self, tokens, chunk: int | None = None) -> Tensor:
        """tokens (B, T+1) int -> mean next-token cross-entropy (a scalar Tensor)."""
        tokens = self.check_tokens(tokens, extra=1)
        h = self.hidden(tokens[:, :-1])  # (B, T, C)
        targets = tokens[:, 1:].reshape(-1)
        return fg.classifier_cross_entropy(h.reshape(-1, self.config.dim), self.classifier, targets, chunk)

    def logits(self, tokens) -> Tensor:
        """tokens (B, T) -> logits (B, T, V) (materialised: for evaluation and tests, not training)."""
        return fg.matmul_nt(self.hidden(tokens), self.classifier)

    # -- Hugging Face names and layout -------------------------------------------------------------
    def state_dict(self) -> dict:
        """numpy arrays under Hugging Face LlamaForCausalLM names; fused weights split, q/k permuted."""
        from fusegrad.models.hf_names import to_hf

        return to_hf({n: t.numpy() for n, t in self.params.items()}, self.config)

    def grad_dict(self) -> dict:
        """Gradients like state_dict(): HF names and layout (None-grad parameters are left out)."""
        from fusegrad.models.hf_names import to_hf

        grads = {n: t.grad for n, t in self.params.items() if t.grad is not None}
        return to_hf(grads, self.config, partial=True)

    def load_state_dict(self, state: dict) -> None:
        from fusegrad.models.hf_names import from_hf

        arrays = from_hf(state, self.config)
        for name, t in self.params.items():
            arr = arrays[name]
            if arr.shape != t.shape:
                raise ShapeError(f"load_state_dict: {name} has shape {arr.shape}, model expects {t.shape}")
            t.data = np.array(arr, dtype=self.dtype)  # a copy: never alias the caller's arrays

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32) -> "Llama":
        """Load a llama2.c `.bin` (version 0 or 1), or a Hugging Face directory (config.json + *.safetensors)."""
        from fusegrad.models.io import load_pretrained

        config, state = load_pretrained(path)
        model = cls(config, params={}, dtype=dtype)
        from fusegrad.models.hf_names import from_hf
        model.params = {n: fg.tensor(a, dtype=dtype, requires_grad=True) for n, a in from_hf(state, config).items()}
        return model

    def save_pretrained(self, directory) -> None:
        from fusegrad.models.io import save_hf

        save_hf(directory, self.config, self.state_dict())

    def save_llama2c(self, path, version: int = 1) -> None:
        from fusegrad.models.io import save_llama2c

        save_llama2c(path, self.config, self.state_dict(), version=version)
