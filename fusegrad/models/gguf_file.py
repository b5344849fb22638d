"""GGUF files as llama.cpp's converter and quantizers publish them, read like a Hugging Face checkpoint.

Architectures llama and qwen2; weights in every type the gguf package dequantizes (F32, F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1, the K-quants, the IQ types), widened to float32 one tensor at a time; RoPE scaling from the
metadata (linear, YaRN) or from the rope_freqs.weight tensor (Llama 3.1). The tokenizer inside the file is
read by fusegrad.data.gguf_vocab. Facts: FORMATS.md.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.models.config import LlamaConfig, check_field, yarn_attention_factor
from fusegrad.models.gguf_reader import GGUFContents
from fusegrad.models.export import GGUF_PARTS
from fusegrad.models.hf_names import (HF_MODULES, check_hf_state, fused_parts, hf_shapes, part_heads, permute_from_hf,
                                      permute_to_hf)
from fusegrad.quant.ggml import FLOATS, FusedGGML, GGMLTensor, kept

ARCHS = ("llama", "qwen2")
# llama.cpp's names of the weights outside the blocks, and of the norms inside blk.{i} -> Hugging Face's
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
GGUF_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
# metadata that changes what the model computes, which a Llama here does not do: {key: the value that is harmless}
UNSUPPORTED = {"expert_count": 0, "attention.sliding_window": None, "attention.scale": None, "logit_scale": 1.0,
               "embedding_scale": 1.0, "residual_scale": 1.0, "attn_logit_softcapping": None,
               "final_logit_softcapping": None, "rope.scaling.yarn_log_multiplier": 0.0,
               "rope.scaling.yarn_attn_factor": 1.0}



def hf_tensor_name(gguf_name: str):
    """llama.cpp's name of a weight -> Hugging Face's, or None for a name no Llama weight has."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    blk, _, rest = gguf_name.partition(".")
    layer, _, rest = rest.partition(".")
    kind, _, what = rest.partition(".")
    if blk != "blk" or not layer.isdigit() or what not in ("weight", "bias"):
        return None
    if kind in GGUF_NORMS and what == "weight":
        return f"model.layers.{int(layer)}.{GGUF_NORMS[kind]}.weight"
    part = next((p for p, g in GGUF_PARTS.items() if g == kind), None)
    return None if part is None else f"model.layers.{int(layer)}.{HF_MODULES[part]}.{what}"


def read_metadata(path) -> dict:
    """{key: value} of a GGUF file's metadata (arrays as lists)."""
    return GGUFContents(path).metadata


