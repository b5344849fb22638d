"""llama2.c's `tokenizer.bin`: read, write, and encode/decode the way llama2.c's run.c does.

Layout (little-endian): uint32 max_token_length, then per token: float32 score, int32 byte length,
that many bytes. The file does not store the vocabulary size: it is the number of records.
Pieces use ' ' where sentencepiece uses '▁'; byte-fallback pieces are the text "<0xAB>".

>>> tok = Llama2cTokenizer([b"<unk>", b"\\n<s>\\n", b"\\n</s>\\n", b" ", b"h", b"i", b" h", b" hi"],
...                        [0, 0, 0, -3, -4, -5, -1, -2])
>>> tok.encode("hi")
[1, 7]
>>> tok.decode([1, 7])
'hi'
"""
import os
import re
import struct

from fusegrad.core.errors import FormatError
from fusegrad.core.fileio import atomic_write_bytes
from fusegrad.data.tokenizer import Tokenizer

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class Llama2cTokenizer(Tokenizer):
    """Pieces (bytes) with merge scores; BOS = 1, EOS = 2 as in llama2.c."""

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
        """run.c's encode: dummy-prefix space, one id per UTF-8 character (else its bytes + 3),
        then repeatedly merge the adjacent pair with the highest score (leftmost on ties)."""
        if not text:
            return []
        ids = [self.ids[b" "]] if b" " in self.ids else []
        for ch in text:
            b = ch.encode("utf-8")
            ids.extend([self.ids[b]] if b in self.ids else [x + 3 for x in b])
        while True:
            best, best_i = -1e10, -1
            for i in range(len(ids) - 1):
                merged = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if merged is not None and self.scores[merged] > best:
                    best, best_i = self.scores[merged], i
            if best_i < 0:
                return ids
            ids[best_i:best_i + 2] = [self.ids[self.pieces[ids[best_i]] + self.pieces[ids[best_i + 1]]]]

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
