"""Tokenizers with one interface: byte-level, Hugging Face BPE, sentencepiece and llama2.c's tokenizer.bin.

Every tokenizer has `encode(text, bos=None, eos=None) -> list[int]` (None: what the tokenizer adds by default),
`decode(ids) -> str`, `vocab_size`, `bos_id`, `eos_id`, `eos_ids`, `save(dir)` and `to_json()` (metadata a
checkpoint records); `load_tokenizer(path)` reads back whatever `save` wrote, or a tokenizer.json /
tokenizer.model / tokenizer.bin from elsewhere.

>>> tok = ByteTokenizer()
>>> tok.encode("hi", eos=True)
[256, 104, 105, 257]
>>> tok.decode(tok.encode("héllo"))
'héllo'
"""
import heapq
import json
import os
import re
import struct

import numpy as np
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.core.fileio import atomic_write_bytes, atomic_write_text
from fusegrad.data.gguf_vocab import read_gguf_vocab
from fusegrad.data.tiktoken_vocab import is_tiktoken, llama3_tokenizer_spec
from fusegrad.models.gguf_reader import is_gguf

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", BYTE_TOKENIZER_FILE, "tokenizer.bin")  # search order
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")


class Tokenizer:
    """Shared behaviour; subclasses define kind, vocab_size, bos_id, eos_id, _encode, _decode, save.

    `add_bos` / `add_eos`: what `encode` adds by default (Hugging Face tokenizers say so in their own files);
    `eos_ids`: every id that ends generation (generation_config.json may declare several); `chat_template`:
    the jinja template of a chat model, or None.
    """

    kind = "base"
    add_bos, add_eos, pad_id, chat_template = True, False, None, None

    @property
    def eos_ids(self):
        return getattr(self, "_eos_ids", None) or ([] if self.eos_id is None else [self.eos_id])

    def encode(self, text, bos=None, eos=None):
        """text -> ids; `bos`/`eos` None: as the tokenizer adds them by default (`add_bos`, `add_eos`)."""
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        ids = self._encode(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + \
            ([self.eos_id] if eos and self.eos_id is not None else [])

    def prompt_ids(self, text):
        """A prompt's ids as `encode` gives them by default; an empty prompt starts from BOS (else EOS, the
        document separator), since generation needs one token to start from."""
        return self.encode(text) or [self.bos_id if self.bos_id is not None else self.eos_id]

    def document_ids(self, text):
        """A document for pretraining: as `encode` gives it, followed by EOS when the tokenizer adds neither BOS
        nor EOS (documents need a separator)."""
        return self.encode(text) + ([self.eos_id] if not (self.add_bos or self.add_eos) else [])

    def documents_ids(self, texts) -> list:
        """`document_ids` of each text as an int32 array, the texts encoded together (`encode_batch`)."""
        head = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        tail = [self.eos_id] if (self.add_eos and self.eos_id is not None) or not (self.add_bos or self.add_eos) else []
        return [np.concatenate([head, ids, tail]).astype(np.int32) for ids in self.encode_batch(texts)]

    def encode_batch(self, texts) -> list:
        """Each text's ids, no BOS or EOS; tokenizers that can encode a batch on every core."""
        return [self._encode(t) for t in texts]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ShapeError(f"{self.kind} tokenizer: token id {i} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        special = {self.bos_id, self.pad_id, *self.eos_ids}
        return self._decode([i for i in ids if i not in special])

    def to_json(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "eos_ids": self.eos_ids, "pad_id": self.pad_id, "add_bos": self.add_bos}

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, BOS = 256, EOS = 257, vocab_size = 258. Needs no training.

    Bytes keep their own value as id so a shard is readable by eye; invalid UTF-8 in decode
    (e.g. a sampled sequence cut mid-character) becomes U+FFFD instead of an error.
    """

    kind = "byte"
    vocab_size, bos_id, eos_id = 258, 256, 257

    def _encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]

    def _decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory):
        atomic_write_text(os.path.join(directory, BYTE_TOKENIZER_FILE), json.dumps(self.to_json()))


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json, with its special tokens as the model's own files define them.

    Beside the tokenizer.json, tokenizer_config.json names bos/eos/pad (special_tokens_map.json fills what it
    leaves out); whether a BOS or EOS is added is the tokenizer.json post-processor's business, as in transformers;
    generation_config.json and config.json add the eos ids that end generation; the chat template comes from
    tokenizer_config.json or chat_template.jinja. A bare tokenizer.json (fusegrad's own `train`) finds BOS/EOS
    by their usual names and adds a BOS, the Llama convention. `train` reserves ids 0, 1, 2 for <unk>, <s>, </s>.

    >>> tok = BPETokenizer.train(["the cat sat on the mat. " * 20], vocab_size=300)
    >>> tok.decode(tok.encode("the cat")), tok.bos_id
    ('the cat', 1)
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer, source="<memory>", config=None):
        self.hf, self.source = hf_tokenizer, source
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1  # ids may leave holes: the largest one counts
        if not vocab:
            raise FormatError(f"{source}: the tokenizer's vocabulary is empty")
        if config is None:  # a bare tokenizer.json
            self.bos_id = _find_token(hf_tokenizer, BOS_NAMES)
            self.eos_id = _find_token(hf_tokenizer, EOS_NAMES)
            if self.bos_id is None or self.eos_id is None:
                raise FormatError(f"{source}: tokenizer has no BOS/EOS token (looked for {BOS_NAMES} and {EOS_NAMES}); "
                                  f"a tokenizer_config.json beside it can name them")
            return
        self.config = config
        self.bos_id, self.eos_id, self.pad_id = (self._special_id(config, name) for name in ("bos", "eos", "pad"))
        self._eos_ids = list(dict.fromkeys(i for i in [self.eos_id] + config["eos_ids"] if i is not None))
        self.eos_id = self.eos_id if self.eos_id is not None else (self._eos_ids or [None])[0]
        self.chat_template = config.get("chat_template")
        # what the tokenizer.json's post-processor adds (transformers follows it, whatever add_bos_token says)
        plain, special = (self.hf.encode("a", add_special_tokens=flag).ids for flag in (False, True))
        self.add_bos = self.bos_id is not None and special[:1] == [self.bos_id] != plain[:1]
        self.add_eos = self.eos_id is not None and special[-1:] == [self.eos_id] != plain[-1:]

    def _special_id(self, config, name):
        token = config.get(f"{name}_token")
        if token is None:
            return None
        i = self.hf.token_to_id(token)
        if i is None:
            raise FormatError(f"{config['_files']}: {name}_token {token!r} is not in the vocabulary of {self.source}")
        return i

    @classmethod
    def train(cls, texts, vocab_size, min_frequency=2):
        """Train on `texts` (an iterable of strings) to at most `vocab_size` ids (256 byte symbols, 3 specials
        and merges); a small text can stop short when no pair occurs `min_frequency` times. Check .vocab_size."""
        if vocab_size < 256 + 3:
            raise ConfigError(f"BPETokenizer.train: vocab_size {vocab_size} < 259 (256 bytes + <unk>, <s>, </s>)")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      special_tokens=["<unk>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path):
        try:
            hf = HFTokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise FormatError(f"{path}: not a valid Hugging Face tokenizer.json: {e}") from e
        return cls(hf, source=os.fspath(path), config=read_special_tokens(os.path.dirname(os.fspath(path))))

    def _encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)  # _fast: no offsets (tokenizers 0.21+)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text):
        """(ids, [(start, end) character span of each id]) of `text`, no special tokens added."""
        enc = self.hf.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def _decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=False)

    def save(self, directory):
        """tokenizer.json, and when the tokenizer came with one, a tokenizer_config.json transformers reads; the
        eos ids beyond eos_token in a generation_config.json, unless the directory has one (a run dir)."""
        atomic_write_text(os.path.join(directory, "tokenizer.json"), self.hf.to_str())
        generation = os.path.join(directory, "generation_config.json")
        if len(self.eos_ids) > 1 and not os.path.exists(generation):
            atomic_write_text(generation, json.dumps({"eos_token_id": self.eos_ids}, indent=2))
        if getattr(self, "config", None) is None:
            return
        token = {i: self.hf.id_to_token(i) for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token.get(self.bos_id),
                  "eos_token": token.get(self.eos_id), "pad_token": token.get(self.pad_id),
                  "add_bos_token": self.add_bos, "add_eos_token": self.add_eos}  # informative: the post-processor rules
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_text(os.path.join(directory, TOKENIZER_CONFIG), json.dumps(config, indent=2, ensure_ascii=False))


def read_special_tokens(directory):
    """The special-token settings of a Hugging Face model directory, or None when it has no tokenizer_config.json:
    {"bos_token", "eos_token", "pad_token" (strings or None), "chat_template", "eos_ids" (from generation_config.json, then config.json), "_files"}."""
    config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
    if config is None:
        return None
    special = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
    out = {"_files": os.path.join(directory, TOKENIZER_CONFIG), "eos_ids": []}
    for name in ("bos", "eos", "pad"):
        token = config.get(f"{name}_token", special.get(f"{name}_token"))
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and not isinstance(token, str):
            raise FormatError(f"{out['_files']}: {name}_token must be a string, got {token!r}")
        out[f"{name}_token"] = token
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = os.path.join(directory, "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        template = _read_bytes(jinja).decode("utf-8")
    out["chat_template"] = template
    for name in ("generation_config.json", "config.json"):
        ids = (_read_json(os.path.join(directory, name)) or {}).get("eos_token_id")
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and not isinstance(i, bool):
                out["eos_ids"].append(i)
    return out


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (Llama 2's tokenizer: <unk> = 0, BOS = 1, EOS = 2)."""

    kind = "sentencepiece"

    def __init__(self, model_proto, source="<memory>"):
        try:
            import sentencepiece
        except ImportError:  # an optional dependency
            raise FormatError(f"{source}: a sentencepiece tokenizer needs the sentencepiece package: pip install "
                              f"sentencepiece") from None

        self.source = source
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
            raise FormatError(f"{source}: not a valid sentencepiece model: {e}") from e
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise FormatError(f"{source}: sentencepiece model has no BOS/EOS "
                              f"(bos_id={self.bos_id}, eos_id={self.eos_id})")

    @classmethod
    def load(cls, path):
        return cls(_read_bytes(path), source=os.fspath(path))

    def _encode(self, text):
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts):
        return self.sp.encode(list(texts), out_type=int)  # a list: sentencepiece encodes it on every core

    def _decode(self, ids):
        return self.sp.decode(ids)

    def save(self, directory):
        atomic_write_bytes(os.path.join(directory, "tokenizer.model"), self.sp.serialized_model_proto())


# -- llama2.c's tokenizer.bin --------------------------------------------------------------------------
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer(Tokenizer):
    """llama2.c's `tokenizer.bin`, encoding and decoding the way its run.c does: pieces (bytes) with merge
    scores; BOS = 1, EOS = 2.

    File layout (little-endian): uint32 max_token_length, then per token: float32 score, int32 byte length,
    that many bytes; the vocabulary size is the number of records. Pieces use ' ' where sentencepiece uses
    '▁'; byte-fallback pieces are the text "<0xAB>".

    >>> tok = Llama2cTokenizer([b"<unk>", b"\\n<s>\\n", b"\\n</s>\\n", b" ", b"h", b"i", b" h", b" hi"],
    ...                        [0, 0, 0, -3, -4, -5, -1, -2])
    >>> tok.encode("hi")
    [1, 7]
    >>> tok.decode([1, 7])
    'hi'
    """

    kind = "llama2c"

    def __init__(self, pieces, scores, bos_id=1, eos_id=2, source="<memory>"):
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(s) for s in scores]
        self.vocab_size, self.bos_id, self.eos_id = len(self.pieces), bos_id, eos_id
        self.source = source
        # First id wins for duplicate pieces, like a stable sort + bsearch would in practice.
        self.ids = {}
        for i, p in enumerate(self.pieces):
            self.ids.setdefault(p, i)

    @classmethod
    def load(cls, path):
        pieces, scores = read_tokenizer_bin(path)
        return cls(pieces, scores, source=os.fspath(path))

    @classmethod
    def from_sentencepiece(cls, sp_tokenizer):
        """Convert a SentencePieceTokenizer exactly as llama2.c's tokenizer.py export does."""
        sp = sp_tokenizer.sp
        pieces = []
        for i in range(sp.vocab_size()):
            piece = sp.id_to_piece(i)
            piece = "\n<s>\n" if i == sp.bos_id() else "\n</s>\n" if i == sp.eos_id() else piece
            pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
        scores = [sp.get_score(i) for i in range(sp.vocab_size())]
        return cls(pieces, scores, sp.bos_id(), sp.eos_id())

    def _encode(self, text):
        """run.c's encode: dummy-prefix space, one id per UTF-8 character (else its bytes + 3), then repeatedly
        merge the adjacent pair with the highest score, leftmost on ties. run.c rescans the whole text for each
        merge; here a heap of candidate pairs over a linked list gives the same merges in O(n log n)."""
        if not text:
            return []
        ids = [self.ids[b" "]] if b" " in self.ids else []
        for ch in text:
            b = ch.encode("utf-8")
            if b not in self.ids and max(b) + 3 >= self.vocab_size:
                raise FormatError(f"{self.source}: cannot encode {ch!r}: it is not a piece and the vocabulary has "
                                  f"no byte-fallback pieces <0x00>..<0xFF> at ids 3..258")
            ids.extend([self.ids[b]] if b in self.ids else [x + 3 for x in b])
        n = len(ids)  # a heap entry (-score, position, ...) pops the best score, the leftmost of equals first
        nxt, prv, alive, heap = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n, []

        def candidate(i):  # the merge of symbol i with the one after it, if the vocabulary has it
            if i >= 0 and nxt[i] < n:
                merged = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[nxt[i]]])
                if merged is not None and self.scores[merged] > -1e10:  # run.c merges nothing scored below
                    heapq.heappush(heap, (-self.scores[merged], i, ids[i], ids[nxt[i]], merged))

        for i in range(n - 1):
            candidate(i)
        while heap:
            _, i, left, right, merged = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or ids[i] != left or ids[j] != right:
                continue  # stale: a symbol of this pair merged since (pieces only grow, so ids never repeat)
            ids[i], alive[j], nxt[i] = merged, False, nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            candidate(prv[i])
            candidate(i)
        return [t for t, keep in zip(ids, alive) if keep]

    def _decode(self, ids):
        out = bytearray()
        for k, i in enumerate(ids):
            piece = self.pieces[i]
            m = _BYTE_PIECE.fullmatch(piece)
            if m:
                out.append(int(m.group(1), 16))
            else:
                # run.c drops the dummy-prefix space of the first piece after BOS.
                out += piece[1:] if k == 0 and piece.startswith(b" ") else piece
        return out.decode("utf-8", errors="replace")

    def save(self, directory):
        write_tokenizer_bin(os.path.join(directory, "tokenizer.bin"), self.pieces, self.scores)

    def to_json(self):
        return {**super().to_json(), "file": "tokenizer.bin"}


