"""ggml's K-quants with a scale and a min per block (Q2_K, Q4_K, Q5_K): one super-block of 256 values at a time,
compiled by numba, byte for byte as ggml's quantize_row_q2_K_ref / q4_K / q5_K (ggml-quants.c) write them.

Each block's levels L (0..nmax) and its scale s and min m (value ~ s L - m) come from make_qkx2_quants: the best fit
of sum w |s L - m - x|^p over trial scales; the super-block then stores its largest scale and min as fp16 d, dmin
and each block's as a fraction of those (4 bits for Q2_K's 16 blocks of 16, 6 bits for Q4_K / Q5_K's 8 blocks of
32), and the levels are fitted again to the scales as stored. Every float operation is C's, in C's order
(ggml_scalar.EXACT). A block function takes the super-block x (256,) float32, its bytes out, and scratch: L (256,)
and small (64,) int32, f (256,) float32.

Byte layouts (ggml-common.h): Q2_K: 16 bytes of scale | min << 4, 64 of 2-bit levels, d, dmin (84). Q4_K: d, dmin,
12 bytes of 6-bit scales and mins, 128 of 4-bit levels (144). Q5_K: Q4_K's with 32 bytes of fifth bits before the
levels (176).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from fusegrad.quant.ggml_scalar import EXACT, F32, fp16_bits, fp16_value, nearest_int, put_fp16


@njit(inline="always", **EXACT)
def levels(xm, iscale, nmax, L):
    """L[i] = nearest_int(iscale * xm[i]) clamped to 0..nmax (a loop LLVM vectorises)."""
    for i in range(xm.size):
        L[i] = min(max(nearest_int(iscale * xm[i]), 0), nmax)


@njit(inline="always", **EXACT)
def fit_error(x, w, L, scale, lo, use_mad, t):
    """sum w |scale L + lo - x|^(1 or 2), added left to right; the terms (into t) in a loop LLVM vectorises."""
    for i in range(x.size):
        diff = scale * F32(L[i]) + lo - x[i]
        t[i] = w[i] * (abs(diff) if use_mad else diff * diff)
    err = F32(0)
    for i in range(x.size):
        err += t[i]
    return err


@njit(**EXACT)
def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, L, Laux, tmp):
    """ggml's make_qkx2_quants on x (n,) with weights w (n,): levels into L[:n] -> (scale, min) with
    value ~ scale * L - min, the best of nstep + 1 trial scales by sum w diff^2 (use_mad: sum w |diff|).
    tmp: >= 4n floats of scratch. C's sums add as they go; here each loop first computes its terms as C rounds
    them, in vector registers, then adds them in C's order, so that only the additions stay scalar."""
    n = x.size
    xm, t, wl, wl2 = tmp[:n], tmp[n:2 * n], tmp[2 * n:3 * n], tmp[3 * n:4 * n]
    lo, hi = x[0], x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if lo > 0:
        lo = F32(0)
    if hi == lo:
        L[:n] = 0
        return F32(0), -lo
    for i in range(n):
        xm[i] = x[i] - lo
    iscale = F32(nmax) / (hi - lo)
    scale = F32(1) / iscale
    levels(xm, iscale, nmax, L)
    best = fit_error(x, w, L, scale, lo, use_mad, t)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + F32(nmax)) / (hi - lo)
        levels(xm, iscale, nmax, Laux)
        for i in range(n):
            wl[i] = w[i] * F32(Laux[i])
            wl2[i] = wl[i] * F32(Laux[i])
            t[i] = wl[i] * x[i]
        sum_l = sum_l2 = sum_xl = F32(0)
        for i in range(n):
            sum_l += wl[i]
            sum_l2 += wl2[i]
            sum_xl += t[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:  # a min above 0 is none: the scale fitted alone
                this_min = F32(0)
                this_scale = sum_xl / sum_l2
            err = fit_error(x, w, Laux, this_scale, this_min, use_mad, t)
            if err < best:
                L[:n] = Laux[:n]
                best, scale, lo = err, this_scale, this_min
                for i in range(n):  # C's later trials level x - the new min
                    xm[i] = x[i] - lo
    return scale, -lo


@njit(**EXACT)
def refit(x, L, nmax, d, dmin, ls, lm, size):
    """The levels of each block of `size` fitted to its scale and min as stored: d * ls[j], dmin * lm[j] (ggml
    keeps make_qkx2_quants' levels where the scale is 0)."""
    for j in range(x.size // size):
        sd = d * F32(ls[j])
        if sd == 0:  # C's `if (!d) continue`: NaN goes on
            continue
        sm = dmin * F32(lm[j])
        for i in range(size * j, size * j + size):
            L[i] = min(max(nearest_int((x[i] + sm) / sd), 0), nmax)


@njit(**EXACT)
def q2_k_block(x, out, L, small, f):
    w, scales, mins = f[:16], f[16:32], f[32:48]
    max_scale = max_min = F32(0)
    for j in range(16):
        xb = x[16 * j:16 * j + 16]
        for i in range(16):
            w[i] = abs(xb[i])
        scales[j], mins[j] = make_qkx2_quants(xb, w, 3, F32(-0.5), F32(0.1), 15, True, L[16 * j:16 * j + 16], small,
                                              f[64:])
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    d = dmin = 0
    out[:16] = 0
    if max_scale > 0:  # ggml stores nearest_int's int in the byte as it is (no clamp)
        iscale = F32(15) / max_scale
        for j in range(16):
            out[j] = nearest_int(iscale * scales[j]) & 0xFF
        d = fp16_bits(max_scale / F32(15))
    if max_min > 0:
        iscale = F32(15) / max_min
        for j in range(16):
            out[j] = (out[j] | nearest_int(iscale * mins[j]) << 4) & 0xFF
        dmin = fp16_bits(max_min / F32(15))
    ls, lm = small[:16], small[16:32]
    for j in range(16):
        ls[j], lm[j] = out[j] & 0xF, out[j] >> 4
    refit(x, L, 3, fp16_value(d), fp16_value(dmin), ls, lm, 16)
    for h in range(2):  # each half of 128: value 32 k + i in bits 2k of byte i
        for i in range(32):
            b = 128 * h + i
            out[16 + 32 * h + i] = L[b] | L[b + 32] << 2 | L[b + 64] << 4 | L[b + 96] << 6
    put_fp16(out, 80, d)
    put_fp16(out, 82, dmin)


@njit(**EXACT)
def scale_min_header(x, out, nmax, rmin, nstep, L, small, f):
    """Q4_K / Q5_K's common part: levels into L (0..nmax), d, dmin and the 12 scale bytes into out[0:16]."""
    w, scales, mins = f[:32], f[32:40], f[40:48]
    Laux, ls, lm = small[:32], small[32:40], small[40:48]
    max_scale = max_min = F32(0)
    for j in range(8):
        xb = x[32 * j:32 * j + 32]
        sum_x2 = F32(0)
        for i in range(32):
            sum_x2 += xb[i] * xb[i]
        av_x = np.sqrt(sum_x2 / F32(32))
        for i in range(32):
            w[i] = av_x + abs(xb[i])
        scales[j], mins[j] = make_qkx2_quants(xb, w, nmax, rmin, F32(0.1), nstep, False, L[32 * j:32 * j + 32], Laux,
                                              f[64:])
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_min = F32(63) / max_min if max_min > 0 else F32(0)
    for j in range(8):  # 6 bits each (ggml: the int narrowed to a uint8, then capped at 63)
        ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    for j in range(4):  # blocks 0-3 whole in bytes 4-7 / 8-11, 4-7's low nibbles in 12-15, top bits in 4-11's top
        out[4 + j] = ls[j] | (ls[j + 4] >> 4) << 6
        out[8 + j] = lm[j] | (lm[j + 4] >> 4) << 6
        out[12 + j] = (ls[j + 4] & 0xF) | (lm[j + 4] & 0xF) << 4
    d, dmin = fp16_bits(max_scale / F32(63)), fp16_bits(max_min / F32(63))
    put_fp16(out, 0, d)
    put_fp16(out, 2, dmin)
    refit(x, L, nmax, fp16_value(d), fp16_value(dmin), ls, lm, 32)


@njit(**EXACT)
def q4_k_block(x, out, L, small, f):
    scale_min_header(x, out, 15, F32(-1.0), 20, L, small, f)
    for c in range(4):  # each 64 values: the first 32 in the low nibbles, the next 32 in the high
        for i in range(32):
            out[16 + 32 * c + i] = L[64 * c + i] | L[64 * c + 32 + i] << 4


@njit(**EXACT)
def q5_k_block(x, out, L, small, f):
    scale_min_header(x, out, 31, F32(-0.5), 15, L, small, f)
    out[16:48] = 0
    for c in range(4):  # value 64c + i's fifth bit is bit 2c of qh[i], value 64c + 32 + i's bit 2c + 1
        for i in range(32):
            lo, hi = L[64 * c + i], L[64 * c + 32 + i]
            out[16 + i] |= (lo >> 4) << (2 * c) | (hi >> 4) << (2 * c + 1)
            out[48 + 32 * c + i] = (lo & 0xF) | (hi & 0xF) << 4
