"""Tokenizers with one interface: byte-level, Hugging Face BPE, sentencepiece (and llama2.c's tokenizer.bin).

Every tokenizer has `encode(text, bos=True, eos=False) -> list[int]`, `decode(ids) -> str`, `vocab_size`,
`bos_id`, `eos_id`, `save(dir)` and `to_json()` (metadata a checkpoint records); `load_tokenizer(path)`
reads back whatever `save` wrote, or a tokenizer.json / tokenizer.model / tokenizer.bin from elsewhere.

>>> tok = ByteTokenizer()
>>> tok.encode("hi", eos=True)
[256, 104, 105, 257]
>>> tok.decode(tok.encode("héllo"))
'héllo'
"""
import json
import os

from fusegrad.core.errors import FormatError, ShapeError
from fusegrad.core.fileio import atomic_write_bytes, atomic_write_text

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>")
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>")


class Tokenizer:
    """Shared behaviour; subclasses define kind, vocab_size, bos_id, eos_id, _encode, _decode, save."""

    kind = "base"

    def encode(self, text, bos=True, eos=False):
        ids = self._encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ShapeError(f"{self.kind} tokenizer: token id {i} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        return self._decode([i for i in ids if i not in (self.bos_id, self.eos_id)])

    def to_json(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id}

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

    def _decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory):
        atomic_write_text(os.path.join(directory, BYTE_TOKENIZER_FILE), json.dumps(self.to_json()))


class BPETokenizer(Tokenizer):
    """Byte-level BPE from Hugging Face `tokenizers`, saved as tokenizer.json.

    `train` reserves ids 0, 1, 2 for <unk>, <s>, </s> (Llama's numbering: BOS = 1, EOS = 2).
    Any tokenizer.json loads; BOS/EOS are looked up by their usual names.

    >>> tok = BPETokenizer.train(["the cat sat on the mat. " * 20], vocab_size=300)
    >>> tok.decode(tok.encode("the cat")), tok.bos_id
    ('the cat', 1)
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer, source="<memory>"):
        self.hf = hf_tokenizer
        self.source = source
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = _find_token(hf_tokenizer, BOS_NAMES)
        self.eos_id = _find_token(hf_tokenizer, EOS_NAMES)
        if self.bos_id is None or self.eos_id is None:
            raise FormatError(f"{source}: tokenizer has no BOS/EOS token (looked for {BOS_NAMES} and {EOS_NAMES})")

    @classmethod
    def train(cls, texts, vocab_size, min_frequency=2):
        """Train on `texts` (an iterable of strings) to at most `vocab_size` ids (256 byte symbols, 3 specials
        and merges); a small text can stop short when no pair occurs `min_frequency` times. Check .vocab_size."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + 3:
            raise ShapeError(f"BPETokenizer.train: vocab_size {vocab_size} < 259 (256 bytes + <unk>, <s>, </s>)")
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
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_file(os.fspath(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise FormatError(f"{path}: not a valid Hugging Face tokenizer.json: {e}") from e
        return cls(hf, source=os.fspath(path))

    def _encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=False)

    def save(self, directory):
        atomic_write_text(os.path.join(directory, "tokenizer.json"), self.hf.to_str())


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (Llama 2's tokenizer: <unk> = 0, BOS = 1, EOS = 2)."""

    kind = "sentencepiece"

    def __init__(self, model_proto, source="<memory>"):
        import sentencepiece

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

    def _decode(self, ids):
        return self.sp.decode(ids)

    def save(self, directory):
        atomic_write_bytes(os.path.join(directory, "tokenizer.model"), self.sp.serialized_model_proto())


def load_tokenizer(path):
    """Load a tokenizer from `path`: "byte", a directory written by `save`, or one tokenizer file.

    A directory is searched for tokenizer.model, tokenizer.json, byte_tokenizer.json, tokenizer.bin
    (in that order). Files dispatch on their name: *.model -> sentencepiece, *.json -> Hugging Face
    (or ours, when it holds {"kind": "byte"}), *.bin -> llama2.c.
    """
    from fusegrad.data.llama2c_tokenizer import Llama2cTokenizer

    if path == "byte":
        return ByteTokenizer()
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("tokenizer.model", "tokenizer.json", BYTE_TOKENIZER_FILE, "tokenizer.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FormatError(f"{path}: directory holds no tokenizer (tokenizer.model, tokenizer.json, "
                          f"{BYTE_TOKENIZER_FILE} or tokenizer.bin)")
    if not os.path.isfile(path):
        raise FormatError(f"{path}: tokenizer file does not exist")
    if path.endswith(".model"):
        return SentencePieceTokenizer.load(path)
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
    raise FormatError(f"{path}: unknown tokenizer file type (expected .model, .json or .bin)")


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