def write_tokenizer_bin(path, pieces, scores):
    """Write pieces (bytes) and scores in llama2.c's tokenizer.bin layout, atomically."""
    chunks = [struct.pack("<I", max((len(p) for p in pieces), default=0))]
    for p, s in zip(pieces, scores, strict=True):
        chunks.append(struct.pack("<fi", s, len(p)) + p)
    atomic_write_bytes(path, b"".join(chunks))


def read_tokenizer_bin(path):
    """Return (pieces, scores) from a llama2.c tokenizer.bin; FormatError naming the file and record."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read tokenizer.bin: {e.strerror}") from e
    if len(data) < 4:
        raise FormatError(f"{path}: tokenizer.bin is {len(data)} bytes, too short for its uint32 header")
    (max_len,) = struct.unpack_from("<I", data, 0)
    pieces, scores, pos = [], [], 4
    while pos < len(data):
        if pos + 8 > len(data):
            raise FormatError(f"{path}: token {len(pieces)} is truncated (record header at byte {pos})")
        score, n = struct.unpack_from("<fi", data, pos)
        if not 0 <= n <= max_len or pos + 8 + n > len(data):
            raise FormatError(f"{path}: token {len(pieces)} has byte length {n} (max_token_length {max_len}, "
                              f"{len(data) - pos - 8} bytes left)")
        pieces.append(data[pos + 8:pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    if len(pieces) < 3:
        raise FormatError(f"{path}: tokenizer.bin holds {len(pieces)} tokens; needs at least <unk>, BOS, EOS")
    return pieces, scores


def load_tokenizer(path):
    """Load a tokenizer from `path`: "byte", a directory written by `save`, or one tokenizer file.

    A directory is searched as `tokenizer_file` says. A GGUF file gives the tokenizer inside it; other files
    dispatch on their name: *.model -> sentencepiece or Llama 3's tiktoken file (by content), *.json -> Hugging
    Face (or ours, when it holds {"kind": "byte"}), *.bin -> llama2.c.
    """
    if path == "byte":
        return ByteTokenizer()
    path = os.fspath(path)
    if os.path.isdir(path):
        found = tokenizer_file(path)
        if found is None:
            raise FormatError(f"{path}: directory holds no tokenizer ({', '.join(TOKENIZER_FILES)})")
        return load_tokenizer(found)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: tokenizer file does not exist")
    if is_gguf(path):
        tok = gguf_tokenizer(path)
        if tok is None:
            raise FormatError(f"{path}: the GGUF file holds no tokenizer (tokenizer.ggml.model is 'none' or missing)")
        return tok
    if path.endswith(".model"):  # sentencepiece's (Llama 2) or tiktoken's BPE file (Llama 3), told by content
        data = _read_bytes(path)
        if not data:
            raise FormatError(f"{path}: the tokenizer file is empty")
        if is_tiktoken(data):
            spec = llama3_tokenizer_spec(data, path)
            return BPETokenizer(spec["hf"], source=path, config=spec["special"])
        return SentencePieceTokenizer(data, source=path)
    if path.endswith(".bin"):
        return Llama2cTokenizer.load(path)
    if path.endswith(".json"):
        try:
            meta = json.loads(_read_bytes(path))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: tokenizer file is not valid JSON: {e}") from e
        if isinstance(meta, dict) and meta.get("kind") == "byte":
            return ByteTokenizer()
        return BPETokenizer.load(path)
    raise FormatError(f"{path}: unknown tokenizer file type (expected .model, .json, .bin or .gguf)")


def gguf_tokenizer(path):
    """The tokenizer inside a GGUF file, or None when it holds none."""
    spec = read_gguf_vocab(path)
    if spec is None:
        return None
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] == "bpe":
        try:
            hf = HFTokenizer.from_str(spec["json"])
        except Exception as e:  # tokenizers raises a bare Exception on merges outside the vocabulary
            raise FormatError(f"{path}: the tokenizer metadata makes no valid byte-level BPE tokenizer: {e}") from e
        return BPETokenizer(hf, source=path, config=spec["special"])
    tok = SentencePieceTokenizer(spec["proto"], source=path)
    tok.add_bos, tok.add_eos, tok.chat_template = spec["add_bos"], spec["add_eos"], spec["chat_template"]
    tok._eos_ids = list(dict.fromkeys([tok.eos_id] + spec["eos_ids"]))
    return tok


def tokenizer_file(directory):
    """The tokenizer file in `directory` that load_tokenizer reads, or None: the first of TOKENIZER_FILES there
    (tokenizer.json first where a tokenizer_config.json says it is a Hugging Face model's)."""
    names = TOKENIZER_FILES
    if os.path.isfile(os.path.join(directory, TOKENIZER_CONFIG)):  # a Hugging Face model: its fast tokenizer
        names = ("tokenizer.json",) + tuple(n for n in names if n != "tokenizer.json")
    return next((os.path.join(directory, n) for n in names if os.path.isfile(os.path.join(directory, n))), None)


def tokenizer_beside(path):
    """The tokenizer in a model directory, inside a GGUF file or beside a model file, or None when there is none."""
    path = os.fspath(path)
    if is_gguf(path):  # the tokenizer is inside
        return gguf_tokenizer(path)
    found = tokenizer_file(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)))
    return None if found is None else load_tokenizer(found)


