"""Between fusegrad's fused llama2.c-layout parameters and Hugging Face Llama names and layout.

HF rotates halves of each head (rotate_half) where llama2.c rotates interleaved pairs, so HF stores the
rows of q_proj and k_proj (and Qwen2's q/k biases) permuted per head: view (heads, D/2, 2, C) -> swap the
middle axes. Each fused weight is a stack of HF modules (`fused_parts`): wqkv = q, k, v; w13 = gate, up.
"""
from __future__ import annotations

import functools

import numpy as np

from fusegrad.core.errors import FormatError
from fusegrad.quant.fused import Fused
from fusegrad.quant.nf4 import FusedNF4, quantize_nf4

# LoRA target / projection part -> its Hugging Face module inside a decoder layer
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
FUSED = {"wqkv": ("q", "k", "v"), "wo": ("o",), "w13": ("gate", "up"), "w2": ("down",)}
NORMS = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def permute_to_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama2.c (interleaved-pair RoPE) rows -> HF (rotate-half) rows; w is (n_heads D, ...) or (n_heads D,)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def permute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def part_heads(config, part: str):
    """The head count a part's rows are permuted with between llama2.c's and HF's RoPE layouts (q, k), else None."""
    return {"q": config.n_heads, "k": config.n_kv_heads}.get(part)


def fused_parts(config, kind: str) -> list:
    """[(part, rows, heads)] of a fused weight: the HF module, its row slice, and the head count its rows
    are permuted with (None: not permuted)."""
    C, Q, KV, Hd = config.dim, config.q_dim, config.kv_dim, config.hidden_dim
    sizes = {"q": Q, "k": KV, "v": KV, "o": C, "gate": Hd, "up": Hd, "down": C}
    out, lo = [], 0
    for t in FUSED[kind]:
        out.append((t, slice(lo, lo + sizes[t]), part_heads(config, t)))
        lo += sizes[t]
    return out


def in_features(config, part: str) -> int:
    """The input width of a projection part: the attention's output for o, the MLP's for down, else dim."""
    return {"o": config.q_dim, "down": config.hidden_dim}.get(part, config.dim)


def split_to_hf(config, kind: str, w: np.ndarray) -> list:
    """A fused weight (or bias) -> [(part, HF-layout array)], each a fresh C-contiguous copy."""
    return [(t, np.array(w[rows] if h is None else permute_to_hf(w[rows], h), order="C"))
            for t, rows, h in fused_parts(config, kind)]


def fuse_from_hf(config, kind: str, arrays: list) -> np.ndarray:
    """[HF-layout part arrays] (in fused_parts order) -> the fused fusegrad array."""
    parts = [a if h is None else permute_from_hf(a, h) for a, (_, _, h) in zip(arrays, fused_parts(config, kind))]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def hf_name(i: int, part: str, what: str = "weight") -> str:
    return f"model.layers.{i}.{HF_MODULES[part]}.{what}"


def param_names(config) -> dict:
    """{fusegrad name: [HF names it is made of]} of every parameter a model of `config` has, in the order
    a fresh model draws them (llama2.c's: each block's attention, then its MLP)."""
    names = {"tok_embeddings": ["model.embed_tokens.weight"]}
    for i in range(config.n_layers):
        for kind in ("attention_norm", "wqkv", "bqkv", "wo", "ffn_norm", "w13", "w2"):
            if kind in NORMS:
                names[f"layers.{i}.{kind}"] = [f"model.layers.{i}.{NORMS[kind]}.weight"]
            elif kind != "bqkv" or config.qkv_bias:
                names[f"layers.{i}.{kind}"] = [hf_name(i, t, "bias" if kind == "bqkv" else "weight")
                                                for t in FUSED["wqkv" if kind == "bqkv" else kind]]
    names["norm"] = ["model.norm.weight"]
    if not config.tie_embeddings:
        names["output"] = ["lm_head.weight"]
    return names