class GGUFCheckpoint:
    """A GGUF file, opened: `.config`, and `[HF name]` dequantizes one tensor to float32 in Hugging Face's layout.

    Every tensor the config needs is checked (present, shape) and every tensor the file holds is known before
    any is read."""

    def __init__(self, path):
        self.path = path = os.fspath(path)
        self.file = GGUFContents(path)
        if self._value("split.count", int, 1) > 1:  # gguf-split's shards: each holds some of the tensors
            raise FormatError(f"{path}: one of {self._value('split.count', int)} GGUF shards; join them first "
                              f"(llama-gguf-split --merge FIRST-SHARD OUT.gguf)")
        self.arch = self._value("general.architecture", str)
        if self.arch not in ARCHS:
            raise FormatError(f"{path}: general.architecture = {self.arch!r} is not supported (fusegrad reads "
                              f"{', '.join(ARCHS)})")
        self.tensors, rope_freqs = {}, None
        for t in self.file.tensors.values():
            if t.name == "rope_freqs.weight":
                rope_freqs = self._dequantize(t)
                continue
            name = hf_tensor_name(t.name)
            qkv_bias = self.arch == "qwen2" and t.name.split(".")[2:] in (["attn_q", "bias"], ["attn_k", "bias"],
                                                                        ["attn_v", "bias"])
            if name is None or (name.endswith(".bias") and not qkv_bias):
                raise FormatError(f"{path}: tensor {t.name!r} is not part of a {self.arch} model fusegrad runs")
            self.tensors[name] = t
        self.config = self._config(rope_freqs)
        if self.config.tie_embeddings:
            self.tensors.pop("lm_head.weight", None)
        shapes = {n: t.shape for n, t in self.tensors.items()}
        check_hf_state(shapes, self.config, path)
        extra = sorted(set(shapes) - set(hf_shapes(self.config)))
        if extra:
            raise FormatError(f"{path}: tensor {extra[0]!r} is beyond the {self.config.n_layers} layers the metadata "
                              f"({self.arch}.block_count) gives")

    def _value(self, key: str, kind, default=...):
        value = self.file.metadata.get(key)
        if value is None:
            if default is ...:
                raise FormatError(f"{self.path}: metadata key {key!r} is missing")
            return default
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(f"{value:.7g}")  # float32 in the file: 1e-5, not 9.999999747378752e-06
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"{self.path}: metadata key {key!r} = {str(value)[:80]} is not a {kind.__name__}")
        return value

    def _config(self, rope_freqs) -> LlamaConfig:
        a, path = self.arch, self.path
        for key, harmless in UNSUPPORTED.items():
            value = self._value(f"{a}.{key}", object, None)
            if value is not None and value != harmless:
                raise FormatError(f"{path}: metadata {a}.{key} = {str(value)[:80]} is not supported (a Llama "
                                  f"here has no such setting)")

        def get(key, ours, kind=int, default=...):
            return check_field(ours, self._value(f"{a}.{key}", kind, default), path, f"{a}.{key}", FormatError)

        dim, heads = get("embedding_length", "dim"), get("attention.head_count", "n_heads")
        head_dim = get("attention.key_length", "head_dim", default=None)
        if get("attention.value_length", "head_dim", default=head_dim) != head_dim:
            raise FormatError(f"{path}: {a}.attention.value_length differs from key_length; a Llama's heads are "
                              f"one size")
        rotated = get("rope.dimension_count", "head_dim", default=None)
        if rotated is not None and rotated != (head_dim or dim // heads):
            raise FormatError(f"{path}: {a}.rope.dimension_count = {rotated} rotates part of a head; fusegrad "
                              f"rotates whole heads ({head_dim or dim // heads})")
        embd = self.tensors.get("model.embed_tokens.weight")
        if embd is None:
            raise FormatError(f"{path}: no tensor 'token_embd.weight'")
        vocab = int(embd.shape[0])
        max_len = get("context_length", "max_seq_len")
        theta = get("rope.freq_base", "rope_theta", float, 10000.0)
        try:
            return LlamaConfig(dim=dim, n_layers=get("block_count", "n_layers"), n_heads=heads,
                               n_kv_heads=get("attention.head_count_kv", "n_kv_heads", default=heads),
                               head_dim=head_dim, hidden_dim=get("feed_forward_length", "hidden_dim"),
                               vocab_size=vocab, max_seq_len=max_len, rope_theta=theta,
                               norm_eps=get("attention.layer_norm_rms_epsilon", "norm_eps", float),
                               tie_embeddings="lm_head.weight" not in self.tensors, qkv_bias=a == "qwen2",
                               rope_scaling=self._rope_scaling(rope_freqs, head_dim or dim // heads, theta))
        except ConfigError as exc:
            raise FormatError(f"{path}: not a valid Llama: {exc}") from None

    def _rope_scaling(self, rope_freqs, head_dim: int, theta: float):
        """LlamaConfig.rope_scaling from the metadata (linear, yarn) or rope_freqs.weight (llama3), or None."""
        a = self.arch
        kind = self._value(f"{a}.rope.scaling.type", str, None)
        factor = self._value(f"{a}.rope.scaling.factor", float, None)
        if kind is None and self._value(f"{a}.rope.scale_linear", float, None):  # older files
            kind, factor = "linear", self._value(f"{a}.rope.scale_linear", float)
        if kind not in (None, "none", "linear", "yarn"):
            raise FormatError(f"{self.path}: {a}.rope.scaling.type = {kind!r} is not supported (only linear and yarn)")
        if rope_freqs is not None:
            if kind not in (None, "none"):
                raise FormatError(f"{self.path}: rope_freqs.weight and {a}.rope.scaling.type = {kind!r} together")
            return llama3_scaling(rope_freqs, head_dim, theta, self.path)
        attention = self._value(f"{a}.rope.scaling.attn_factor", float, 1.0)  # times YaRN's own
        if attention != 1.0 and kind != "yarn":
            raise FormatError(f"{self.path}: {a}.rope.scaling.attn_factor = {attention} without YaRN is not supported")
        if kind in (None, "none") or factor in (None, 1.0):
            return None
        if kind == "linear":
            return {"type": "linear", "factor": factor}
        return {"type": "yarn", "factor": factor,
                "original_max_len": self._value(f"{a}.rope.scaling.original_context_length", int),
                "beta_fast": self._value(f"{a}.rope.scaling.yarn_beta_fast", float, 32.0),
                "beta_slow": self._value(f"{a}.rope.scaling.yarn_beta_slow", float, 1.0), "truncate": True,
                "attention_factor": attention * yarn_attention_factor(factor)}

    def _dequantize(self, t) -> np.ndarray:
        import gguf

        qtype = gguf.GGMLQuantizationType(t.qtype)
        try:
            with np.errstate(invalid="ignore", over="ignore"):  # a non-finite scale is refused below, by name
                a = gguf.quants.dequantize(self.file.raw(t), qtype)
        except NotImplementedError:
            raise FormatError(f"{self.path}: tensor {t.name!r} is {qtype.name}, a type the gguf package cannot "
                              f"dequantize") from None
        a = np.asarray(a, dtype=np.float32).reshape(t.shape)
        if not np.isfinite(a).all():
            raise FormatError(f"{self.path}: tensor {t.name!r} holds NaN or inf; nothing non-finite is loaded")
        return a

    def __getitem__(self, name: str) -> np.ndarray:
        a = self._dequantize(self.tensors[name])
        part = next((p for p, m in HF_MODULES.items() if f".{m}." in name), None)
        heads = part_heads(self.config, part) if part else None
        # llama.cpp's llama rotates interleaved pairs: its q/k rows are llama2.c's, permuted here to HF's;
        # its qwen2 rotates halves and keeps HF's rows
        return permute_to_hf(a, heads) if heads and self.arch == "llama" else a

    def state(self) -> dict:
        return {name: self[name] for name in self.tensors}

    def keep_quantized(self, config, kind: str, names: list):
        """The fused projection `kind` (wqkv, wo, w13, w2) of HF modules `names` as the file's own blocks, copied
        into memory (FusedGGML), or None when every module is F32/F16/BF16 (NF4 holds them in fewer bits) or
        one is in a type no kernel decodes (Q2_K, Q3_K, IQ*: dequantized and quantized to NF4 instead).

        Float modules beside quantized ones are kept as stored too. The rows stay the file's: llama.cpp's llama
        q/k rows are fusegrad's own (interleaved-pair RoPE; __getitem__'s permute_to_hf and from_hf's
        permute_from_hf cancel), qwen2's are Hugging Face's and get a row map."""
        infos = [self.tensors[n] for n in names]
        if all(t.qtype in FLOATS for t in infos) or not all(kept(t.qtype) for t in infos):
            return None
        parts = []
        for t, (_, _, heads) in zip(infos, fused_parts(config, kind)):
            unpermute = functools.partial(permute_from_hf, n_heads=heads) if heads and self.arch != "llama" else None
            parts.append((GGMLTensor(np.array(self.file.raw(t)), t.qtype, t.shape,
                                     f"{self.path}: tensor {t.name!r}"), unpermute))
        return FusedGGML(parts)


def llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path) -> dict:
    """Llama 3.1's rope_scaling that gives rope_freqs.weight (what llama.cpp divides each frequency by).

    Only two ratios, original_max_len / low_freq_factor and original_max_len / high_freq_factor, shape the
    factors, so low_freq_factor is taken as 1: Llama 3.x's own numbers (8192, 1, 4) are tried first, else the
    two ratios are fitted from the blended frequencies. FormatError when no such scaling gives the factors."""
    factors = np.asarray(factors, dtype=np.float64).ravel()
    probe = LlamaConfig(dim=head_dim, n_layers=1, n_heads=1, rope_theta=theta)
    freqs = probe.rope_frequencies(scaled=False)
    if factors.shape != freqs.shape or not (factors >= 1 - 1e-6).all():
        raise FormatError(f"{path}: rope_freqs.weight {factors.shape} does not scale the {freqs.shape[0]} RoPE "
                          f"frequencies of a head of {head_dim} as Llama 3.1 does (factors >= 1, one per pair)")
    factor = float(f"{factors.max():.7g}")
    candidates = [(8192, 4.0)]
    blend = (factors > 1 + 1e-5) & (factors < factor * (1 - 1e-5))
    if blend.sum() >= 2:  # 1/r = (1 - s)/factor + s with s = (n w - 1)/(hi - 1), w = freq / 2 pi: a line in w
        s = (1 / factors[blend] - 1 / factor) / (1 - 1 / factor)
        slope, icpt = np.polyfit(freqs[blend] / (2 * np.pi), s, 1)  # s = slope w + icpt; icpt = -1/(hi - 1)
        if icpt < 0:
            n = float(-slope / icpt)
            candidates.append((round(n) if abs(n - round(n)) < 1e-3 * n else n, float(f"{1 - 1 / icpt:.6g}")))
    for n, hi in candidates:
        scaling = {"type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": hi,
                   "original_max_len": n}
        try:
            made = freqs / LlamaConfig(dim=head_dim, n_layers=1, n_heads=1, rope_theta=theta,
                                       rope_scaling=scaling).rope_frequencies()
        except ConfigError:
            continue
        if np.allclose(made, factors, rtol=1e-4):
            return scaling
    raise FormatError(f"{path}: rope_freqs.weight is not Llama 3.1's RoPE scaling (factors "
                      f"{np.round(factors[:4], 4).tolist()}...); fusegrad cannot run it")
