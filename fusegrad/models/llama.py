"""A Llama-family decoder (llama2.c conventions inside, Hugging Face names outside).

Q/K/V live in ONE fused weight `wqkv` (H D + 2 KV, C) and W1/W3 in ONE `w13` (2 Hd, C): forward, backward dx
and backward dW are one GEMM each. The classifier and the loss are one chunked op: the (tokens x vocab)
logits never exist. One forward serves training and generation: given a KV cache, attention reads the
earlier positions from it (and no graph is built).

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

import contextlib
import functools
import math

import numpy as np

from fusegrad import ops
from fusegrad.backends import get_backend
from fusegrad.core.errors import ConfigError, ShapeError
from fusegrad.core.tensor import Tensor, no_grad, tensor
from fusegrad.ops.checkpoint import checkpoint
from fusegrad.models.config import PRESETS, LlamaConfig, preset
from fusegrad.models.hf_names import from_hf, param_shapes, quantize_parts, to_hf
from fusegrad.quant.fused import Fused
from fusegrad.models.hf import save_hf
from fusegrad.models.io import WeightBlock, load_pretrained, save_llama2c

__all__ = ["KVCache", "Llama", "LlamaConfig", "PRESETS", "preset"]


class KVCache:
    """Rotated keys and values of the positions seen so far: per layer (B, Hkv, max_len, D) arrays of the
    model's backend, filled up to `length`."""

    def __init__(self, k: list, v: list):
        self.k, self.v, self.length = k, v, 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


