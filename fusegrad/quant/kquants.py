"""llama.cpp's K-quants (GGML's Q4_K, Q5_K and Q6_K blocks) in NumPy, byte for byte as ggml's reference
quantizers write them (`quantize_row_q4_K_ref` ... in ggml-quants.c: what llama-quantize writes without an
importance matrix).

A row is cut into super-blocks of 256 values. Q4_K / Q5_K split one into 8 blocks of 32, each with its own scale
and min (6 bits each, times the super-block's fp16 `d` / `dmin`), and values of 4 / 5 bits; Q6_K into 16 blocks
of 16 with an int8 scale (times fp16 `d`) and signed 6-bit values. Bit exactness means doing ggml's float32
arithmetic in its order: sums run left to right (C's loops; np.sum would pair them), every product and sum is
rounded to float32 (the library is built without FMA), and rounding is ggml's `nearest_int` magic-number trick.
Each function works on many super-blocks at once.

>>> import numpy as np
>>> w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
>>> q = quantize_k(w, "Q4_K")
>>> q.shape, q.dtype  # 2 super-blocks of 144 bytes a row
((4, 288), dtype('uint8'))
>>> float(np.abs(dequantize_k(q, "Q4_K") - w).max()) < 0.3
True
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fusegrad.core.errors import ShapeError

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}  # 2 fp16 + 12 scale bytes + 128 (+ 32 high bits); Q6_K's own
GROUP_MAX_EPS = np.float32(1e-15)
CHUNK = 512  # super-blocks quantized together: their temporaries stay in cache
f32 = np.float32


def nearest_int(v):
    """ggml's nearest_int: v + 1.5 * 2**23 in float32, the integer read from the mantissa bits. Round half to even
    for |v| < 2**22; beyond that (and for inf or NaN) the same bits C reads: (...) float32 -> int32."""
    return ((np.asarray(v, np.float32) + f32(12582912.0)).view(np.int32) & 0x007FFFFF) - 0x00400000


def running_sum(a):
    """(m, n) -> (n,): a[0] + a[1] + ... in float32, left to right as C's loops add (np.sum would pair them)."""
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def fp16_round(a):
    """float32 -> the nearest fp16 (GGML_FP32_TO_FP16 rounds to nearest even), as float16."""
    with np.errstate(over="ignore"):
        return a.astype(np.float16)


