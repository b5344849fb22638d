"""MILBlob v2 weight files: the `weights/*.bin` that BLOBFILE consts point into.

Layout (coremltools' blob storage, see FORMATS.md): a 64-byte file header (uint32 blob count, uint32
version = 2), then per blob a 64-byte metadata record (uint32 sentinel 0xDEADBEEF, uint32 dtype,
uint64 data size, uint64 absolute data offset, zeros) followed by the data. Every record starts on a
64-byte boundary; the file ends right after the last blob's data. A BLOBFILE offset points at the
metadata record, not at the data.

>>> import numpy as np
>>> w = BlobWriter()
>>> w.add(np.ones((2, 3), np.float16))
64
>>> read_blob(w.to_bytes(), 64, (2, 3)).dtype
dtype('float16')
"""
from __future__ import annotations

import struct

import numpy as np

from fusegrad.core.errors import FormatError

SENTINEL = 0xDEADBEEF
VERSION = 2
ALIGN = 64
# MILBlob dtype codes (1 = float16, 2 = float32, 3 = uint8, 4 = int8)
DTYPE_CODES = {np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.uint8): 3, np.dtype(np.int8): 4}
CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class BlobWriter:
    """Collects arrays into one MILBlob v2 file; `add` returns the offset for BLOBFILE(offset=...)."""

    def __init__(self):
        self._blobs = []  # (metadata offset, dtype code, raw bytes)
        self._end = ALIGN  # the first metadata record follows the 64-byte file header

    def add(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        if array.dtype not in DTYPE_CODES:
            raise FormatError(f"MILBlob: unsupported dtype {array.dtype}; supported: fp16, fp32, uint8, int8")
        offset = _aligned(self._end)
        data = array.tobytes()
        self._blobs.append((offset, DTYPE_CODES[array.dtype], data))
        self._end = offset + ALIGN + len(data)
        return offset

    def __len__(self) -> int:
        return len(self._blobs)

    def to_bytes(self) -> bytes:
        out = bytearray(self._end)
        struct.pack_into("<II", out, 0, len(self._blobs), VERSION)
        for offset, code, data in self._blobs:
            struct.pack_into("<IIQQ", out, offset, SENTINEL, code, len(data), offset + ALIGN)
            out[offset + ALIGN:offset + ALIGN + len(data)] = data
        return bytes(out)


def read_blob(buf: bytes, offset: int, shape=None, *, where: str = "blob") -> np.ndarray:
    """The array whose metadata record sits at `offset`; reshaped to `shape` when given."""
    if len(buf) < 2 * ALIGN:
        raise FormatError(f"{where}: {len(buf)} bytes is too short for a MILBlob file")
    count, version = struct.unpack_from("<II", buf, 0)
    if version != VERSION:
        raise FormatError(f"{where}: MILBlob version {version}, expected {VERSION}")
    if offset % ALIGN or offset + ALIGN > len(buf):
        raise FormatError(f"{where}: offset {offset} is not a 64-aligned record inside {len(buf)} bytes")
    sentinel, code, size, data_offset = struct.unpack_from("<IIQQ", buf, offset)
    if sentinel != SENTINEL:
        raise FormatError(f"{where}: no 0xDEADBEEF sentinel at offset {offset} (found {sentinel:#x})")
    if code not in CODE_DTYPES:
        raise FormatError(f"{where}: unknown MILBlob dtype code {code} at offset {offset}")
    if data_offset + size > len(buf):
        raise FormatError(f"{where}: blob at {offset} claims {size} bytes at {data_offset}, file has {len(buf)}")
    array = np.frombuffer(buf, CODE_DTYPES[code], size // CODE_DTYPES[code].itemsize, data_offset)
    if shape is not None:
        if int(np.prod(shape)) != array.size:
            raise FormatError(f"{where}: blob at {offset} holds {array.size} values, shape {tuple(shape)} needs "
                              f"{int(np.prod(shape))}")
        array = array.reshape(shape)
    return array


def blob_offsets(buf: bytes) -> list:
    """Metadata offsets of every blob in the file, in order (walks the records)."""
    count = struct.unpack_from("<I", buf, 0)[0]
    offsets, offset = [], ALIGN
    for _ in range(count):
        size, data_offset = struct.unpack_from("<QQ", buf, offset + 8)
        offsets.append(offset)
        offset = _aligned(data_offset + size)
    return offsets