class Llama:
    """Parameters are Tensors in `self.params` under llama2.c-style names with fused QKV and W1/W3."""

    def __init__(self, config: LlamaConfig, params: dict | None = None, seed: int = 0, dtype=np.float32,
                 backend=None):
        self.config = config
        self.dtype = np.dtype(dtype)
        # where new weights go (_init_params, from_pretrained); given params keep their own
        self.backend = get_backend(backend) if not params else next(iter(params.values())).backend
        self.params = params if params is not None else self._init_params(seed)
        # projection name -> adapter replacing its linear (LoRA, fusegrad.finetune): adapter(x) -> y, and
        # adapter.parameters(), adapter.gemm_shapes(tokens) for FLOP counts and pre-warming, adapter.rng
        # (optional) the numpy Generator its dropout draws from, which activation checkpointing rewinds
        self.adapters = {}
        self.quantized = {}  # projection name -> frozen quantized base (fused.Fused; from_pretrained(quantize=), QLoRA)
        self.rope_cos, self.rope_sin = config.rope_tables(self.dtype)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, backend=None, **overrides) -> "Llama":
        return cls(preset(name, **overrides), seed=seed, backend=backend)

    # -- parameters ------------------------------------------------------------------------------
    def _init_params(self, seed: int) -> dict:
        """Normal(0, 0.02) weights, residual projections scaled by 1/sqrt(2 L) (GPT-2 / llama2.c), norms 1."""
        c, rng = self.config, np.random.default_rng(seed)

        def normal(shape, std=0.02):
            return tensor(rng.normal(0.0, std, shape).astype(self.dtype), requires_grad=True, backend=self.backend)

        def ones(n):
            return tensor(np.ones(n, self.dtype), requires_grad=True, backend=self.backend)

        resid_std = 0.02 / math.sqrt(2 * c.n_layers)
        p = {}
        for name, shape in param_shapes(c).items():
            kind = name.rsplit(".", 1)[-1]
            p[name] = ones(shape) if kind in ("attention_norm", "ffn_norm", "norm") else \
                normal(shape, resid_std if kind in ("wo", "w2") else 0.02)
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
        """x (..., in) @ W^T (+ bias) for the projection `name`. An attached adapter computes the whole
        projection: base GEMM plus its deltas in one op, so a frozen (or NF4) base gets only its dx GEMM."""
        adapter = self.adapters.get(name)
        bias = self.params.get(name.replace("wqkv", "bqkv")) if name.endswith("wqkv") else None
        if adapter is None and name in self.quantized:  # a quantized base without adapters: dequantize for this GEMM
            w = self.quantized[name].dequantize_on(x.backend)  # a new array: linear's backward keeps it
            return ops.linear(x, Tensor(w, backend=x.backend), bias)
        if adapter is None:
            return ops.linear(x, self.params[name], bias)
        return adapter(x) if bias is None else adapter(x) + bias

    def check_tokens(self, tokens, extra: int = 0, start: int = 0, room: int | None = None) -> np.ndarray:
        """tokens (B, T + extra) int at positions start..; ShapeError unless 1 <= T and start + T <= room
        (default max_seq_len)."""
        tokens = tokens.numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ShapeError(f"Llama: tokens must be an integer array (B, T{'+1' if extra else ''}), "
                             f"got {tokens.dtype} {tokens.shape}")
        room = self.config.max_seq_len if room is None else room
        T = tokens.shape[1] - extra
        if start + T > room or T < 1:
            c = self.config
            limit = f"max_seq_len {c.max_seq_len}" if room == c.max_seq_len else f"the cache's {room}"
            raise ShapeError(f"Llama: sequence length {start + T} must be in [1, {limit}]")
        return tokens

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions (prompt + new tokens)."""
        c = self.config
        if not 1 <= max_len <= c.max_seq_len or batch < 1:
            raise ShapeError(f"Llama.new_cache: need batch >= 1 and 1 <= max_len <= max_seq_len {c.max_seq_len}, "
                             f"got batch {batch}, max_len {max_len}")
        be = self.params["norm"].backend
        shape = (batch, c.n_kv_heads, max_len, c.head_dim)
        return KVCache([be.zeros(shape, self.dtype) for _ in range(c.n_layers)],
                       [be.zeros(shape, self.dtype) for _ in range(c.n_layers)])

    def hidden(self, tokens, cache: KVCache | None = None) -> Tensor:
        """tokens (B, T) -> final-normed hidden states (B, T, C). With a cache, the tokens sit at positions
        cache.length.. after those it holds, their keys and values go in, and no graph is built.
        config.checkpoint_activations: each block keeps only its input; the backward recomputes the rest."""
        c, p = self.config, self.params
        start = 0 if cache is None else cache.length
        tokens = self.check_tokens(tokens, start=start, room=None if cache is None else cache.max_len)
        with contextlib.nullcontext() if cache is None else no_grad():
            x = ops.embedding(p["tok_embeddings"], tokens)  # (B, T, C)
            for i in range(c.n_layers):
                if c.checkpoint_activations and cache is None:
                    x = checkpoint(functools.partial(self.block, i), x, self.block_parameters(i),
                                   self.block_rngs(i))
                else:
                    x = self.block(i, x, cache)
            if cache is not None:
                cache.length = start + tokens.shape[1]
            return ops.rms_norm(x, p["norm"], c.norm_eps)

    def block(self, i: int, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Decoder layer i: x (B, T, C) -> x + attention(norm(x)), then + SwiGLU FFN(norm(x)). With a cache,
        attention reads and extends layer i's keys and values from position cache.length."""
        c, p = self.config, self.params
        h = ops.rms_norm(x, p[f"layers.{i}.attention_norm"], c.norm_eps)
        qkv = self.project(f"layers.{i}.wqkv", h)  # (B, T, H D + 2 KV): one GEMM; H D = C but in pruned models
        if cache is None:
            a = ops.causal_attention(qkv, c.n_heads, c.n_kv_heads, self.rope_cos, self.rope_sin)
        else:
            a = ops.cached_attention(qkv, cache.k[i], cache.v[i], cache.length, c.n_heads, c.n_kv_heads,
                                     self.rope_cos, self.rope_sin)
        x = x + self.project(f"layers.{i}.wo", a)  # (B, T, H D) -> (B, T, C)
        h = ops.rms_norm(x, p[f"layers.{i}.ffn_norm"], c.norm_eps)
        h13 = self.project(f"layers.{i}.w13", h)  # (B, T, 2 Hd): one GEMM
        return x + self.project(f"layers.{i}.w2", ops.swiglu(h13))

    def block_parameters(self, i: int) -> list:
        """The tensors layer i reads: its weights and its projections' adapter parameters."""
        prefix = f"layers.{i}."
        own = [t for n, t in self.params.items() if n.startswith(prefix)]
        return own + [t for n, a in self.adapters.items() if n.startswith(prefix) for t in a.parameters()]

    def block_rngs(self, i: int) -> list:
        """The random generators layer i draws from: its adapters' dropout (`adapter.rng`, None when off)."""
        prefix = f"layers.{i}."
        rngs = (getattr(a, "rng", None) for n, a in self.adapters.items() if n.startswith(prefix))
        return [r for r in rngs if r is not None]

    def loss(self, tokens, chunk: int | None = None) -> Tensor:
        """tokens (B, T+1) int -> mean next-token cross-entropy (a scalar Tensor)."""
        tokens = self.check_tokens(tokens, extra=1)
        h = self.hidden(tokens[:, :-1])  # (B, T, C)
        targets = tokens[:, 1:].reshape(-1)
        return ops.classifier_cross_entropy(h.reshape(-1, self.config.dim), self.classifier, targets, chunk)

    def logits(self, tokens, cache: KVCache | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, V) (materialised: for generation, evaluation and tests)."""
        h = self.hidden(tokens, cache)
        with contextlib.nullcontext() if cache is None else no_grad():
            return ops.matmul_nt(h, self.classifier)

    # -- GEMM shapes and FLOPs, for pre-warming and benchmarks ---------------------------------------------
    def gemm_shapes(self, batch: int, seq: int, num_classes: int = 0) -> list:
        """Every (m, k, n) GEMM a training step on (batch, seq) tokens runs, sorted, deduplicated: for each
        weight (out, in), forward y = x W^T (M, in, out), dx = dy W (M, out, in), dW = dy^T x (out, M, in),
        M = batch * seq; attached adapters' GEMMs; attention's (T, D) x (D, T) and (T, T) x (T, D);
        a classification head of `num_classes` if asked."""
        c, tokens = self.config, batch * seq
        weights = [(c.q_dim + 2 * c.kv_dim, c.dim), (c.dim, c.q_dim), (2 * c.hidden_dim, c.dim), (c.dim, c.hidden_dim),
                   (c.vocab_size, c.dim)] + ([(num_classes, c.dim)] if num_classes else [])
        shapes = {(seq, c.head_dim, seq), (seq, seq, c.head_dim)}
        for d_out, d_in in weights:
            shapes |= {(tokens, d_in, d_out), (tokens, d_out, d_in), (d_out, tokens, d_in)}
        for adapter in self.adapters.values():
            shapes |= set(adapter.gemm_shapes(tokens))
        return sorted(s for s in shapes if min(s) > 0)

    def flops_per_token(self, seq: int) -> float:
        """Model FLOPs per token of a training step on sequences of `seq`: 6 per GEMM weight (forward, dx,
        dW) plus attention; with adapters attached the base is frozen (4 per weight: no dW) and each
        adapter weight costs 6."""
        c = self.config
        weights = c.n_layers * (c.dim * (2 * c.q_dim + 2 * c.kv_dim) + 3 * c.dim * c.hidden_dim)
        weights += c.vocab_size * c.dim
        attention = 12.0 * c.n_layers * c.n_heads * c.head_dim * seq
        if not self.adapters:
            return 6.0 * weights + attention
        lora = sum(t.numel() for a in self.adapters.values() for t in a.parameters())
        return 4.0 * weights + 6.0 * lora + attention

    # -- Hugging Face names and layout -------------------------------------------------------------
    def state_dict(self) -> dict:
        """numpy arrays under Hugging Face LlamaForCausalLM names; fused weights split, q/k permuted."""
        arrays = {n: t.numpy() for n, t in self.params.items()}
        arrays.update({n: q.dequantize() for n, q in self.quantized.items()})
        return to_hf(arrays, self.config)

    def grad_dict(self) -> dict:
        """Gradients like state_dict(): HF names and layout (None-grad parameters are left out)."""
        grads = {n: t.backend.to_numpy(t.grad) for n, t in self.params.items() if t.grad is not None}
        return to_hf(grads, self.config, partial=True)

    def load_state_dict(self, state: dict) -> None:
        arrays = from_hf(state, self.config)
        for name, t in self.params.items():
            arr = arrays[name]
            if arr.shape != t.shape:
                raise ShapeError(f"load_state_dict: {name} has shape {arr.shape}, model expects {t.shape}")
            t.data = t.backend.asarray(np.array(arr, dtype=self.dtype))  # a copy: never alias the caller's arrays

    @classmethod
    def from_pretrained(cls, path, dtype=np.float32, backend=None, quantize: str | None = None) -> "Llama":
        """Load a llama2.c `.bin` (version 0 or 1), a Hugging Face directory (config.json + *.safetensors
        in bf16/fp16/fp32, sharded or not) or a GGUF file (llama/qwen2, any type gguf dequantizes), tensor by
        tensor. quantize="nf4": every projection module is quantized as bitsandbytes does (NF4, blocks of 64,
        double-quantized scales) as it is read, so the fp32 model never exists; quantize="auto": as "nf4", but
        a projection a GGUF file stores quantized (Q8_0 ... Q6_K) keeps the file's own blocks (FusedGGML: no
        second quantization). The bases land in `model.quantized` (frozen) for QLoRA."""
        if quantize not in (None, "nf4", "auto"):
            raise ConfigError(f"from_pretrained: quantize must be None, 'nf4' or 'auto', got {quantize!r}")
        config, state = load_pretrained(path)
        model = cls(config, params={}, dtype=dtype, backend=backend)
        block = None
        if model.backend.xp is np:  # numpy arrays: all weights in one block of 2 MiB pages (faster generation)
            block = WeightBlock(param_shapes(config, quantized=bool(quantize)), dtype)
        keep = getattr(state, "keep_quantized", None) if quantize == "auto" else None  # a GGUF file's

        def quantize_fused(c, kind, names):
            return (keep and keep(c, kind, names)) or quantize_parts(c, kind, [state[n] for n in names])

        arrays = from_hf(state, config, quantize=quantize_fused if quantize else None,
                         place=block.place if block is not None else None)
        model.quantized = {n: a for n, a in arrays.items() if isinstance(a, Fused)}
        be, trainable = model.backend, not model.quantized  # fresh arrays: wrapped without another copy
        model.params = {n: Tensor(be.asarray(np.asarray(a, dtype=dtype)), requires_grad=trainable, backend=be)
                        for n, a in arrays.items() if n not in model.quantized}
        return model

    def save_pretrained(self, directory, dtype: str = "float32", bos_id=1, eos_id=2) -> None:
        save_hf(directory, self.config, self.state_dict(), dtype, bos_id, eos_id)

    def save_llama2c(self, path, version: int = 0) -> None:
        save_llama2c(path, self.config, self.state_dict(), version=version)