def tokenizer_for_model(model_path, vocab_size, own=None, choice="", force=False):
    """The tokenizer to use with the model at `model_path` (`vocab_size` ids): `choice` (a tokenizer path or
    "byte") or else `own`, the one beside the model. It must fit: more ids than the model's vocabulary is an
    error naming both files; so is the byte tokenizer on a model that has another tokenizer of its own, or no
    tokenizer and a vocabulary other than 258, unless `force`: byte ids would mean other tokens to that model."""
    if not choice and own is None:
        where = "inside the GGUF file" if is_gguf(model_path) else f"beside the model ({', '.join(TOKENIZER_FILES)})"
        raise FormatError(f"{model_path}: no tokenizer found {where}; pass --tokenizer PATH, the tokenizer the model "
                          f"was trained with")
    tok = load_tokenizer(choice) if choice else own
    name = getattr(tok, "source", choice or tok.kind)
    if tok.vocab_size > vocab_size:
        raise FormatError(f"{name}: the tokenizer has {tok.vocab_size} ids, more than the vocabulary of the model "
                          f"{model_path} ({vocab_size}); they do not belong together")
    if tok.kind == "byte" and not force and (own.kind != "byte" if own is not None else vocab_size != tok.vocab_size):
        theirs = f"that of its tokenizer {getattr(own, 'source', own.kind)}" if own is not None else "not bytes"
        raise FormatError(f"byte tokenizer on the model {model_path}, whose {vocab_size}-id vocabulary is {theirs}: "
                          f"byte ids would mean other tokens to it; pass its tokenizer, or --force_tokenizer to "
                          f"use byte ids anyway")
    return tok


def _find_token(hf, names):
    for name in names:
        i = hf.token_to_id(name)
        if i is not None:
            return i
    return None


def _read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FormatError(f"{path}: cannot read tokenizer file: {e.strerror}") from e


def _read_json(path):
    """The JSON object in `path`, or None when there is no such file."""
    if not os.path.isfile(path):
        return None
    try:
        value = json.loads(_read_bytes(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: must hold a JSON object, got {type(value).__name__}")
    return value
