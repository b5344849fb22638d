"""Numba dequantization of ggml's blocks (a GGUF file's quantized weights, kept as the frozen QLoRA base) straight
into a float32 buffer the caller owns, rows permuted as they are written.

`JitBackend.dequantize_ggml` (the contract of `Backend.dequantize_ggml`). A part is duck-typed (this layer sits
below fusegrad.quant.ggml): .raw (rows, bytes per row) uint8, .qtype (ggml's type number), .block (values,
bytes) of one block, .shape. Bit for bit `gguf.quants.dequantize`: every value is the gguf package's float32
arithmetic in its order (fp16 scales widened exactly, through a table; d * q, then + m; K-quants
(d * sc) * q - dmin * m), each step rounded, so the kernel is compiled without fastmath (no FMA contraction).
Parallel over rows of the output; a row of a (rows, cols) weight is cols / B consecutive blocks of B values.
Block layouts: ggml's ggml-common.h.

>>> import gguf
>>> from fusegrad.quant.ggml import GGMLTensor
>>> w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
>>> t = GGMLTensor(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), 2, w.shape)
>>> out = np.empty(w.shape, np.float32)
>>> bool((dequantize_ggml(t, out) == t.dequantize()).all())
True
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from fusegrad.backends.cpu_jit_nf4 import row_map
from fusegrad.backends.jit_common import is_f32, kernel  # also sets numba's threading layer
from fusegrad.core.errors import ShapeError

# ggml's type numbers (gguf.GGMLQuantizationType)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30
# fp16 bit pattern -> its float32 value (exact, as numpy widens): one lookup per scale
F16_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def _f16(b, i, table):
    """The little-endian fp16 at bytes b[i], b[i + 1], as float32."""
    return table[np.int64(b[i]) | np.int64(b[i + 1]) << 8]


# Each block decoder reads one block b (uint8) and writes its values into dst (float32); inlined where the row
# loop calls it, so the type's flags (literals there) fold away.
@njit(inline="always")
def _legacy(b, dst, table, five, low):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1: 32 values from fp16 d (and fp16 m when `low`), with `five` a uint32 of
    fifth bits, then 16 bytes of nibbles (value j the low nibble of byte j, value 16 + j its high one).
    Value = d * (q - offset) (Q4_0 offset 8, Q5_0 16), or d * q + m."""
    d = _f16(b, 0, table)
    m = _f16(b, 2, table) if low else np.float32(0.0)
    at = 4 if low else 2
    high = np.int64(0)
    if five:
        high = np.int64(b[at]) | np.int64(b[at + 1]) << 8 | np.int64(b[at + 2]) << 16 | np.int64(b[at + 3]) << 24
        at += 4
    offset = 0 if low else (16 if five else 8)
    q = b[at:at + 16]
    for half in range(2):  # the low nibbles, then the high ones: each loop one run of 16 values
        seg = dst[16 * half:16 * half + 16]
        for j in range(16):
            v = np.int64(q[j]) >> (4 * half) & 15
            if five:
                v |= (high >> (j + 16 * half) & 1) << 4
            seg[j] = d * np.float32(v) + m if low else d * np.float32(v - offset)


@njit(inline="always")
def _q8_0(b, dst, table):
    """Q8_0: fp16 d, 32 int8 values; value = q * d."""
    d = _f16(b, 0, table)
    for j in range(32):
        dst[j] = np.float32(np.int8(b[2 + j])) * d  # the byte's bits as int8


@njit(inline="always")
def _k4(b, dst, table, five):
    """Q4_K / Q5_K: 256 values from fp16 d and dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
    (Q5_K) 32 bytes whose bit s is the fifth bit of sub-block s, 128 bytes of nibbles: sub-block s reads byte
    32 (s // 2) + i, low nibble when s is even. Value = (d * sc) * q - dmin * m."""
    d, dmin = _f16(b, 0, table), _f16(b, 2, table)
    at = 48 if five else 16
    for s in range(8):
        if s < 4:
            sc, mn = np.int64(b[4 + s]) & 63, np.int64(b[8 + s]) & 63
        else:
            sc = (np.int64(b[8 + s]) & 15) | (np.int64(b[s]) >> 6) << 4
            mn = np.int64(b[8 + s]) >> 4 | (np.int64(b[4 + s]) >> 6) << 4
        ds, dm = d * np.float32(sc), dmin * np.float32(mn)
        shift, q, seg = 4 * (s & 1), b[at + 32 * (s >> 1):at + 32 * (s >> 1) + 32], dst[32 * s:32 * s + 32]
        for i in range(32):
            v = np.int64(q[i]) >> shift & 15
            if five:
                v |= (np.int64(b[16 + i]) >> s & 1) << 4
            seg[i] = ds * np.float32(v) - dm


