"""Which GGML type each tensor of a GGUF export gets, and its bytes in that type.

A plain type (f32, f16, bf16, q8_0, q5_0, q4_0) goes to every 2-D weight, as llama.cpp's converter writes it: a
tensor whose rows are no whole number of blocks stays F16. A llama.cpp file type (q2_k, q3_k_s, q3_k_m, q3_k_l,
q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k: llama-quantize's mixes) picks each weight's type by llama-quant.cpp's
llama_tensor_get_type without an importance matrix (node-llama-cpp 3.22.1's llama.cpp): the output matrix (and a
tied token_embd) Q6_K, attn_v, attn_output and ffn_down of some layers more bits, and a type whose blocks do not
fit a row falls back to a 32-value one (Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), then F16.
Norms and biases stay F32 in every file type.

>>> shapes = {"token_embd.weight": (258, 576), "blk.0.attn_v.weight": (192, 576), "blk.0.ffn_down.weight": (576, 1536)}
>>> gguf_types(shapes, "q4_k_m", n_layers=1, n_heads=9, n_kv_heads=3, arch="llama")
{'token_embd.weight': 'Q8_0', 'blk.0.attn_v.weight': 'Q8_0', 'blk.0.ffn_down.weight': 'Q6_K'}
"""
from __future__ import annotations

import numpy as np

from fusegrad.quant.kquants import BLOCK_VALUES, KINDS, QK_K, quantize_k

PLAIN = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_0")  # llama.cpp's converter's types
MIXES = {"q2_k": "Q2_K", "q3_k_s": "Q3_K", "q3_k_m": "Q3_K", "q3_k_l": "Q3_K", "q4_k_s": "Q4_K", "q4_k_m": "Q4_K",
         "q5_k_s": "Q5_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}  # -> base type
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # llama-quant.cpp's


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers for more bits: the first and last eighth, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def layer_of(name: str) -> int:
    """blk.{i}.* -> i, others -1: llama.cpp quantizes tensors in this order (then by name)."""
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def fitted(kind: str, cols: int) -> str:
    """`kind`, or its fallback when a row of `cols` is no whole number of its blocks; F16 when that fails too."""
    if cols % BLOCK_VALUES[kind]:
        kind = FALLBACK.get(kind, kind)
    return "F16" if cols % BLOCK_VALUES[kind] else kind


def mix_types(shapes: dict, mix: str, n_layers: int, n_heads: int, n_kv_heads: int, arch: str) -> dict:
    """{2-D weight name: shape} -> {name: GGML type} as llama-quantize's `mix` chooses them."""
    base = MIXES[mix]
    tied = "output.weight" not in shapes
    n_v = sum("attn_v.weight" in n for n in shapes)
    seventy_b = n_layers == 80 and (arch == "qwen2" or n_heads != n_kv_heads)  # llama.cpp's LLM_TYPE_70B
    i_v = i_down = 0  # llama.cpp counts attn_v / ffn_down tensors as it meets them
    types = {}
    for name in sorted(shapes, key=lambda n: (layer_of(n), n)):
        kind = base
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            kind = "Q8_0" if shapes[name][-1] % QK_K else "Q6_K"
        elif "attn_v.weight" in name:
            if mix == "q2_k":
                kind = "Q4_K" if n_heads // n_kv_heads >= 4 else "Q3_K"  # llama.cpp's n_gqa()
            elif mix == "q3_k_m":
                kind = "Q5_K" if i_v < 2 else "Q4_K"
            elif mix == "q3_k_l":
                kind = "Q5_K"
            elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_v, n_v):
                kind = "Q6_K"
            elif mix == "q4_k_s" and i_v < 4:
                kind = "Q5_K"
            if seventy_b and kind in ("Q3_K", "Q4_K"):
                kind = "Q5_K"
            i_v += 1
        elif "ffn_down" in name:
            if mix == "q2_k":
                kind = "Q3_K"
            elif mix == "q3_k_m":
                kind = "Q5_K" if i_down < n_layers // 16 else "Q4_K"
            elif mix == "q3_k_l":
                kind = "Q5_K"
            elif mix in ("q4_k_m", "q5_k_m") and use_more_bits(i_down, n_layers):
                kind = "Q6_K"
            elif mix == "q4_k_s" and i_down < n_layers // 8:
                kind = "Q5_K"
            i_down += 1
        elif "attn_output.weight" in name:
            kind = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(mix, kind)
        types[name] = fitted(kind, shapes[name][-1])
    return {n: types[n] for n in shapes}


def gguf_types(shapes: dict, dtype: str, n_layers: int, n_heads: int, n_kv_heads: int, arch: str) -> dict:
    """{tensor name: shape} -> {name: GGML type name} for an export as `dtype` (PLAIN or MIXES)."""
    weights = {n: s for n, s in shapes.items() if len(s) == 2}
    if dtype in MIXES:
        types = mix_types(weights, dtype, n_layers, n_heads, n_kv_heads, arch)
    else:
        kind = dtype.upper()
        types = {n: kind if s[-1] % BLOCK_VALUES.get(kind, 1) == 0 else "F16" for n, s in weights.items()}
    return {n: types.get(n, "F32") for n in shapes}


def encode(a, kind: str):
    """float32 array -> (its data as GGML type `kind`, gguf's raw dtype or None for a plain float array)."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind == "F32":
        return a, None
    if kind == "F16":
        return a.astype(np.float16), None
    if kind in KINDS:  # fusegrad's kernels (gguf's NumPy quantizes no K-quant, and its Q8_0 ... are slower)
        return quantize_k(a, kind), qtype
    return gguf.quants.quantize(a, qtype), qtype