def hf_shapes(config) -> dict:
    """{HF name: shape} of every parameter a model of `config` has."""
    c, shapes = config, {}
    for name, hf in param_names(config).items():
        kind = name.rsplit(".", 1)[-1]
        if kind in FUSED or kind == "bqkv":
            for (t, rows, _), n in zip(fused_parts(c, "wqkv" if kind == "bqkv" else kind), hf):
                shapes[n] = (rows.stop - rows.start,) + (() if kind == "bqkv" else (in_features(c, t),))
        else:
            shapes[hf[0]] = (c.vocab_size, c.dim) if kind in ("tok_embeddings", "output") else (c.dim,)
    return shapes


def param_shapes(config, quantized: bool = False) -> dict:
    """{fusegrad name: shape} of every parameter: a fused weight stacks its modules' rows. quantized: without
    the projection weights from_hf(quantize=...) keeps in 4 bits."""
    hf = hf_shapes(config)
    return {name: (sum(hf[n][0] for n in parts),) + hf[parts[0]][1:] for name, parts in param_names(config).items()
            if not (quantized and name.rsplit(".", 1)[-1] in FUSED)}


def check_hf_state(shapes: dict, config, where: str = "state dict") -> None:
    """FormatError naming `where` and the tensor when one is missing or its shape disagrees with config.
    shapes: {HF name: shape}."""
    for name, shape in hf_shapes(config).items():
        if name not in shapes:
            raise FormatError(f"{where}: no tensor {name!r} (has {len(shapes)} tensors, e.g. {sorted(shapes)[:3]})")
        if tuple(shapes[name]) != shape:
            raise FormatError(f"{where}: tensor {name!r} has shape {tuple(shapes[name])}, the config needs {shape}")


def to_hf(arrays: dict, config, partial: bool = False) -> dict:
    """{fusegrad name: array} -> {HF name: array}. partial=True skips names missing from `arrays`.

    The arrays are fresh copies: a state dict is a snapshot, untouched by later in-place updates of the
    parameters, and a model loaded from it shares no memory with the source.
    """
    out = {}
    for name, hf in param_names(config).items():
        if name not in arrays:
            if partial:
                continue
            raise FormatError(f"state_dict: parameter {name} is missing")
        kind = name.rsplit(".", 1)[-1]
        if kind in FUSED or kind == "bqkv":
            out.update(zip(hf, (a for _, a in split_to_hf(config, "wqkv" if kind == "bqkv" else kind, arrays[name]))))
        else:
            out[hf[0]] = np.array(arrays[name], order="C")
    return out


def from_hf(state, config, quantize=None, place=None) -> dict:
    """{HF name: array} (or an HFCheckpoint, read tensor by tensor) -> {fusegrad name: array}, fusing
    q/k/v and gate/up. quantize(config, kind, [HF names of its modules]) -> a quantized base (fused.Fused) that
    replaces each fused projection weight, its modules read by the callback (QLoRA quantizes every HF module on
    its own, as bitsandbytes does). place(name, array) -> where the array is kept (a slot of a weight block),
    called as each array is made."""
    if isinstance(state, dict):
        check_hf_state({k: np.shape(v) for k, v in state.items()}, config)
    get = state.__getitem__
    p = {}
    for name, hf in param_names(config).items():
        kind = name.rsplit(".", 1)[-1]
        if kind in FUSED or kind == "bqkv":
            fused = "wqkv" if kind == "bqkv" else kind
            quantized = quantize and kind in FUSED
            p[name] = quantize(config, fused, hf) if quantized else fuse_from_hf(config, fused, [get(n) for n in hf])
        else:
            p[name] = np.asarray(get(hf[0]))
        if place is not None and not isinstance(p[name], Fused):
            p[name] = place(name, p[name])
    return p


def quantize_parts(config, kind: str, arrays: list, blocksize: int = 64, double_quant: bool = True) -> FusedNF4:
    """HF-layout module weights of one fused projection -> FusedNF4, each module quantized on its own
    (bitsandbytes' packing of that module: NF4, blocks of `blocksize`, double-quantized scales)."""
    return FusedNF4([(quantize_nf4(a, blocksize, double_quant),
                      None if h is None else functools.partial(permute_from_hf, n_heads=h))
                     for a, (_, _, h) in zip(arrays, fused_parts(config, kind))])