@njit(inline="always")
def _q6_k(b, dst, table):
    """Q6_K: 256 values from 128 bytes of low nibbles ql, 64 of 2-bit highs qh, 16 int8 scales (one per 16
    values), fp16 d at 208. In each half h of 128 values, value 32 k + i (k < 4) takes the low (k < 2) or high
    nibble of ql[64 h + 32 (k % 2) + i] and bits 2 k of qh[32 h + i]; value = (d * scale) * (q - 32)."""
    d = _f16(b, 208, table)
    for h in range(2):
        for k in range(4):
            ql, qh = b[64 * h + 32 * (k & 1):64 * h + 32 * (k & 1) + 32], b[128 + 32 * h:160 + 32 * h]
            seg, shift = dst[128 * h + 32 * k:128 * h + 32 * k + 32], 4 * (k >> 1)
            for half in range(2):  # 16 values per scale
                sc = np.int64(b[192 + 8 * h + 2 * k + half])
                ds = d * np.float32(sc - ((sc >> 7) << 8))
                for i in range(16 * half, 16 * half + 16):
                    v = (np.int64(ql[i]) >> shift & 15) | (np.int64(qh[i]) >> (2 * k) & 3) << 4
                    seg[i] = ds * np.float32(v - 32)


@njit(cache=True)
def _floats(row, dst, qtype, table):
    """F32 (bits copied), F16 (widened through the table) or BF16 (its bits the high half of a float32)."""
    bits = dst.view(np.uint32)
    if qtype == F32:
        bits[:] = row.view(np.uint32)
    else:
        halves = row.view(np.uint16)
        for j in range(dst.size):
            if qtype == F16:
                dst[j] = table[halves[j]]
            else:
                bits[j] = np.uint32(halves[j]) << 16


@njit(inline="always")
def _blocks(qtype, row, dst, block, size, table):
    """Every block of a row of a quantized type: one loop per type, its flags literals (a test per block costs
    as much as decoding 32 values)."""
    n = dst.size // block
    if qtype == Q4_0:
        for k in range(n):
            _legacy(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table, False, False)
    elif qtype == Q4_1:
        for k in range(n):
            _legacy(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table, False, True)
    elif qtype == Q5_0:
        for k in range(n):
            _legacy(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table, True, False)
    elif qtype == Q5_1:
        for k in range(n):
            _legacy(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table, True, True)
    elif qtype == Q8_0:
        for k in range(n):
            _q8_0(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table)
    elif qtype == Q4_K:
        for k in range(n):
            _k4(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table, False)
    elif qtype == Q5_K:
        for k in range(n):
            _k4(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table, True)
    else:
        for k in range(n):
            _q6_k(row[k * size:(k + 1) * size], dst[k * block:(k + 1) * block], table)


@kernel(cache=True)  # no fastmath: every product and sum must round as numpy's
def _dequantize_rows(raw, qtype, block, size, src_rows, table, out):
    # out (R, C): row r = the dequantized row src_rows[r] of raw (rows, C / block * size), type qtype
    for r in prange(out.shape[0]):
        row, dst = raw[src_rows[r]], out[r]
        if qtype == F32 or qtype == F16 or qtype == BF16:
            _floats(row, dst, qtype, table)
        else:
            _blocks(qtype, row, dst, block, size, table)


def dequantize_part(part, src_rows, out) -> None:
    """One part (rows, C) into C-contiguous out (len(src_rows), C), out's row r from the part's row
    src_rows[r]; part.block: (values, bytes) of one of its blocks."""
    block, size = part.block
    _dequantize_rows(part.raw, part.qtype, block, size, src_rows, F16_TABLE, out)


def dequantize_ggml(q, out) -> np.ndarray:
    """A GGMLTensor or FusedGGML (its parts dequantized each into its rows, unpermuted) -> out; returns out.

    out: C-contiguous float32 of q's shape, written whole (no temporaries the size of the weight)."""
    if out.shape != tuple(q.shape) or not is_f32(out) or not out.flags.c_contiguous:
        raise ShapeError(f"dequantize_ggml: out must be C-contiguous float32 {tuple(q.shape)}, got {out.dtype} "
                         f"{out.shape}{'' if out.flags.c_contiguous else ' (not C-contiguous)'}")
    lo = 0
    for part, unpermute in q.parts if hasattr(q, "parts") else [(q, None)]:
        rows = part.shape[0]
        src = np.arange(rows, dtype=np.int64) if unpermute is None else row_map(unpermute, rows)
        dequantize_part(part, src, out[lo:lo + rows])
        lo += rows
    return out


def prewarm() -> None:
    """Compile (or load from numba's disk cache) the kernel: one signature serves every type."""
    _dequantize_rows(np.zeros((1, 34), np.uint8), Q8_0, 32, 34, np.zeros(1, np.int64), F16_TABLE,
                     np.empty((1, 32), np.float32))
