"""GGUF's container (versions 2 and 3), read in one pass: the metadata as Python values and where each tensor lies.

gguf's own GGUFReader builds a numpy view per array element: 5 s for SmolLM2's 49k-token vocabulary and 15 s
for Llama 3's 128k tokens and 280k merges, every time a model or its tokenizer is opened. Here a string array
is one loop over the bytes (0.1 s). Every count, length and offset is checked against the file's size first.
Tensors are dequantized by the gguf package (gguf_file.py). Layout: FORMATS.md and ggml's docs/gguf.md.
"""
from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np

from fusegrad.core.errors import FormatError

MAGIC = b"GGUF"
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def is_gguf(path) -> bool:
    """Whether `path` is a file that starts as a GGUF file does."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclasses.dataclass
class TensorInfo:
    name: str
    shape: tuple  # numpy order (rows, cols): ggml's dims reversed
    qtype: int  # ggml's type number (gguf.GGMLQuantizationType)
    offset: int  # absolute, in bytes
    nbytes: int


class GGUFContents:
    """`.metadata` {key: value} (arrays as lists) and `.tensors` {name: TensorInfo} of a GGUF file; `.raw(info)`
    the bytes of one tensor as a (rows, bytes per row) uint8 array mapped from the file."""

    def __init__(self, path):
        import gguf

        self.path = path = os.fspath(path)
        try:
            self.data = np.memmap(path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path}: cannot read the GGUF file: {exc}") from None
        self.buf, self.pos = memoryview(self.data), 0  # memoryview slices: no numpy object per string
        if bytes(self._take(4)) != MAGIC:
            raise FormatError(f"{path}: not a GGUF file (no GGUF magic)")
        version = self._scalar(4)
        if version not in (2, 3):
            raise FormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._count(10, 8), self._count(10, 12)
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar(4), key)
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or not 0 < align <= 1 << 20:
            raise FormatError(f"{path}: general.alignment = {align!r} is not a positive alignment")
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            if not 1 <= n_dims <= 4:
                raise FormatError(f"{path}: tensor {name!r} has {n_dims} dimensions (1 to 4)")
            infos.append((name, tuple(self._scalar(10) for _ in range(n_dims)), self._scalar(4), self._scalar(10)))
        start = -(-self.pos // align) * align
        self.tensors = {}
        for name, dims, qtype, offset in infos:
            try:
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise FormatError(f"{path}: tensor {name!r} has unknown ggml type {qtype}") from None
            if dims[0] % block or min(dims) < 1 or int(np.prod(dims, dtype=np.float64)) > self.data.size * block:
                raise FormatError(f"{path}: tensor {name!r} of shape {dims} does not fit its type's blocks or the file")
            nbytes = int(np.prod(dims, dtype=np.int64)) // block * size
            if offset % align or start + offset + nbytes > self.data.size or name in self.tensors:
                raise FormatError(f"{path}: tensor {name!r} at offset {offset} ({nbytes} bytes) lies outside the "
                                  f"{self.data.size}-byte file, unaligned, or twice")
            self.tensors[name] = TensorInfo(name, dims[::-1], qtype, start + offset, nbytes)

    def raw(self, info: TensorInfo) -> np.ndarray:
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        return self.data[info.offset:info.offset + info.nbytes].reshape(rows, info.nbytes // rows)

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.data.size:
            raise FormatError(f"{self.path}: truncated GGUF file ({n} bytes wanted at byte {self.pos} of "
                              f"{self.data.size})")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def _scalar(self, kind: int):
        fmt = SCALARS[kind]
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))[0]

    def _count(self, kind: int, least: int) -> int:
        """A count of items at least `least` bytes each, checked against what is left of the file."""
        n = self._scalar(kind)
        if n * least > self.data.size - self.pos:
            raise FormatError(f"{self.path}: truncated GGUF file (a count of {n} at byte {self.pos} is more than the "
                              f"{self.data.size}-byte file holds)")
        return n

    def _string(self) -> str:
        raw = self._take(self._count(10, 1))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: a string before byte {self.pos} is not UTF-8") from None

    def _value(self, kind: int, key: str):
        if kind in SCALARS:
            return self._scalar(kind)
        if kind == STRING:
            return self._string()
        if kind != ARRAY:
            raise FormatError(f"{self.path}: metadata key {key!r} has unknown value type {kind}")
        item = self._scalar(4)
        if item in SCALARS and item != 7:  # numbers: one slice of the file
            size = struct.calcsize(SCALARS[item])
            n = self._count(10, size)
            return np.frombuffer(self._take(n * size), dtype=SCALARS[item]).tolist()
        n = self._count(10, 1 if item == 7 else 8)
        return [self._value(item, key) for _ in range(n)]
