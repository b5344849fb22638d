"""Exports a model (and its tokenizer) for other runtimes: a Hugging Face directory, llama2.c's `.bin`
(version 0, what run.c reads) with tokenizer.bin, or GGUF for llama.cpp (F32, F16, BF16, Q8_0, Q5_0 or Q4_0:
a tensor whose rows are no whole number of blocks stays F16, as llama.cpp's converter keeps it; or llama-quantize's
K-quant file types Q2_K, Q3_K_S, Q3_K_M, Q3_K_L, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K, tensor for tensor:
models/gguf_types.py).

The tokenizer is duck-typed (fusegrad.data's tokenizers, which live above this layer): `.bos_id`,
`.eos_ids`, `.kind`, `.save(dir)`, and for GGUF / tokenizer.bin its vocabulary: `.hf` (a `tokenizers`
Tokenizer: byte-level BPE), `.sp` (a sentencepiece processor) or `.pieces` + `.scores` (llama2.c); the byte
tokenizer (kind "byte") becomes sentencepiece pieces that llama.cpp's byte fallback reads byte for byte.

GGUF facts (FORMATS.md): llama.cpp's llama rotates interleaved pairs like llama2.c, which is fusegrad's own
q/k row layout, so attn_q / attn_k are fusegrad's rows as they are (Hugging Face's are permuted back).
Norms stay F32 in every file type, as llama.cpp's converter writes them. Llama 3.1's RoPE scaling is the
`rope_freqs.weight` tensor (each frequency's divisor), as llama.cpp's converter writes it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.fileio import atomic_write
from fusegrad.models.config import yarn_attention_factor
from fusegrad.models.generate import GGUF_SAMPLING_KEYS
from fusegrad.models.gguf_types import MIXES, PLAIN, encode, gguf_types
from fusegrad.models.hf_names import fused_parts, part_heads, permute_to_hf

FORMATS = ("hf", "llama2c", "gguf")
GGUF_DTYPES = PLAIN + tuple(MIXES)  # llama.cpp's converter's types; llama-quantize's K-quant mixes
HF_DTYPES = ("float32", "bfloat16", "float16")


def export_model(model, out, format: str, tokenizer=None, dtype: str | None = None, sampling=None) -> list:
    """Write `model` as `format` to `out` (a directory for "hf", a file otherwise) -> the paths written.
    Adapters must be merged first (Lora.merge, or peft_io.merge_adapter). sampling: {Sampling field: value} the
    model declares (generate.declared_sampling), carried into generation_config.json or GGUF's sampling keys."""
    out = os.fspath(out)
    if format not in FORMATS:
        raise ConfigError(f"export: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if model.adapters:
        raise ConfigError("export: the model has unmerged adapters; merge them first (Lora.merge())")
    if tokenizer is not None and getattr(tokenizer, "vocab_size", model.config.vocab_size) > model.config.vocab_size:
        raise ConfigError(f"export: the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary only "
                          f"{model.config.vocab_size}")
    if format == "hf":
        return export_hf(model, out, tokenizer, dtype or "float32", sampling)
    if format == "llama2c":
        if dtype not in (None, "f32", "float32"):
            raise ConfigError(f"export: llama2.c files hold float32 only, not {dtype!r}")
        model.save_llama2c(out, version=0)
        written = [out]
        if tokenizer is not None and getattr(tokenizer, "kind", "") in ("sentencepiece", "llama2c"):
            written.append(os.path.join(os.path.dirname(out) or ".", "tokenizer.bin"))
            write_tokenizer_bin(written[-1], *llama2c_pieces(tokenizer))
        return written
    write_gguf(model, out, tokenizer, dtype or "f16", sampling)
    return [out]


# -- Hugging Face ----------------------------------------------------------------------------------------
def _special_ids(tokenizer) -> tuple:
    """(bos id, eos id or list of ids, pad id) of the tokenizer; llama2.c's 1 and 2 without one."""
    if tokenizer is None:
        return 1, 2, None
    eos = list(tokenizer.eos_ids)
    return tokenizer.bos_id, (eos[0] if len(eos) == 1 else eos or None), getattr(tokenizer, "pad_id", None)


def export_hf(model, directory, tokenizer, dtype, sampling=None) -> list:
    if dtype not in HF_DTYPES:
        raise ConfigError(f"export: a Hugging Face directory holds {', '.join(HF_DTYPES)} weights, not {dtype!r}")
    bos, eos, pad = _special_ids(tokenizer)
    model.save_pretrained(directory, dtype=dtype, bos_id=bos, eos_id=eos)
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad if pad is not None else None}
    if sampling:  # temperature 0 is transformers' greedy decoding
        greedy = sampling.get("temperature") == 0
        window = sampling.get("repeat_last_n", -1)
        if window == -1 or window >= model.config.max_seq_len:  # the whole context: transformers' own penalty
            sampling = {k: v for k, v in sampling.items() if k != "repeat_last_n"}
        gen |= {"do_sample": not greedy} | {k: v for k, v in sampling.items() if not (greedy and k == "temperature")}
    with atomic_write(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in gen.items() if v is not None}, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(directory)
    return [directory]


