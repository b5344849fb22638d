"""Numba NF4 dequantization: the packed 4-bit codes of a weight straight into a float32 buffer the caller
owns, block scales (double quantization undone) computed on the fly, q/k rows permuted as they are written.

`JitBackend.dequantize_nf4` (the contract of `Backend.dequantize_nf4`). Bit for bit the reference
(fusegrad.quant.nf4): every value is one float32 product code[idx] * scale, every double-quantized scale
scale_code[absmax] * nested_absmax + offset rounded after each operation, so the kernel is compiled
without fastmath (no FMA contraction). Parallel over rows of the output; a row of a (out, in) part is
C consecutive flat elements of its source, so its packed bytes and blocks are consecutive too. Table
lookups stay scalar (LLVM emits no gathers for this CPU family), so a byte's two values are one 8-byte load.

>>> from fusegrad.quant.nf4 import NF4_CODE, quantize_nf4
>>> q = quantize_nf4(np.random.default_rng(0).standard_normal((6, 70)).astype(np.float32))
>>> out = np.empty(q.shape, np.float32)
>>> bool((dequantize_nf4(q, NF4_CODE, out) == q.dequantize()).all())
True
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from fusegrad.backends.jit_common import is_f32, kernel  # also sets numba's threading layer
from fusegrad.core.errors import ShapeError

_NO_INDEX = np.zeros(1, np.uint8)  # placeholders for the arrays a plain (not double-quantized) tensor lacks
_NO_FLOAT = np.zeros(1, np.float32)


@kernel(cache=True)  # no fastmath: the products must round exactly as numpy's
def _dequantize_rows(packed, scales, absmax, absmax_code, nested_absmax, offset, nested_blocksize,
                     double_quant, code, blocksize, src_rows, out, by_words):
    # out (R, C): row r = the dequantized row src_rows[r] of the (n / C, C) source. Element f of the
    # source is nibble f & 1 (0: high) of packed[f >> 1], scaled by block f // blocksize: scales[b], or
    # (double quant) from the uint8 absmax[b]. Each row is written in two passes while it sits in L1:
    # codes, then scales block segment by block segment. by_words: C is even and out 8-byte aligned
    R, C = out.shape
    pairs = np.empty(512, np.float32)  # byte -> its two code values, read as one 8-byte word (no gathers)
    for i in range(256):
        pairs[2 * i] = code[i >> 4]
        pairs[2 * i + 1] = code[i & 15]
    pairs64 = pairs.view(np.uint64)
    for r in prange(R):
        f0 = src_rows[r] * C
        dst = out[r]
        if by_words:  # every row starts on a byte and on 8 bytes of out: one word per byte
            src, dst64 = packed[f0 >> 1:(f0 + C) >> 1], dst.view(np.uint64)
            for k in range(C // 2):
                dst64[k] = pairs64[src[k]]
        else:
            for j in range(C):
                f = f0 + j
                byte = packed[f >> 1]
                dst[j] = code[byte & 15] if f & 1 else code[byte >> 4]
        j = 0
        while j < C:
            b = (f0 + j) // blocksize
            end = min(C, (b + 1) * blocksize - f0)  # the segment [j, end) of row r lies in block b
            if double_quant:
                s = absmax_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset
            else:
                s = scales[b]
            seg = dst[j:end]  # a slice: its index starts at 0, so the loop vectorises
            for k in range(seg.size):
                seg[k] *= s
            j = end


def dequantize_part(q, code, src_rows, out) -> None:
    """One NF4Tensor (rows, C) into C-contiguous out (rows, C), out's row r from q's row src_rows[r]."""
    if q.double_quant:  # one compiled signature for both kinds: the unused arrays are placeholders
        scales, absmax, absmax_code, nested, offset = _NO_FLOAT, q.absmax, q.scale_code, q.nested_absmax, q.offset
    else:
        scales, absmax, absmax_code, nested, offset = q.absmax, _NO_INDEX, _NO_FLOAT, _NO_FLOAT, 0.0
    _dequantize_rows(q.packed, scales, absmax, absmax_code, nested, np.float32(offset), q.nested_blocksize,
                     q.double_quant, code, q.blocksize, src_rows, out,
                     out.shape[1] % 2 == 0 and out.ctypes.data % 8 == 0)


def row_map(unpermute, rows: int) -> np.ndarray:
    """src (rows,) int64: row r of unpermute(w) is row src[r] of w (unpermute: a row permutation)."""
    return unpermute(np.arange(rows, dtype=np.int64).reshape(rows, 1)).reshape(rows)


def dequantize_nf4(q, code, out) -> np.ndarray:
    """An NF4Tensor or FusedNF4 (its parts dequantized each into its rows, unpermuted) -> out; returns out.

    out: C-contiguous float32 of q's shape, written whole (no temporaries the size of the weight);
    code: the 16 NF4 values, float32.
    """
    if out.shape != tuple(q.shape) or not is_f32(out) or not out.flags.c_contiguous:
        raise ShapeError(f"dequantize_nf4: out must be C-contiguous float32 {tuple(q.shape)}, got {out.dtype} "
                         f"{out.shape}{'' if out.flags.c_contiguous else ' (not C-contiguous)'}")
    code = np.ascontiguousarray(code, dtype=np.float32)
    out2 = out.reshape(-1, out.shape[-1]) if out.ndim != 2 else out
    parts = q.parts if hasattr(q, "parts") else [(q, None)]
    lo = 0
    for part, unpermute in parts:
        rows = part.size // out2.shape[1]
        src = np.arange(rows, dtype=np.int64) if unpermute is None else row_map(unpermute, rows)
        dequantize_part(part, code, src, out2[lo:lo + rows])
        lo += rows
    return out


def prewarm() -> None:
    """Compile (or load from numba's disk cache) the kernel: one signature serves both kinds of scales."""
    _dequantize_rows(np.zeros(4, np.uint8), _NO_FLOAT, _NO_INDEX, np.zeros(256, np.float32), _NO_FLOAT,
                     np.float32(0), 256, True, np.zeros(16, np.float32), 64, np.zeros(1, np.int64),
                     np.empty((1, 8), np.float32), True)