# -- Q4_K / Q5_K: 8 blocks of 32 with a scale and a min -----------------------------------------------------------
def make_qkx2_quants(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """ggml's make_qkx2_quants on each column of x (32, n), weights w (32, n): the levels L (32, n) in 0..nmax and
    scale, -min (n,) that minimize sum w (scale L + min - x)^2 over nstep + 1 trial scales. A block is a column
    so that the sums add contiguous rows."""
    sum_w, sum_x = running_sum(w), running_sum(w * x)
    lo, hi = np.minimum(x.min(axis=0), f32(0)), x.max(axis=0)  # (n,)
    flat = hi == lo
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / (hi - lo)
        scale = f32(1) / iscale
        L = np.clip(nearest_int(iscale[None] * (x - lo[None])), 0, nmax)
        diff = scale[None] * L.astype(f32) + lo[None] - x
        best = running_sum(w * (diff * diff))
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
            l = np.clip(nearest_int(iscale[None] * (x - lo[None])), 0, nmax)
            lf = l.astype(f32)
            wl = w * lf
            sum_l, sum_l2, sum_xl = running_sum(wl), running_sum(wl * lf), running_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0  # a min above 0: none, and the scale fit alone
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            this_min = np.where(positive, f32(0), this_min)
            diff = this_scale[None] * lf + this_min[None] - x
            err = running_sum(w * (diff * diff))
            better = (D > 0) & (err < best) & ~flat
            L = np.where(better[None], l, L)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    L = np.where(flat[None], 0, L)
    return np.where(flat, f32(0), scale), -lo, L


def quantize_scale_min(x, nmax: int, rmin: float, nstep: int):
    """x (nb, 256) float32 -> (d, dmin (nb,) float16, 6-bit scales, mins (nb, 8) uint8, levels (nb, 256) in 0..nmax):
    the Q4_K / Q5_K super-block before packing."""
    nb = x.shape[0]
    xb = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, blocks)
    av_x = np.sqrt(running_sum(xb * xb) / f32(32))
    weights = av_x[None] + np.abs(xb)
    scales, mins, L = make_qkx2_quants(xb, weights, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.T.reshape(nb, 8, 32)
    max_scale = np.where(scales > 0, scales, f32(0)).max(axis=1)  # C: `if (scale > max_scale)` from 0
    max_min = np.where(mins > 0, mins, f32(0)).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)  # stored in a uint8, then capped
        lm = np.minimum(nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        d, dmin = fp16_round(max_scale / f32(63)), fp16_round(max_min / f32(63))
        sd = d.astype(f32)[:, None] * ls.astype(f32)  # (nb, 8): each block's scale and min as dequantized
        sm = dmin.astype(f32)[:, None] * lm.astype(f32)
        final = np.clip(nearest_int((x.reshape(nb, 8, 32) + sm[..., None]) / sd[..., None]), 0, nmax)
    L = np.where(sd[..., None] != 0, final, L)  # a zero scale keeps make_qkx2_quants' levels
    return d, dmin, ls.astype(np.uint8), lm.astype(np.uint8), L.astype(np.uint8).reshape(nb, QK_K)


def pack_scale_min(ls, lm):
    """6-bit scales and mins (nb, 8) -> ggml's 12 bytes (get_scale_min_k4 reads them back): blocks 0-3 whole in
    bytes 0-3 / 4-7, blocks 4-7's low nibbles in bytes 8-11, their top 2 bits in bytes 0-7's top 2 bits."""
    lo, hi = slice(0, 4), slice(4, 8)
    return np.concatenate([ls[:, lo] | (ls[:, hi] >> 4) << 6, lm[:, lo] | (lm[:, hi] >> 4) << 6,
                           (ls[:, hi] & 0xF) | (lm[:, hi] & 0xF) << 4], axis=1)


def low_nibbles(L):
    """levels (nb, 256) -> (nb, 128): each 64 values' first 32 in the low nibbles, the next 32 in the high."""
    pairs = L.reshape(-1, 4, 2, 32)
    return ((pairs[:, :, 0] & 0xF) | (pairs[:, :, 1] & 0xF) << 4).reshape(-1, 128)


def quantize_q4_k(x):
    """(nb, 256) float32 -> (nb, 144) bytes: d, dmin (fp16), 12 scale bytes, 128 bytes of 4-bit levels."""
    d, dmin, ls, lm, L = quantize_scale_min(x, 15, -1.0, 20)
    return np.concatenate([halves(d), halves(dmin), pack_scale_min(ls, lm), low_nibbles(L)], axis=1)


def quantize_q5_k(x):
    """(nb, 256) float32 -> (nb, 176) bytes: d, dmin, 12 scale bytes, 32 bytes of fifth bits, 128 of low nibbles.
    Value 64c + j's fifth bit is bit 2c of qh[j], value 64c + 32 + j's bit 2c + 1."""
    d, dmin, ls, lm, L = quantize_scale_min(x, 31, -0.5, 15)
    fifth = (L.reshape(-1, 8, 32) >> 4).astype(np.uint8)  # (nb, 8, 32): the 32-value blocks in order
    qh = np.bitwise_or.reduce(fifth << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    return np.concatenate([halves(d), halves(dmin), pack_scale_min(ls, lm), qh, low_nibbles(L)], axis=1)


# -- Q6_K: 16 blocks of 16 with an int8 scale -----------------------------------------------------------------
def first_largest(a):
    """a (n, m) >= 0 -> (index of each row's first largest value, whether that is below GROUP_MAX_EPS), as C's
    `if (a[i] > amax)` from amax = 0 finds it: NaN never wins, and a row of zeros or NaN counts as zero."""
    a = np.where(a > 0, a, f32(0))
    first = np.argmax(a, axis=1)
    return first, np.take_along_axis(a, first[:, None], axis=1)[:, 0] < GROUP_MAX_EPS


def make_qx_quants(x, nmax: int):
    """ggml's make_qx_quants(rmse_type 1, no weights) on each column of x (16, n): levels (16, n) in 0..2 nmax - 1
    and the scale (n,) that best fit x with weights x^2 over 19 trial scales."""
    first, zero = first_largest(np.abs(x.T))
    peak = np.take_along_axis(x, first[None], axis=0)[0]
    w = x * x
    wx = w * x  # C's w*x[i]*l multiplies w*x first
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        def fit(iscale):  # -> levels (16, n) in -nmax..nmax-1, sum w x l, sum w l^2
            l = np.clip(nearest_int(iscale[None] * x), -nmax, nmax - 1)
            lf = l.astype(f32)
            return l, running_sum(wx * lf), running_sum(w * lf * lf)

        l, sumlx, suml2 = fit(f32(-nmax) / peak)
        L = l + nmax
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / peak)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better[None], l + nmax, L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero[None], 0, L), np.where(zero, f32(0), scale)