# -- llama2.c tokenizer.bin ----------------------------------------------------------------------------
def llama2c_pieces(tokenizer) -> tuple:
    """(pieces as bytes, scores) as llama2.c's tokenizer.py exports a sentencepiece model: '▁' -> ' ',
    BOS -> '\\n<s>\\n', EOS -> '\\n</s>\\n'."""
    if hasattr(tokenizer, "pieces"):
        return tokenizer.pieces, tokenizer.scores
    sp = tokenizer.sp
    pieces = []
    for i in range(sp.vocab_size()):
        piece = "\n<s>\n" if i == sp.bos_id() else "\n</s>\n" if i == sp.eos_id() else sp.id_to_piece(i)
        pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
    return pieces, [sp.get_score(i) for i in range(sp.vocab_size())]


def write_tokenizer_bin(path, pieces, scores) -> None:
    """uint32 max piece length, then per token: float32 score, int32 byte length, the bytes."""
    with atomic_write(path) as f:
        f.write(struct.pack("<I", max((len(p) for p in pieces), default=0)))
        for p, s in zip(pieces, scores, strict=True):
            f.write(struct.pack("<fi", s, len(p)) + p)


# -- GGUF ----------------------------------------------------------------------------------------------
# tokenizer.json's pre-tokenizer steps -> llama.cpp's name for the same text split (`tokenizer.ggml.pre`)
GPT2_SPLIT = ("ByteLevel", True)
LLAMACPP_PRE = {
    (GPT2_SPLIT,): "gpt-2",
    (("Digits", True), GPT2_SPLIT): "smollm",  # each digit on its own, then GPT-2's split (StarCoder's too)
    (("Split", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+"), ("ByteLevel", False)): "llama-bpe",  # Llama 3
    (("Split", r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+"), ("ByteLevel", False)): "qwen2",
}


def llamacpp_pre(spec: dict) -> str:
    """llama.cpp's name for how tokenizer.json `spec` splits text before its merges; FormatError for a split
    it has no name for here, which llama.cpp would tokenize differently."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    key = tuple((s.get("type"), s.get("use_regex", True) if s.get("type") == "ByteLevel" else
                 s.get("individual_digits") if s.get("type") == "Digits" else
                 (s.get("pattern") or {}).get("Regex")) for s in steps)
    if key not in LLAMACPP_PRE:
        raise FormatError(f"export gguf: tokenizer.json's pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp "
                          f"name here (GPT-2's, SmolLM's, Llama 3's, Qwen2's); llama.cpp would split text otherwise")
    return LLAMACPP_PRE[key]


def _sentencepiece_scores(spec: dict, tokens: dict, merges: list, types: dict) -> tuple:
    """(scores, types) that make llama.cpp's sentencepiece tokenizer, which joins the neighbours whose union
    scores highest, merge as a byte-fallback BPE tokenizer.json does: a token scores minus the rank of the merge
    that makes it; pieces no merge makes score 0; <0xXX> pieces are bytes, the unknown token is unknown."""
    made = {m.replace(" ", "", 1): -float(rank) for rank, m in reversed(list(enumerate(merges)))}
    unk = spec["model"].get("unk_token")
    kinds = {i: 6 if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else 2 if t == unk else 1
             for i, t in tokens.items()}
    kept = {i: kind for i, kind in kinds.items() if kind != 1}  # unknown and bytes, even among the added tokens
    return [made.get(tokens.get(i), 0.0) for i in range(max(tokens) + 1)], {**kinds, **types, **kept}


def _prepends_space(spec: dict) -> bool:
    """Whether tokenizer.json puts "▁" before the text (a Prepend normalizer, or a Metaspace that prepends)."""
    steps = []
    for part in (spec.get("normalizer"), spec.get("pre_tokenizer")):
        part = part or {}
        steps += part.get("normalizers") or part.get("pretokenizers") or [part]
    return any(p.get("type") == "Prepend" or p.get("type") == "Metaspace" and p.get("add_prefix_space", True)
               and p.get("prepend_scheme", "always") != "never" for p in steps)


def byte_pieces() -> list:
    """The 256 sentencepiece pieces a byte tokenizer is written as: printable ASCII as itself (space as "▁"),
    every other byte as llama.cpp's byte-fallback piece <0xXX>."""
    return ["\u2581" if b == 0x20 else chr(b) if 0x20 < b < 0x7F else f"<0x{b:02X}>" for b in range(256)]


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """GGUF tokenizer metadata: model ("gpt2" byte-level BPE | "llama" sentencepiece), tokens, scores,
    token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), merges, padded to vocab_size."""
    scores = merges = pre = space_prefix = None  # space_prefix None: llama.cpp's default for the model
    if hasattr(tokenizer, "hf"):
        spec = json.loads(tokenizer.hf.to_str())
        if spec["model"]["type"] != "BPE":
            raise FormatError(f"export gguf: a {spec['model']['type']} tokenizer.json has no GGUF form here "
                              f"(byte-level BPE or sentencepiece only)")
        tokens = {i: t for t, i in spec["model"]["vocab"].items()}
        types = {}
        for added in spec.get("added_tokens", []):
            tokens[added["id"]] = added["content"]
            types[added["id"]] = 3 if added.get("special") else 4
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        if spec["model"].get("byte_fallback"):  # Llama 2's / Mistral's fast tokenizer: sentencepiece pieces
            scores, types = _sentencepiece_scores(spec, tokens, merges, types)
            merges, space_prefix = None, _prepends_space(spec)
        else:
            pre = llamacpp_pre(spec)
    elif hasattr(tokenizer, "sp"):
        sp = tokenizer.sp
        n = sp.vocab_size()
        tokens = {i: sp.id_to_piece(i) for i in range(n)}
        scores = [sp.get_score(i) for i in range(n)]
        types = {i: 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)}
    elif hasattr(tokenizer, "pieces"):  # llama2.c's pieces: ' ' back to '▁', its BOS/EOS back to <s> / </s>
        names = {0: "<unk>", tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
        tokens = {i: names.get(i) or p.decode("utf-8", "replace").replace(" ", "\u2581")
                  for i, p in enumerate(tokenizer.pieces)}
        types = {i: 2 if i == 0 else 3 if i in names else 6 if len(p) == 6 and p.startswith(b"<0x") else 1
                 for i, p in enumerate(tokenizer.pieces)}
        scores = list(tokenizer.scores)
    elif getattr(tokenizer, "kind", "") == "byte":  # sentencepiece pieces llama.cpp's byte fallback reads as bytes
        specials = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>"}
        tokens = dict(enumerate(byte_pieces()))
        types = {b: 1 if 0x20 <= b < 0x7F else 6 for b in range(256)}
        tokens.update(specials)
        types.update({i: 3 for i in specials})
        scores, space_prefix = [0.0] * len(tokens), False  # a space is its own byte, not a word's prefix
    else:
        raise FormatError(f"export gguf: a {getattr(tokenizer, 'kind', type(tokenizer).__name__)} tokenizer has no "
                          f"vocabulary to write (byte-level BPE, sentencepiece or llama2.c tokenizers only)")
    model = "gpt2" if merges is not None else "llama"
    if len(tokens) > vocab_size or max(tokens) >= vocab_size:
        raise FormatError(f"export gguf: the tokenizer's ids reach {max(tokens)}, "
                          f"the model's vocabulary is {vocab_size}")
    out = {"model": model, "tokens": [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)],
           "types": [types.get(i, 1 if i in tokens else 5) for i in range(vocab_size)], "merges": merges,
           "scores": None if scores is None else scores + [-1e4] * (vocab_size - len(scores)), "pre": pre,
           "space_prefix": space_prefix}
    return out


GGUF_PARTS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
              "down": "ffn_down"}  # projection part -> llama.cpp's tensor name inside blk.{i}


def gguf_arch(config) -> str:
    """llama.cpp's architecture for a model of `config`: qwen2 when q/k/v carry biases, else llama."""
    return "qwen2" if config.qkv_bias else "llama"


def gguf_rows(config, part: str, a):
    """A projection part's rows (or bias) in llama.cpp's order: fusegrad's own for its llama, which rotates pairs
    as llama2.c does; Hugging Face's for its qwen2, which rotates halves."""
    heads = part_heads(config, part)
    return permute_to_hf(a, heads) if heads and gguf_arch(config) == "qwen2" else a


@contextlib.contextmanager
def gguf_file(path, arch: str):
    """A GGUFWriter for `arch` whose file appears at `path` only once written whole (a temporary file, renamed)."""
    import gguf

    tmp = f"{path}.tmp{os.getpid()}"
    w = gguf.GGUFWriter(tmp, arch)
    try:
        yield w
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_gguf(model, path, tokenizer, dtype: str, sampling=None) -> None:
    """GGUF v3 for llama.cpp's llama architecture (qwen2 for a model with q/k/v biases), written with the gguf
    package's GGUFWriter."""
    import gguf

    c = model.config
    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"export: GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    arch = gguf_arch(c)
    scaling = dict(c.rope_scaling or {})
    rope = scaling.get("type", "llama3") if scaling else None
    if arch == "qwen2" and (rope == "llama3" or c.q_dim != c.dim):  # its graph takes no rope_freqs.weight
        raise FormatError(f"export gguf {path}: llama.cpp's qwen2 is written here with head_dim = dim / n_heads and "
                          f"without Llama 3.1 RoPE scaling only; export to a Hugging Face directory instead")
    if rope == "dynamic":
        raise FormatError(f"export gguf {path}: llama.cpp has no dynamic NTK RoPE (its context would run past "
                          f"{scaling['original_max_len']} positions unscaled); export to a Hugging Face directory")
    if rope == "yarn" and not scaling.get("truncate", True):
        raise FormatError(f"export gguf {path}: llama.cpp's YaRN takes its range truncated; this model's is not "
                          f"({scaling}); export to a Hugging Face directory instead")
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else getattr(gguf.LlamaFileType, f"MOSTLY_{dtype.upper()}")
    with gguf_file(path, arch) as w:
        w.add_name(os.path.splitext(os.path.basename(path))[0])
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.dim)
        w.add_block_count(c.n_layers)
        w.add_feed_forward_length(c.hidden_dim)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        w.add_rope_dimension_count(c.head_dim)
        if c.q_dim != c.dim:  # llama.cpp's head size defaults to n_embd / n_head
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        w.add_rope_freq_base(c.rope_theta)
        if rope in ("linear", "yarn"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if rope == "linear" else gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(scaling["factor"])
        if rope == "yarn":
            w.add_rope_scaling_orig_ctx_len(scaling["original_max_len"])
            attention = scaling["attention_factor"] / yarn_attention_factor(scaling["factor"])
            if not math.isclose(attention, 1.0, rel_tol=1e-6):  # llama.cpp multiplies its own by this
                w.add_rope_scaling_attn_factors(attention)
            w.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
            w.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
        w.add_layer_norm_rms_eps(c.norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_file_type(ftype)
        sampling = dict(sampling or {})
        if "repetition_penalty" in sampling and sampling.get("repeat_last_n", -1) == -1:  # the whole context, as
            sampling["repeat_last_n"] = c.max_seq_len  # transformers means it (llama.cpp reads -1 as 0: no penalty)
        for field, value in sampling.items():  # llama.cpp's defaults for this model
            w.add_key_value(GGUF_SAMPLING_KEYS[field], value, gguf.GGUFValueType.INT32 if field in ("top_k",
                            "repeat_last_n") else gguf.GGUFValueType.FLOAT32)
        if dtype in MIXES:  # as llama-quantize writes it
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if tokenizer is None:  # llama.cpp needs a vocabulary type: "none" runs on token ids alone
            w.add_tokenizer_model("none")
        else:
            v = gguf_vocab(tokenizer, c.vocab_size)
            w.add_tokenizer_model(v["model"])
            if v["space_prefix"] is not None:
                w.add_add_space_prefix(v["space_prefix"])
            if v["model"] == "gpt2":
                w.add_tokenizer_pre(v["pre"])
                w.add_token_merges(v["merges"])
            else:
                w.add_token_scores(v["scores"])
            w.add_token_list(v["tokens"])
            w.add_token_types(v["types"])
            bos, eos, pad = _special_ids(tokenizer)
            if bos is not None:
                w.add_bos_token_id(bos)
            eos = [eos] if isinstance(eos, int) else eos or []
            for add, i in zip((w.add_eos_token_id, w.add_eot_token_id, w.add_eom_token_id), eos):
                add(i)  # llama.cpp ends generation at each: eos, end of turn, end of message
            if pad is not None:
                w.add_pad_token_id(pad)
            unk = next((i for i, kind in enumerate(v["types"]) if kind == 2), None)
            if unk is not None:
                w.add_unk_token_id(unk)
            w.add_add_bos_token(bool(getattr(tokenizer, "add_bos", False)))
            if getattr(tokenizer, "chat_template", None):
                w.add_chat_template(tokenizer.chat_template)

        tensors = {}  # name -> float32 array, in the file's order

        def add(name, a):
            tensors[name] = np.ascontiguousarray(a, dtype=np.float32)

        p = {n: t.numpy() for n, t in model.params.items()}
        p.update({n: q.dequantize() for n, q in model.quantized.items()})
        add("token_embd.weight", p["tok_embeddings"])
        for i in range(c.n_layers):
            add(f"blk.{i}.attn_norm.weight", p[f"layers.{i}.attention_norm"])
            add(f"blk.{i}.ffn_norm.weight", p[f"layers.{i}.ffn_norm"])
            for kind in ("wqkv", "wo", "w13", "w2") + (("bqkv",) if c.qkv_bias else ()):
                for part, rows, _ in fused_parts(c, "wqkv" if kind == "bqkv" else kind):
                    a = gguf_rows(c, part, p[f"layers.{i}.{kind}"][rows])
                    add(f"blk.{i}.{GGUF_PARTS[part]}.{'bias' if kind == 'bqkv' else 'weight'}", a)
        add("output_norm.weight", p["norm"])
        if rope == "llama3":  # llama.cpp divides each RoPE frequency by its factor
            add("rope_freqs.weight", c.rope_frequencies(scaled=False) / c.rope_frequencies())
        if not c.tie_embeddings:
            add("output.weight", p["output"])
        types = gguf_types({n: a.shape for n, a in tensors.items()}, dtype, c.n_layers, c.n_heads, c.n_kv_heads, arch)
        for name, a in tensors.items():
            if not np.isfinite(a).all():
                raise FormatError(f"export gguf {path}: {name} holds NaN or inf; nothing non-finite is saved")
            data, raw = encode(a, types[name])
            w.add_tensor(name, data, raw_dtype=raw)
