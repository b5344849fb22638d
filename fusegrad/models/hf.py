"""Hugging Face checkpoints as published: config.json of the Llama family (Llama 2/3.x, SmolLM, TinyLlama,
Mistral, Qwen2) and safetensors weights in bf16, fp16 or fp32, one file or sharded.

The safetensors files are read here, not with safetensors.numpy (which has no bf16): every header is
checked against the file size and the config before anything is allocated, then tensors are read one at a
time with plain reads (no mapping: a QLoRA load never has the whole model resident). Facts: FORMATS.md.

>>> hf_config(LlamaConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64))["num_key_value_heads"]
4
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.fileio import atomic_write, read_json_object
from fusegrad.core.settings import check_value
from fusegrad.models.config import LlamaConfig, check_field, yarn_attention_factor
from fusegrad.models.hf_names import check_hf_state
from fusegrad.models.torch_pickle import is_legacy_torch, torch_pickle_entries

ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # bf16: raw 16 bits
ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MAX_HEADER = 100 << 20


# -- config.json ---------------------------------------------------------------------------------------
def config_from_hf(d: dict, path="config.json") -> LlamaConfig:
    """A Llama-family config.json -> LlamaConfig; FormatError naming the field for what fusegrad cannot run."""
    def refuse(field, why):
        raise FormatError(f"{path}: {field} = {d.get(field)!r} is not supported ({why})")

    archs = d.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch is not None and arch not in ARCHITECTURES:
        refuse("architectures", f"fusegrad runs {', '.join(ARCHITECTURES)}")
    model_type = d.get("model_type", ARCHITECTURES.get(arch, "llama"))
    if model_type not in ARCHITECTURES.values():
        refuse("model_type", f"fusegrad runs {', '.join(ARCHITECTURES.values())}")
    if d.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the Llama MLP is SwiGLU with silu")
    if d.get("mlp_bias"):
        refuse("mlp_bias", "MLP projections without biases only")
    qkv_bias = model_type == "qwen2"  # Qwen2 always has q/k/v biases and none on o_proj
    if d.get("attention_bias"):
        refuse("attention_bias", "Llama's attention_bias also puts a bias on o_proj")
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older files rope_theta/rope_scaling
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or rope
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    if not isinstance(rope, dict) or not isinstance(scaling, dict):
        refuse(field, "not a JSON object")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3", "linear", "yarn", "dynamic"):
        raise FormatError(f"{path}: {field}.rope_type = {rope_type!r} is not supported (only 'default', 'llama3', "
                          f"'linear', 'yarn' and 'dynamic')")
    def get(hf_name, ours, default=None):  # a field of the file, checked as LlamaConfig's field `ours`
        if default is None and hf_name not in d:
            raise FormatError(f"{path}: missing key {hf_name!r} of a Llama config")
        return check_field(ours, d.get(hf_name, default), path, hf_name, FormatError)

    dim, heads = get("hidden_size", "dim"), get("num_attention_heads", "n_heads")
    max_len = get("max_position_embeddings", "max_seq_len", 2048)
    rope_scaling = None if rope_type == "default" else _rope_scaling(rope_type, scaling, max_len, field, path)
    window = d.get("sliding_window")
    if window is not None and d.get("use_sliding_window", model_type == "mistral") and (
            not isinstance(window, int) or window < max_len):
        refuse("sliding_window", f"a window shorter than max_position_embeddings {max_len}: "
                                 f"fusegrad attends to the whole context")
    theta = get("rope_theta", "rope_theta", rope.get("rope_theta", 10000.0))
    try:
        return LlamaConfig(dim=dim, n_layers=get("num_hidden_layers", "n_layers"), n_heads=heads,
                           n_kv_heads=get("num_key_value_heads", "n_kv_heads", heads),
                           head_dim=check_field("head_dim", d.get("head_dim"), path, "head_dim", FormatError),
                           hidden_dim=get("intermediate_size", "hidden_dim"), vocab_size=get("vocab_size", "vocab_size"),
                           max_seq_len=max_len, rope_theta=theta, norm_eps=get("rms_norm_eps", "norm_eps", 1e-6),
                           tie_embeddings=get("tie_word_embeddings", "tie_embeddings", False), qkv_bias=qkv_bias,
                           rope_scaling=rope_scaling)
    except ConfigError as exc:
        raise FormatError(f"{path}: not a valid Llama config: {exc}") from None


def _rope_scaling(rope_type: str, scaling: dict, max_len: int, field: str, path) -> dict:
    """config.json's RoPE scaling -> LlamaConfig.rope_scaling, every value checked; YaRN's attention factor is
    worked out here as transformers does (from mscale / mscale_all_dim, else 0.1 ln(factor) + 1)."""
    def value(src, kind=float, default=None):
        given = scaling.get(src)
        return check_value(f"{field} of rope_type {rope_type!r} lacks a valid {src}:",
                           default if given is None else given, kind, "(0, inf)", path, error=FormatError)

    if rope_type == "linear":
        return {"type": "linear", "factor": value("factor")}
    if rope_type == "dynamic":  # transformers rescales past max_position_embeddings
        return {"type": "dynamic", "factor": value("factor"), "original_max_len": max_len}
    if rope_type == "llama3":
        return {"type": "llama3", "factor": value("factor"), "low_freq_factor": value("low_freq_factor"),
                "high_freq_factor": value("high_freq_factor"),
                "original_max_len": value("original_max_position_embeddings", int)}
    n = value("original_max_position_embeddings", int)
    factor = value("factor", default=max_len / n)  # DeepSeek-style files give only the lengths

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention = (yarn_attention_factor(factor, m) / yarn_attention_factor(factor, m_all) if m and m_all
                 else yarn_attention_factor(factor))
    return {"type": "yarn", "factor": factor, "original_max_len": n, "beta_fast": value("beta_fast", default=32.0),
            "beta_slow": value("beta_slow", default=1.0), "truncate": bool(scaling.get("truncate", True)),
            "attention_factor": value("attention_factor", default=attention)}


def hf_config(c: LlamaConfig, bos_id=1, eos_id=2, dtype: str = "float32") -> dict:
    """config.json for transformers: LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v carry biases."""
    d = {"architectures": ["Qwen2ForCausalLM" if c.qkv_bias else "LlamaForCausalLM"],
         "model_type": "qwen2" if c.qkv_bias else "llama", "hidden_size": c.dim,
         "intermediate_size": c.hidden_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
         "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
         "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
         "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
         "mlp_bias": False, "torch_dtype": dtype, "bos_token_id": bos_id, "eos_token_id": eos_id}
    if c.rope_scaling:
        s = {("original_max_position_embeddings" if k == "original_max_len" else k): v
             for k, v in c.rope_scaling.items() if k != "type"}
        d["rope_scaling"] = {"rope_type": c.rope_scaling.get("type", "llama3"), **s}
        if d["rope_scaling"]["rope_type"] == "dynamic":  # transformers' threshold is max_position_embeddings
            d["max_position_embeddings"] = d["rope_scaling"].pop("original_max_position_embeddings")
    return d


# -- safetensors ---------------------------------------------------------------------------------------
def safetensors_entries(path) -> dict:
    """{name: (dtype tag, shape, absolute offset)} from a safetensors header, every entry checked
    against the file: dtype one of F32/F16/BF16, byte range inside the file and matching the shape."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= n <= min(size - 8, MAX_HEADER):
                raise FormatError(f"{path}: corrupt safetensors file: header length {n} for a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: corrupt safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupt safetensors file: the header is not a JSON object")
    out, data = {}, 8 + n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (lo, hi) = str(e["dtype"]), tuple(int(s) for s in e["shape"]), map(int, e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: corrupt safetensors file: bad header entry for {name!r}: {e!r}") from None
        if tag not in ST_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has dtype {tag}; fusegrad reads F32, F16 and BF16 weights")
        nbytes = int(np.prod(shape, dtype=np.int64)) * ST_DTYPES[tag].itemsize
        if min(shape, default=0) < 0 or not 0 <= lo <= hi <= size - data or hi - lo != nbytes:
            raise FormatError(f"{path}: corrupt safetensors file: tensor {name!r} {tag} {shape} has byte range "
                              f"[{lo}, {hi}) in a {size - data}-byte data section")
        out[name] = (tag, shape, data + lo)
    return out


def read_tensor(path, name: str, entry: tuple) -> np.ndarray:
    """One tensor as float32 (bf16/fp16 widened exactly); FormatError naming it if it holds NaN or inf."""
    tag, shape, offset = entry
    raw = np.fromfile(path, dtype=ST_DTYPES[tag], count=int(np.prod(shape, dtype=np.int64)), offset=offset)
    if tag == "BF16":
        a = raw.astype(np.uint32)
        a <<= 16
        a = a.view(np.float32)
    else:
        a = raw.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise FormatError(f"{path}: tensor {name!r} holds NaN or inf; nothing non-finite is loaded")
    return a.reshape(shape)


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even as torch does."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path, state: dict, dtype: str = "float32") -> None:
    """Write {name: array} as one safetensors file in float32, float16 or bfloat16, atomically."""
    tag = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype)
    if tag is None:
        raise ConfigError(f"safetensors dtype must be float32, float16 or bfloat16, got {dtype!r}")
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, a in state.items():
        nbytes = int(np.size(a)) * (4 if tag == "F32" else 2)
        header[name] = {"dtype": tag, "shape": list(np.shape(a)), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for a in state.values():
            a = np.asarray(a, dtype=np.float32)
            if not np.isfinite(a).all():
                raise FormatError(f"{path}: refusing to save a tensor holding NaN or inf")
            f.write(to_bf16(a).tobytes() if tag == "BF16" else a.astype("<f4" if tag == "F32" else "<f2").tobytes())


def weight_files(directory) -> list:
    """The weight files of a Hugging Face directory: the shards its index names, else every file. safetensors
    first; else pytorch_model*.bin (torch.save's zip archives, read without running their pickle)."""
    for index_name, pattern in (("model.safetensors.index.json", ".safetensors"), ("pytorch_model.bin.index.json",
                                                                                   ".bin")):
        index = os.path.join(directory, index_name)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise FormatError(f"{index}: cannot read the shard index (weight_map): {exc}") from None
            bad = [n for n in files if not isinstance(n, str) or os.path.basename(n) != n]
            if bad:
                raise FormatError(f"{index}: weight_map names {bad[0]!r}, not a file name in {directory}")
            missing = [n for n in files if not os.path.isfile(os.path.join(directory, n))]
            if missing:
                raise FormatError(f"{index}: weight_map names shard {missing[0]!r}, which is not in {directory}")
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(pattern) and (
                not n.startswith("adapter") if pattern == ".safetensors" else n.startswith("pytorch_model")))
        if files:
            paths = [os.path.join(directory, n) for n in files]
            legacy = [p for p in paths if p.endswith(".bin") and is_legacy_torch(p)]
            if legacy:
                raise FormatError(f"{legacy[0]}: not a zip archive: torch < 1.6's legacy pickle format, which "
                                  f"fusegrad does not read; load it in torch and save it again (safetensors)")
            return paths
    raise FormatError(f"{directory}: no weights (*.safetensors, or pytorch_model*.bin)")


