"""ggml's 32-value block types Q4_0, Q5_0, Q5_1 and Q8_0 (quantize_row_q4_0_ref ... in ggml-quants.c), one block at
a time, compiled by numba: what llama-quantize writes for the plain types and where a K-quant's 256-value
super-blocks do not fit a row (the fallbacks Q4_0, Q5_0, Q5_1, Q8_0); the same bytes as gguf's NumPy quantizers.

Q4_0 / Q5_0: d = (the value of largest magnitude) / -8 (-16), levels trunc(x / d + 8.5 (16.5)) capped at 15 (31);
Q5_1: d = (max - min) / 31, levels trunc((x - min) / d + 0.5) and the min as fp16 m; Q8_0: d = max |x| / 127,
levels roundf(x / d) (halves away from zero). Float to int conversions are C's: truncation to an int, then its low
byte. Byte layouts (ggml-common.h): Q4_0: d, 16 bytes of levels (value j in the low nibble of byte j, 16 + j in the
high) (18); Q5_0: d, 4 bytes of fifth bits (value j's in bit j, little-endian), 16 bytes of low nibbles (22); Q5_1:
d, m, then Q5_0's (24); Q8_0: d, 32 int8 levels (34).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from fusegrad.quant.ggml_scalar import EXACT, F32, as_int8, fp16_bits, put_fp16


@njit(inline="always", **EXACT)
def inverse(d):
    """C's `d ? 1.0f/d : 0.0f`."""
    return F32(1) / d if d != 0 else F32(0)


@njit(inline="always", **EXACT)
def c_int(v):
    """C's float to integer conversion (truncation; what x86 gives out of range) -> its low byte, signed."""
    return as_int8(np.int32(v))


@njit(**EXACT)
def signed_peak(x):
    """The value of largest magnitude (the first; 0 for none above 0)."""
    amax = peak = F32(0)
    for v in x:
        if amax < abs(v):
            amax, peak = abs(v), v
    return peak


@njit(**EXACT)
def nibbles_and_fifth_bits(q, out, at_qh, at_qs):
    """Levels q (32,) 0..31 -> 16 bytes of low nibbles at out[at_qs] and 32 fifth bits at out[at_qh] (4 bytes)."""
    qh = 0
    for j in range(16):
        out[at_qs + j] = (q[j] & 0x0F) | (q[j + 16] & 0x0F) << 4
        qh |= ((q[j] & 0x10) >> 4) << j | ((q[j + 16] & 0x10) >> 4) << (j + 16)
    for b in range(4):
        out[at_qh + b] = (qh >> (8 * b)) & 0xFF


@njit(**EXACT)
def q4_0_block(x, out, L, small, f):
    d = signed_peak(x) / F32(-8)
    i = inverse(d)
    put_fp16(out, 0, fp16_bits(d))
    for j in range(16):
        lo, hi = min(15, c_int(x[j] * i + F32(8.5))) & 0xFF, min(15, c_int(x[j + 16] * i + F32(8.5))) & 0xFF
        out[2 + j] = (lo | hi << 4) & 0xFF


@njit(**EXACT)
def q5_0_block(x, out, L, small, f):
    d = signed_peak(x) / F32(-16)
    i = inverse(d)
    put_fp16(out, 0, fp16_bits(d))
    for j in range(32):
        L[j] = min(31, c_int(x[j] * i + F32(16.5))) & 0xFF
    nibbles_and_fifth_bits(L, out, 2, 6)


@njit(**EXACT)
def q5_1_block(x, out, L, small, f):
    lo, hi = F32(3.4028234663852886e38), F32(-3.4028234663852886e38)
    for v in x:
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    d = (hi - lo) / F32(31)
    i = inverse(d)
    put_fp16(out, 0, fp16_bits(d))
    put_fp16(out, 2, fp16_bits(lo))
    for j in range(32):
        L[j] = c_int((x[j] - lo) * i + F32(0.5)) & 0xFF
    nibbles_and_fifth_bits(L, out, 4, 8)


@njit(**EXACT)
def q8_0_block(x, out, L, small, f):
    amax = F32(0)
    for v in x:
        amax = amax if amax > abs(v) else abs(v)  # C's MAX(amax, fabsf(v))
    d = amax / F32(127)
    i = inverse(d)
    put_fp16(out, 0, fp16_bits(d))
    for j in range(32):
        v = x[j] * i
        a = abs(v)
        r = np.floor(a)
        r += F32(1) if a - r >= F32(0.5) else F32(0)  # roundf: halves away from zero
        out[2 + j] = c_int(-r if v < 0 else r) & 0xFF
