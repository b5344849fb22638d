"""The scalar arithmetic of ggml's reference quantizers (ggml-quants.c), for the numba block kernels of the
K-quants: ggml's `nearest_int` (the 1.5 * 2**23 magic number), C's narrowing of an int into an int8 / uint8 field,
and fp16 rounding (GGML_FP32_TO_FP16: round to nearest even) and widening.

Every kernel that uses these is compiled with EXACT: no fastmath, so that LLVM neither reassociates a sum nor
contracts a * b + c into an FMA (the library is built without FMA: each product and sum rounds to float32 in C's
order), and numpy's error model, so that a float division by zero gives inf or NaN as in C instead of raising.

>>> from numba import njit
>>> njit(lambda v: nearest_int(v))(np.float32(2.5)), njit(lambda v: nearest_int(v))(np.float32(-3.5))
(2, -4)
>>> [hex(njit(lambda f: fp16_bits(f))(np.float32(v))) for v in (1.0, 65520.0, 2.0 ** -25, 3 * 2.0 ** -26)]
['0x3c00', '0x7c00', '0x0', '0x1']
"""
from __future__ import annotations

import numpy as np
from numba import njit

from fusegrad.backends.jit_common import bits_of_float32, float32_from_bits  # also sets numba's threading layer

EXACT = dict(cache=True, error_model="numpy")  # no fastmath: see above
F32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)


@njit(inline="always", **EXACT)
def nearest_int(v):
    """ggml's nearest_int of the float32 v: the integer in the mantissa bits of v + 1.5 * 2**23. Round half to even
    for |v| < 2**22; beyond that (and for inf or NaN) the same garbage C reads, which callers then clamp."""
    return (bits_of_float32(v + np.float32(12582912.0)) & 0x007FFFFF) - 0x00400000


@njit(inline="always", **EXACT)
def as_int8(i):
    """C's `int8_t l = i`: the low byte of i, signed."""
    return ((i + 128) & 0xFF) - 128


@njit(inline="always", **EXACT)
def fp16_bits(f):
    """float32 -> the bits of the nearest fp16 (ties to even; inf beyond 65520; NaN stays a quiet NaN)."""
    b = np.int64(bits_of_float32(f)) & 0xFFFFFFFF
    sign, e, m = (b >> 16) & 0x8000, (b >> 23) & 0xFF, b & 0x7FFFFF
    if e == 0xFF:
        return sign | 0x7C00 | (0x200 | (m >> 13) if m else 0)
    if e >= 113:  # a normal fp16 (or, rounding up from 65504, inf): 13 mantissa bits to round off
        h, rest, half = ((e - 112) << 10) | (m >> 13), m & 0x1FFF, 0x1000
    elif e >= 102:  # a subnormal fp16, in units of 2**-24
        shift = 126 - e
        h, rest, half = (m | 0x800000) >> shift, (m | 0x800000) & ((1 << shift) - 1), 1 << (shift - 1)
    else:
        return sign  # below half the smallest subnormal
    if rest > half or (rest == half and h & 1):
        h += 1  # a carry into the exponent is the next binade, or inf
    return sign | min(h, 0x7C00)


@njit(inline="always", **EXACT)
def fp16_value(h):
    """fp16 bits -> their float32 value (exact)."""
    sign, e, m = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    if e == 0:
        v = np.float32(m) * np.float32(5.9604644775390625e-08)  # m * 2**-24, exact
        return -v if sign else v
    bits = sign | (0x7F800000 if e == 31 else (e + 112) << 23) | (m << 13)
    return float32_from_bits(np.int32(bits - (1 << 32) if bits >= 1 << 31 else bits))


@njit(inline="always", **EXACT)
def put_fp16(out, at, h):
    """Write fp16 bits h little-endian at out[at], out[at + 1]."""
    out[at] = h & 0xFF
    out[at + 1] = h >> 8