class HFCheckpoint:
    """A Hugging Face directory, opened: `.config`, and `[name]` reads one tensor as float32.

    Weights: safetensors shards, or older checkpoints' pytorch_model*.bin (weight_files). Every tensor the config
    needs is checked (present, shape) before any is read."""

    def __init__(self, directory):
        self.directory = directory = os.fspath(directory)
        cfg_path = os.path.join(directory, "config.json")
        self.config = config_from_hf(read_json_object(cfg_path, "the model config"), cfg_path)
        self.entries = {}  # name -> (path, (tag, shape, offset))
        files = weight_files(directory)
        for path in files:
            entries = safetensors_entries(path) if path.endswith(".safetensors") else torch_pickle_entries(path)
            self.entries.update({k: (path, e) for k, e in entries.items()})
        if self.config.tie_embeddings:
            self.entries.pop("lm_head.weight", None)
        kind = "*.safetensors" if files[0].endswith(".safetensors") else "pytorch_model*.bin"
        check_hf_state({k: e[1][1] for k, e in self.entries.items()}, self.config, f"{directory} ({kind})")

    def __getitem__(self, name: str) -> np.ndarray:
        path, entry = self.entries[name]
        return read_tensor(path, name, entry)

    def state(self) -> dict:
        return {name: self[name] for name in self.entries}


def save_hf(directory, config: LlamaConfig, state: dict, dtype: str = "float32", bos_id=1, eos_id=2) -> None:
    os.makedirs(directory, exist_ok=True)
    write_safetensors(os.path.join(directory, "model.safetensors"), state, dtype)
    with atomic_write(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(config, bos_id, eos_id, dtype), f, indent=2)