def quantize_q6_k(x):
    """(nb, 256) float32 -> (nb, 210) bytes: 128 bytes of low nibbles, 64 of top 2 bits, 16 int8 scales, d (fp16).
    In each half of 128, value 32k + l's low nibble is in ql[l (+32 for k odd)] (high nibble for k >= 2), its top
    bits in bits 2k of qh[l]."""
    nb = x.shape[0]
    L, scales = make_qx_quants(np.ascontiguousarray(x.reshape(nb * 16, 16).T), 32)  # blocks as columns
    L, scales = L.T.reshape(nb, QK_K), scales.reshape(nb, 16)
    first, zero = first_largest(np.abs(scales))  # zero: the whole super-block is written as zeros
    max_scale = np.take_along_axis(scales, first[:, None], axis=1)[:, 0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(-128) / max_scale
        d = fp16_round(f32(1) / iscale)
        sc = (np.minimum(nearest_int(iscale[:, None] * scales), 127) & 0xFF).astype(np.uint8).view(np.int8)
        sd = d.astype(f32)[:, None] * sc.astype(f32)  # (nb, 16)
        final = np.clip(nearest_int(x.reshape(nb, 16, 16) / sd[..., None]), -32, 31) + 32
    L = np.where(sd[..., None] != 0, final, L.reshape(nb, 16, 16)).reshape(nb, 2, 4, 32)  # halves, quarters
    ql = np.concatenate([(L[:, :, 0] & 0xF) | (L[:, :, 2] & 0xF) << 4, (L[:, :, 1] & 0xF) | (L[:, :, 3] & 0xF) << 4],
                        axis=2)
    qh = (L[:, :, 0] >> 4) | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6
    out = np.concatenate([ql.reshape(nb, 128).astype(np.uint8), qh.reshape(nb, 64).astype(np.uint8),
                          sc.view(np.uint8), halves(d)], axis=1)
    out[zero] = 0
    return out


def halves(h):
    """(nb,) float16 -> (nb, 2) its little-endian bytes."""
    return h.astype("<f2").view(np.uint8).reshape(-1, 2)


QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize_k(a, kind: str, threads: int | None = None):
    """float array (..., n), n a multiple of 256 -> uint8 (..., n / 256 * block bytes): its rows as `kind` blocks
    ("Q4_K", "Q5_K", "Q6_K"), the bytes ggml's quantize_row_*_ref write; on `threads` (None: every core)."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 0 or a.shape[-1] % QK_K:
        raise ShapeError(f"{kind}: rows must be a whole number of {QK_K}-value super-blocks, got shape {a.shape}")
    x = a.reshape(-1, QK_K)
    out = np.empty((x.shape[0], BLOCK_BYTES[kind]), np.uint8)

    def chunk(i):
        out[i:i + CHUNK] = QUANTIZERS[kind](x[i:i + CHUNK])
    starts = range(0, x.shape[0], CHUNK)
    threads = threads or os.cpu_count()
    if len(starts) == 1 or threads == 1:
        list(map(chunk, starts))
    else:  # numpy lets go of the GIL inside each array operation: 1.26-1.47x on 2 cores (docs/performance.md)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(chunk, starts))
    return out.reshape(*a.shape[:-1], a.shape[-1] // QK_K * BLOCK_BYTES[kind])


def dequantize_k(q, kind: str):
    """`quantize_k`'s bytes (..., nbytes) -> float32 (..., n), as the gguf package dequantizes them."""
    import gguf

    return gguf.quants.dequantize(np.asarray(q, np.uint8), getattr(gguf.GGMLQuantizationType, kind))
