"""Between fusegrad's fused llama2.c-layout parameters and Hugging Face Llama names and layout.

HF rotates halves of each head (rotate_half) where llama2.c rotates interleaved pairs, so HF stores the
rows of q_proj and k_proj permuted per head: view (heads, D/2, 2, C) -> swap the middle axes.
"""
from __future__ import annotations

import numpy as np

from fusegrad.core.errors import FormatError

# LoRA target / projection part -> its Hugging Face module inside a decoder layer
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def permute_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama2.c (interleaved-pair RoPE) rows -> HF (rotate-half) rows; w is (n_heads D, C)."""
    out, cols = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def permute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def to_hf(arrays: dict, config, partial: bool = False) -> dict:
    """{fusegrad name: array} -> {HF name: array}. partial=True skips names missing from `arrays`.

    The arrays are fresh copies: a state dict is a snapshot, untouched by later in-place updates of the
    parameters, and a model loaded from it shares no memory with the source.
    """
    c, out = config, {}
    C, KV, Hd = c.dim, c.kv_dim, c.hidden_dim

    def put(hf_name, name, fn):
        if name in arrays:
            out[hf_name] = np.array(fn(arrays[name]), order="C")  # always a copy
        elif not partial:
            raise FormatError(f"state_dict: parameter {name} is missing")

    put("model.embed_tokens.weight", "tok_embeddings", lambda a: a)
    for i in range(c.n_layers):
        pre, hf = f"layers.{i}.", f"model.layers.{i}."
        m = {t: f"{hf}{module}.weight" for t, module in HF_MODULES.items()}
        put(hf + "input_layernorm.weight", pre + "attention_norm", lambda a: a)
        put(m["q"], pre + "wqkv", lambda a: permute_to_hf(a[:C], c.n_heads))
        put(m["k"], pre + "wqkv", lambda a: permute_to_hf(a[C:C + KV], c.n_kv_heads))
        put(m["v"], pre + "wqkv", lambda a: a[C + KV:])
        put(m["o"], pre + "wo", lambda a: a)
        put(hf + "post_attention_layernorm.weight", pre + "ffn_norm", lambda a: a)
        put(m["gate"], pre + "w13", lambda a: a[:Hd])
        put(m["up"], pre + "w13", lambda a: a[Hd:])
        put(m["down"], pre + "w2", lambda a: a)
    put("model.norm.weight", "norm", lambda a: a)
    if not c.tie_embeddings:
        put("lm_head.weight", "output", lambda a: a)
    return out


def hf_shapes(config) -> dict:
    """{HF name: shape} of every parameter a model of `config` has."""
    c = config
    C, KV, Hd = c.dim, c.kv_dim, c.hidden_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, C), "model.norm.weight": (C,)}
    for i in range(c.n_layers):
        hf = f"model.layers.{i}."
        parts = {"q": (C, C), "k": (KV, C), "v": (KV, C), "o": (C, C), "gate": (Hd, C), "up": (Hd, C), "down": (C, Hd)}
        shapes.update({f"{hf}{HF_MODULES[t]}.weight": shape for t, shape in parts.items()})
        shapes.update({hf + "input_layernorm.weight": (C,), hf + "post_attention_layernorm.weight": (C,)})
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, C)
    return shapes


def check_hf_state(state: dict, config, where: str = "state dict") -> None:
    """FormatError naming `where` and the tensor when one is missing or its shape disagrees with config."""
    for name, shape in hf_shapes(config).items():
        if name not in state:
            raise FormatError(f"{where}: no tensor {name!r} (has {len(state)} tensors, e.g. {sorted(state)[:3]})")
        if tuple(np.shape(state[name])) != shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {tuple(np.shape(state[name]))}, "
                              f"the config needs {shape}")


def from_hf(state: dict, config) -> dict:
    """{HF name: array} -> {fusegrad name: array}, fusing q/k/v and gate/up; names a missing or misshapen key."""
    c = config
    check_hf_state(state, config)

    def get(name):
        return np.asarray(state[name])

    p = {"tok_embeddings": get("model.embed_tokens.weight")}
    for i in range(c.n_layers):
        hf = f"model.layers.{i}."
        m = {t: get(f"{hf}{module}.weight") for t, module in HF_MODULES.items()}
        p[f"layers.{i}.attention_norm"] = get(hf + "input_layernorm.weight")
        p[f"layers.{i}.wqkv"] = np.concatenate([permute_from_hf(m["q"], c.n_heads),
                                                permute_from_hf(m["k"], c.n_kv_heads), m["v"]])
        p[f"layers.{i}.wo"] = m["o"]
        p[f"layers.{i}.ffn_norm"] = get(hf + "post_attention_layernorm.weight")
        p[f"layers.{i}.w13"] = np.concatenate([m["gate"], m["up"]])
        p[f"layers.{i}.w2"] = m["down"]
    p["norm"] = get("model.norm.weight")
    if not c.tie_embeddings:
        p["output"] = get("lm_head.weight")
    return p
