"""Llama 3's original `tokenizer.model`, tiktoken's BPE file, as a Hugging Face byte-level BPE tokenizer.

The file holds one line per token: the base64 of its bytes, a space, its rank (0, 1, 2, ... in order). It is
turned into a tokenizer.json the way transformers' `TikTokenConverter` does: the rank is the id, the merges are
every split of a token into two tokens, ordered by the rank of what they make (then of the left and right
parts), so the lowest-rank pair merges first as in tiktoken; a piece that is a token whole is one id
(`ignore_merges`, tiktoken's shortcut); text is split by Llama 3's regex, then mapped to GPT-2's byte symbols.
Meta's 256 special tokens follow the ranks; which names they carry depends on the release (Llama 3 or 3.1+).

>>> lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)] + ["aGk= 256"]  # b"hi": 256
>>> hf = tiktoken_hf_tokenizer(read_tiktoken_ranks(lines, "demo"), ["<|begin_of_text|>"])
>>> hf.encode("hi!").ids, hf.token_to_id("<|begin_of_text|>")
([256, 33], 257)
"""
from __future__ import annotations

import base64
import binascii
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

from fusegrad.core.errors import FormatError

# Llama 3's split (tiktoken's cl100k_base pattern): contractions, words, numbers of 1-3 digits, punctuation runs
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
NUM_SPECIAL = 256  # Meta's tokenizers reserve 256 ids after the ranks


def _special_names(named: list, first_reserved: int) -> list:
    return named + [f"<|reserved_special_token_{first_reserved + i}|>" for i in range(NUM_SPECIAL - len(named))]


# Meta's special tokens in id order: meta-llama/llama3's tokenizer.py (Llama 3) and llama-models' llama3_1
# tokenizer.py (Llama 3.1 on; Hugging Face's 3.2 Vision release names them alike, while transformers' conversion
# script names id 128005 <|reserved_special_token_2|> and numbers the unused ones from 3: the same ids)
LLAMA3_SPECIAL = _special_names(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
                                 "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
                                 "<|reserved_special_token_4|>", "<|eot_id|>"], 5)
LLAMA31_SPECIAL = _special_names(["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                  "<|python_tag|>"], 2)
STOP_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")  # what ends generation (3.1's generation_config)

# Meta's chat format (llama-models' ChatFormat): a header per message, its content stripped, then <|eot_id|>;
# the tool role's header says "ipython"
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role']) + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def is_tiktoken(head: bytes) -> bool:
    """Whether a file starting with `head` is tiktoken's (a base64 character first); a sentencepiece model
    starts with a protobuf field tag (0x0a, 0x12 or 0x1a), none of which is one."""
    return head[:1] != b"" and head[0] in _BASE64


def read_tiktoken_ranks(lines, source) -> list:
    """The tokens' bytes, by rank, from tiktoken lines (bytes or str); FormatError naming `source` and the line."""
    tokens, seen = [], {}
    for n, line in enumerate(lines, 1):
        line = line.decode("latin-1") if isinstance(line, bytes) else line
        if not line.strip():  # blank lines carry nothing (tiktoken skips them too)
            continue
        parts = line.split()
        if len(parts) != 2 or not (parts[1].isascii() and parts[1].isdigit()):
            raise FormatError(f"{source}: line {n}: expected 'base64-token rank', got {line.strip()[:80]!r}")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(f"{source}: line {n}: {parts[0][:80]!r} is not base64") from None
        if int(parts[1]) != len(tokens):
            raise FormatError(f"{source}: line {n}: rank {parts[1]}, expected {len(tokens)} (ranks run 0, 1, 2, "
                              f"... a line each)")
        if not token or token in seen:
            what = "an empty token" if not token else f"token {token!r} again (first on line {seen[token]})"
            raise FormatError(f"{source}: line {n}: {what}")
        seen[token] = n
        tokens.append(token)
    if not tokens:
        raise FormatError(f"{source}: line 1: the tiktoken vocabulary is empty")
    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise FormatError(f"{source}: no token for byte {missing[0]:#04x} ({len(missing)} of the 256 bytes are "
                          f"missing); byte-level BPE needs each byte as a token")
    return tokens


def _byte_symbols() -> dict:
    """GPT-2's bytes -> printable characters (byte-level BPE's alphabet): printable bytes stay, the rest shift
    to 256 and up."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def tiktoken_hf_tokenizer(tokens: list, special: list, pattern: str = LLAMA3_PATTERN,
                          bos: str | None = None) -> HFTokenizer:
    """A `tokenizers` Tokenizer of the ranked `tokens` (bytes, id = rank) and `special` tokens after them, with
    `pattern` as the split; `bos` (a special token) is added before each text by its post-processor."""
    symbol = _byte_symbols()
    rank = {t: i for i, t in enumerate(tokens)}
    merges = []  # (rank of the merged token, rank of left, rank of right): all of a token's splits into two
    for i, t in enumerate(tokens):
        for k in range(1, len(t)):
            left, right = rank.get(t[:k]), rank.get(t[k:])
            if left is not None and right is not None:
                merges.append((i, left, right))
    merges.sort()
    text = ["".join(symbol[b] for b in t) for t in tokens]
    bpe = models.BPE({s: i for i, s in enumerate(text)}, [(text[a], text[b]) for _, a, b in merges],
                     fuse_unk=False, ignore_merges=True)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in special])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos is not None:
        steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                   special_tokens=[(bos, hf.token_to_id(bos))]))
    hf.post_processor = processors.Sequence(steps)
    return hf


def llama3_tokenizer_spec(data: bytes, path) -> dict:
    """{"hf": the tokenizers.Tokenizer, "special": the settings BPETokenizer takes} of Meta's Llama 3
    tokenizer.model (its bytes `data`, read from `path`). The special tokens are named as in Llama 3.1 unless a
    params.json beside the file says Llama 3 (no `use_scaled_rope`: 3.1 brought it)."""
    path = os.fspath(path)
    tokens = read_tiktoken_ranks(data.splitlines(), path)
    special = LLAMA31_SPECIAL
    try:
        with open(os.path.join(os.path.dirname(path), "params.json"), "rb") as f:
            args = json.loads(f.read())
    except (OSError, ValueError):
        args = None  # none beside it (or a broken one, which the model's loader names)
    if isinstance(args, dict) and "use_scaled_rope" not in args:
        special = LLAMA3_SPECIAL
    hf = tiktoken_hf_tokenizer(tokens, special, bos="<|begin_of_text|>")
    clash = next((s for i, s in enumerate(special) if hf.token_to_id(s) != len(tokens) + i), None)
    if clash is not None:  # Meta's ids: the special tokens right after the ranks
        raise FormatError(f"{path}: the special token {clash} is one of the ranked tokens too")
    return {"hf": hf, "special": {
        "_files": path, "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": None,
        "chat_template": LLAMA3_CHAT_TEMPLATE, "eos_ids": [hf.token_to_id(n) for n in STOP_NAMES if n in special]}}
