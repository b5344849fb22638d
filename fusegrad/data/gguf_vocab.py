"""The tokenizer inside a GGUF file, as the files fusegrad's tokenizers are built from.

llama.cpp keeps a tokenizer as metadata: "gpt2" (byte-level BPE: tokens, merges and `tokenizer.ggml.pre`, the
name of its text split) becomes a tokenizer.json; "llama" (sentencepiece BPE: tokens, scores and token types,
whose numbers are sentencepiece's own) becomes a sentencepiece model; fusegrad's byte tokenizer, written as
sentencepiece byte pieces, comes back as itself. Keys: FORMATS.md and gguf's `Keys.Tokenizer`.
"""
from __future__ import annotations

import json

from fusegrad.core.errors import FormatError
from fusegrad.models.export import LLAMACPP_PRE, byte_pieces
from fusegrad.models.gguf_file import read_metadata

# llama.cpp's pre-tokenizer names -> the name tokenizer.json's split is written under in export.LLAMACPP_PRE
PRE_ALIASES = {"gpt-2": "gpt-2", "phi-2": "gpt-2", "smollm": "smollm", "starcoder": "smollm", "refact": "smollm",
               "llama-bpe": "llama-bpe", "llama3": "llama-bpe", "llama-v3": "llama-bpe", "falcon3": "llama-bpe",
               "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2"}
UNKNOWN, CONTROL, USER_DEFINED, BYTE = 2, 3, 4, 6  # llama.cpp's token types (sentencepiece's numbers)


def _pre_tokenizer(name: str, path) -> dict:
    """tokenizer.json's pre_tokenizer for llama.cpp's pre-tokenizer `name`."""
    key = next((k for k, v in LLAMACPP_PRE.items() if v == PRE_ALIASES.get(name)), None)
    if key is None:
        raise FormatError(f"{path}: tokenizer.ggml.pre = {name!r} is a text split fusegrad does not know "
                          f"(it reads {', '.join(sorted(PRE_ALIASES))})")
    steps = []
    for kind, arg in key:
        if kind == "ByteLevel":
            steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": arg})
        elif kind == "Digits":
            steps.append({"type": "Digits", "individual_digits": arg})
        else:
            steps.append({"type": "Split", "pattern": {"Regex": arg}, "behavior": "Isolated", "invert": False})
    return steps[0] if len(steps) == 1 else {"type": "Sequence", "pretokenizers": steps}


def _special(meta: dict, tokens: list, name: str):
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    return i if isinstance(i, int) and 0 <= i < len(tokens) else None


def _more_eos_ids(meta: dict, tokens: list) -> list:
    """The ids besides EOS that end generation: llama.cpp's end of turn and end of message."""
    return [i for i in (_special(meta, tokens, "eot"), _special(meta, tokens, "eom")) if i is not None]


def _bpe(meta: dict, tokens: list, types: list, path) -> dict:
    """A byte-level BPE tokenizer.json (as text) and the special-token settings BPETokenizer takes."""
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise FormatError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.merges")
    bos, eos, pad = (_special(meta, tokens, n) for n in ("bos", "eos", "padding"))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", PRE_ALIASES.get(pre) == "llama-bpe")) and bos is not None
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == CONTROL}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, USER_DEFINED)]
    # the post-processor adds BOS when the file says so (transformers and BPETokenizer follow the post-processor)
    first, second = [{"Sequence": {"id": "A", "type_id": 0}}], [{"Sequence": {"id": "B", "type_id": 1}}]
    bos_step = [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}] if add_bos else []
    special = {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}} if add_bos else {}
    post = {"type": "TemplateProcessing", "single": bos_step + first, "pair": bos_step + first + second,
            "special_tokens": special}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": _pre_tokenizer(pre, path), "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": PRE_ALIASES.get(pre) == "llama-bpe",
                      "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}
    name = {i: tokens[i] for i in (bos, eos, pad) if i is not None}
    settings = {"_files": path, "bos_token": name.get(bos), "eos_token": name.get(eos), "pad_token": name.get(pad),
                "chat_template": meta.get("tokenizer.chat_template"), "eos_ids": _more_eos_ids(meta, tokens)}
    return {"kind": "bpe", "json": json.dumps(spec, ensure_ascii=False), "special": settings}


def _sentencepiece(meta: dict, tokens: list, types: list, path) -> dict:
    """A sentencepiece BPE model proto (bytes) with llama.cpp's scores and types, and the settings it lacks."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError as exc:  # sentencepiece, and protobuf for its model file, are optional
        raise FormatError(f"{path}: its sentencepiece tokenizer needs the sentencepiece and protobuf packages "
                          f"({exc}): pip install sentencepiece protobuf") from None

    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise FormatError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    # sentencepiece needs an unknown piece: the file's, else the first of type unknown, else llama.cpp's default 0
    unk = _special(meta, tokens, "unknown")
    unk = next((i for i, ty in enumerate(types) if ty == UNKNOWN), 0) if unk is None else unk
    proto = sp_pb2.ModelProto()
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types)):
        proto.pieces.add(piece=t, score=float(s), type=UNKNOWN if i == unk else ty if 1 <= ty <= 6 else 1)
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.byte_fallback = BYTE in types
    spec.unk_id = unk
    for field, name in (("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        i = _special(meta, tokens, name)
        setattr(spec, field, -1 if i is None else i)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    proto.normalizer_spec.escape_whitespaces = True
    return {"kind": "sentencepiece", "proto": proto.SerializeToString(), "eos_ids": _more_eos_ids(meta, tokens),
            "add_bos": bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            "add_eos": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            "chat_template": meta.get("tokenizer.chat_template")}


def read_gguf_vocab(path) -> dict | None:
    """The tokenizer of the GGUF file at `path`, or None when it holds none (`tokenizer.ggml.model` "none"):
    {"kind": "bpe", "json", "special"} | {"kind": "sentencepiece", "proto", ...} | {"kind": "byte"}."""
    meta = read_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if model in (None, "none"):
        return None
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise FormatError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise FormatError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if model == "gpt2":
        return _bpe(meta, tokens, list(types), path)
    if model != "llama":
        raise FormatError(f"{path}: tokenizer.ggml.model = {model!r} is not supported (gpt2, llama or none)")
    if tokens[:256] == byte_pieces() and tokens[256:] == ["<s>", "</s>"] and \
            meta.get("tokenizer.ggml.add_space_prefix") is False:  # fusegrad's byte tokenizer, exported
        return {"kind": "byte"}
    return _sentencepiece(meta, tokens, list(types), path)
