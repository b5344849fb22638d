"""Reading and writing llama2.c `.bin` model files (versions 0 and 1); Hugging Face directories: hf.py; GGUF
files: gguf_file.py (reading), export.py (writing); Meta's .pth and llama2.c's ckpt.pt: meta_pth.py.

Everything passes through Hugging Face names and layout (see hf_names.py); llama2.c files store q/k in
the interleaved-pair layout, so they are permuted on the way in and out.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.fileio import atomic_write
from fusegrad.models.config import LlamaConfig
from fusegrad.models.gguf_file import GGUFCheckpoint
from fusegrad.models.gguf_reader import is_gguf
from fusegrad.models.hf import HFCheckpoint
from fusegrad.models.hf_names import from_hf, to_hf
from fusegrad.models.meta_pth import MetaCheckpoint, is_meta_checkpoint

LLAMA2C_MAGIC = 0x616B3432  # "ak42"


# -- llama2.c ---------------------------------------------------------------------------------------------
def _llama2c_layout(c: LlamaConfig):
    """(key, shape) of the per-kind arrays, each holding all layers."""
    L, C, KV, Hd = c.n_layers, c.dim, c.kv_dim, c.hidden_dim
    return {"emb": (c.vocab_size, C), "att_norm": (L, C), "wq": (L, C, C), "wk": (L, KV, C), "wv": (L, KV, C),
            "wo": (L, C, C), "ffn_norm": (L, C), "w1": (L, Hd, C), "w2": (L, C, Hd), "w3": (L, Hd, C),
            "norm": (C,), "freq": (2, c.max_seq_len, c.head_dim // 2), "cls": (c.vocab_size, C)}


ORDER_V0 = ["emb", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm", "freq"]
ORDER_V1 = ["att_norm", "ffn_norm", "norm", "emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def read_llama2c(path) -> tuple:
    """-> (LlamaConfig, HF state dict). Raises FormatError naming the file on a bad header or size."""
    path = os.fspath(path)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read llama2.c checkpoint: {exc}") from None
    if raw.size < 28:
        raise FormatError(f"{path}: too short ({raw.size} bytes) for a llama2.c header")
    magic = struct.unpack_from("<I", raw, 0)[0]
    if magic == LLAMA2C_MAGIC:
        version = struct.unpack_from("<i", raw, 4)[0]
        if version != 1:
            raise FormatError(f"{path}: llama2.c export version {version} is not supported (only 0 and 1; "
                              f"version 2 is int8-quantised)")
        dims = struct.unpack_from("<7i", raw, 8)
        shared = bool(raw[36])
        offset, order = 256, ORDER_V1
    else:
        dims = struct.unpack_from("<7i", raw, 0)
        shared = dims[5] > 0
        offset, order = 28, ORDER_V0
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = dims
    if min(dim, hidden, n_layers, n_heads, n_kv, abs(vocab), seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise FormatError(f"{path}: implausible llama2.c header {dims} (dim, hidden_dim, n_layers, n_heads, "
                          f"n_kv_heads, vocab_size, seq_len)")
    try:
        config = LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden,
                             vocab_size=abs(vocab), max_seq_len=seq_len, tie_embeddings=shared)
    except ConfigError as exc:
        raise FormatError(f"{path}: header {dims} is not a valid Llama: {exc}") from None
    layout = _llama2c_layout(config)
    order = order + ([] if shared else ["cls"])
    need = offset + 4 * sum(int(np.prod(layout[k])) for k in order)
    if raw.size != need:
        raise FormatError(f"{path}: size {raw.size} bytes, but header {dims} (version "
                          f"{1 if magic == LLAMA2C_MAGIC else 0}) needs {need}; truncated or not a llama2.c file")
    floats = np.frombuffer(raw, dtype="<f4", offset=offset)
    arrays, pos = {}, 0
    for key in order:
        n = int(np.prod(layout[key]))
        arrays[key] = floats[pos:pos + n].reshape(layout[key])
        pos += n
    bad = next((k for k in order if not np.isfinite(arrays[k]).all()), None)
    if bad:
        raise FormatError(f"{path}: tensor {bad!r} holds NaN or inf; nothing non-finite is loaded")
    # llama2.c's q/k rows are fusegrad's layout (interleaved-pair RoPE): fuse them, then name them as HF does
    params = {"tok_embeddings": arrays["emb"], "norm": arrays["norm"]}
    for i in range(n_layers):
        params.update({f"layers.{i}.attention_norm": arrays["att_norm"][i], f"layers.{i}.wo": arrays["wo"][i],
                       f"layers.{i}.wqkv": np.concatenate([arrays["wq"][i], arrays["wk"][i], arrays["wv"][i]]),
                       f"layers.{i}.ffn_norm": arrays["ffn_norm"][i], f"layers.{i}.w2": arrays["w2"][i],
                       f"layers.{i}.w13": np.concatenate([arrays["w1"][i], arrays["w3"][i]])})
    if not shared:
        params["output"] = arrays["cls"]
    return config, {k: np.asarray(v, dtype=np.float32) for k, v in to_hf(params, config).items()}


def save_llama2c(path, config: LlamaConfig, state: dict, version: int = 0) -> None:
    """Write a HF-named state dict as a llama2.c `.bin` of version 0 (what run.c reads) or 1, atomically."""
    c = config
    if version not in (0, 1):
        raise FormatError(f"save_llama2c: version must be 0 or 1, got {version}")
    if (c.rope_theta, c.norm_eps) != (10000.0, 1e-5):  # the .bin has no field for them; run.c hard-codes these
        raise FormatError(f"save_llama2c {path}: a llama2.c file implies rope_theta 10000 and norm_eps 1e-5, "
                          f"this model has {c.rope_theta} and {c.norm_eps}; use save_pretrained instead")
    if c.qkv_bias or c.rope_scaling:
        raise FormatError(f"save_llama2c {path}: a llama2.c file has no q/k/v biases nor RoPE scaling; "
                          f"use save_pretrained or GGUF instead")
    if c.q_dim != c.dim:  # run.c takes a head's size as dim / n_heads
        raise FormatError(f"save_llama2c {path}: a llama2.c file implies head_dim = dim / n_heads "
                          f"({c.dim} / {c.n_heads}), this model has head_dim {c.head_dim}; use save_pretrained "
                          f"or GGUF instead")

    p = from_hf(state, c)
    C, KV, Hd = c.dim, c.kv_dim, c.hidden_dim

    def layers(name, rows=slice(None)):
        return np.stack([p[f"layers.{i}.{name}"][rows] for i in range(c.n_layers)])

    arrays = {"emb": p["tok_embeddings"], "norm": p["norm"], "att_norm": layers("attention_norm"),
              "ffn_norm": layers("ffn_norm"), "wq": layers("wqkv", slice(0, C)), "wk": layers("wqkv", slice(C, C + KV)),
              "wv": layers("wqkv", slice(C + KV, None)), "wo": layers("wo"), "w1": layers("w13", slice(0, Hd)),
              "w2": layers("w2"), "w3": layers("w13", slice(Hd, None)),
              "freq": np.stack(c.rope_tables())}
    if not c.tie_embeddings:
        arrays["cls"] = p["output"]
    dims = [c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len]
    with atomic_write(path) as f:
        if version == 0:
            dims[5] = c.vocab_size if c.tie_embeddings else -c.vocab_size
            f.write(struct.pack("<7i", *dims))
            order = ORDER_V0
        else:
            header = struct.pack("<Ii7iB", LLAMA2C_MAGIC, 1, *dims, int(c.tie_embeddings))
            f.write(header + b"\0" * (256 - len(header)))
            order = ORDER_V1
        for key in order + ([] if c.tie_embeddings else ["cls"]):
            f.write(np.ascontiguousarray(arrays[key], dtype="<f4").tobytes())


class WeightBlock:
    """One allocation for many weights, each a view at a 64-byte-aligned offset. numpy asks the kernel to back
    an array this large with 2 MiB pages; weights under 4 MiB allocated on their own get 4 KiB pages, and a
    generated token, which streams every weight once, then spends ~5% of its GEMV time on TLB misses
    (docs/performance.md, "Generation, round 7").

    >>> block = WeightBlock({"a": (2, 3), "b": (5,)}, np.float32)
    >>> block.place("a", np.ones((2, 3))).base is block.array
    True
    """

    ALIGN = 64  # bytes

    def __init__(self, shapes: dict, dtype):
        self.dtype, self.offsets, end = np.dtype(dtype), {}, 0
        step = self.ALIGN // self.dtype.itemsize
        for name, shape in shapes.items():
            self.offsets[name] = end
            end += -(-int(np.prod(shape)) // step) * step
        self.array = np.empty(end + step, self.dtype)
        self.start = (-self.array.ctypes.data % self.ALIGN) // self.dtype.itemsize

    def place(self, name: str, array) -> np.ndarray:
        """Copy `array` into the slot of `name` (converting to the block's dtype) and return the slot."""
        lo = self.start + self.offsets[name]
        slot = self.array[lo:lo + array.size].reshape(array.shape)
        slot[...] = array
        return slot


def load_pretrained(path) -> tuple:
    """A llama2.c `.bin` file, a GGUF file, a Hugging Face directory, Meta's params.json + consolidated.00.pth
    or llama2.c's ckpt.pt -> (LlamaConfig, HF state dict, or a checkpoint that reads its tensors one at a time)."""
    path = os.fspath(path)
    if is_meta_checkpoint(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ckpt = MetaCheckpoint(path)
        return ckpt.config, ckpt
    if os.path.isdir(path) or is_gguf(path):
        ckpt = HFCheckpoint(path) if os.path.isdir(path) else GGUFCheckpoint(path)
        return ckpt.config, ckpt
    if not os.path.exists(path):
        raise FormatError(f"{path}: no such model file or directory")
    return read_llama2c(path)
