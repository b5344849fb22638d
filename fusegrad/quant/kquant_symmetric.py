"""ggml's K-quants with one signed scale per block (Q3_K, Q6_K): one super-block of 256 values at a time, compiled by
numba, byte for byte as ggml's quantize_row_q3_K_ref / q6_K_ref (ggml-quants.c) write them.

Each block of 16 values is fitted with weights x^2 (make_q3_quants / make_qx_quants: value ~ scale * L); the
super-block stores its scale of largest magnitude as fp16 d and each block's as a signed fraction of it (6 bits
for Q3_K, 8 for Q6_K), then fits the levels again to the scales as stored. Every float operation is C's, in C's
order (ggml_scalar.EXACT). A block function takes the super-block x (256,) float32, its bytes out, and scratch:
L (256,) and small (64,) int32, f (256,) float32.

Byte layouts (ggml-common.h): Q3_K: 32 bytes of high bits (value j's in bit j // 32 of byte j % 32), 64 of low
2 bits, 12 of 6-bit scales, d (110). Q6_K: 128 bytes of low nibbles, 64 of top 2 bits, 16 int8 scales, d (210).
"""
from __future__ import annotations

from numba import njit

from fusegrad.quant.ggml_scalar import EXACT, F32, GROUP_MAX_EPS, as_int8, fp16_bits, fp16_value, nearest_int, put_fp16


@njit(inline="always", **EXACT)
def peak(x):
    """(|largest|, the value) of x as C's `if (ax > amax)` from 0 finds it: the first, never a NaN."""
    amax = mx = F32(0)
    for i in range(x.size):
        if abs(x[i]) > amax:
            amax, mx = abs(x[i]), x[i]
    return amax, mx


@njit(inline="always", **EXACT)
def signed_fit(x, w, wx, iscale, nmax, l, a, b):
    """l[i] = nearest_int(iscale * x[i]) clamped to -nmax..nmax - 1 -> (sum w x l, sum w l^2) as C adds them, left
    to right; the levels and the terms w x l, w l l (into a, b) in loops LLVM vectorises."""
    for i in range(x.size):
        l[i] = min(max(nearest_int(iscale * x[i]), -nmax), nmax - 1)
        a[i] = wx[i] * F32(l[i])
        b[i] = w[i] * F32(l[i]) * F32(l[i])
    sumlx = suml2 = F32(0)
    for i in range(x.size):
        sumlx += a[i]
        suml2 += b[i]
    return sumlx, suml2


@njit(inline="always", **EXACT)
def weights(x, tmp):
    """C's weights w = x^2 and w x, as C rounds them, into tmp -> (w, wx, and two more scratch rows)."""
    n = x.size
    w, wx = tmp[:n], tmp[n:2 * n]
    for i in range(n):
        w[i] = x[i] * x[i]
        wx[i] = w[i] * x[i]
    return w, wx, tmp[2 * n:3 * n], tmp[3 * n:4 * n]


@njit(**EXACT)
def make_qx_quants(x, nmax, L, l, tmp):
    """ggml's make_qx_quants(rmse_type 1, no weights): levels 0..2 nmax - 1 into L -> the scale (value ~ scale *
    (L - nmax)), the best of 19 trial scales with weights x^2. l (n,) int32 and tmp (>= 4n) float32: scratch."""
    amax, mx = peak(x)
    if amax < GROUP_MAX_EPS:
        L[:x.size] = 0
        return F32(0)
    w, wx, a, b = weights(x, tmp)
    sumlx, suml2 = signed_fit(x, w, wx, F32(-nmax) / mx, nmax, l, a, b)
    for i in range(x.size):
        L[i] = l[i] + nmax
    scale = sumlx / suml2 if suml2 != 0 else F32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = signed_fit(x, w, wx, -(F32(nmax) + F32(0.1) * F32(step)) / mx, nmax, l, a, b)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(x.size):
                L[i] = l[i] + nmax
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(**EXACT)
def make_q3_quants(x, nmax, L, l, tmp):
    """ggml's make_q3_quants(do_rmse): levels 0..2 nmax - 1 into L -> the scale, by up to 5 rounds of moving one
    level at a time where that improves the weighted (x^2) fit. l (n,) int32 and tmp (>= 4n) float32: scratch."""
    amax, mx = peak(x)
    if amax < GROUP_MAX_EPS:
        L[:x.size] = 0
        return F32(0)
    w, wx, a, b = weights(x, tmp)
    sumlx, suml2 = signed_fit(x, w, wx, F32(-nmax) / mx, nmax, L, a, b)
    for _ in range(5):
        changed = False
        for i in range(x.size):
            slx = sumlx - wx[i] * F32(L[i])
            if slx > 0:
                sl2 = suml2 - w[i] * F32(L[i]) * F32(L[i])
                new_l = min(max(nearest_int(x[i] * sl2 / slx), -nmax), nmax - 1)
                if new_l != L[i]:
                    slx += wx[i] * F32(new_l)
                    sl2 += w[i] * F32(new_l) * F32(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new_l, slx, sl2
                        changed = True
        if not changed:
            break
    for i in range(x.size):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else F32(0)


@njit(**EXACT)
def refit_signed(x, L, nmax, d, sc, size):
    """The levels (0..2 nmax - 1) of each block of `size` fitted to its scale as stored, d * sc[j]; ggml keeps the
    first fit's levels where that is 0."""
    for j in range(x.size // size):
        sd = d * F32(sc[j])
        if sd == 0:  # C's `if (!d) continue`: NaN goes on
            continue
        for i in range(size * j, size * j + size):
            L[i] = min(max(nearest_int(x[i] / sd), -nmax), nmax - 1) + nmax


@njit(**EXACT)
def largest_scale(x, L, small, f, q3):
    """Each block of 16's scale into f[:16] (q3: Q3_K's make_q3_quants, else Q6_K's make_qx_quants) -> the one of
    largest magnitude (the first; 0 when all are 0 or NaN) and that magnitude."""
    amax = largest = F32(0)
    for j in range(16):
        xb, Lb, l, tmp = x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], small[16:32], f[64:]
        f[j] = make_q3_quants(xb, 4, Lb, l, tmp) if q3 else make_qx_quants(xb, 32, Lb, l, tmp)
        if abs(f[j]) > amax:
            amax, largest = abs(f[j]), f[j]
    return largest, amax


@njit(**EXACT)
def q3_k_block(x, out, L, small, f):
    largest, _ = largest_scale(x, L, small, f, True)
    sc = small[:16]
    sc[:] = 0  # all scales 0: stored as 0 (-32), d 0, and the first fit's levels stay
    d = 0
    if largest != 0:
        iscale = F32(-32) / largest
        for j in range(16):
            sc[j] = max(-32, min(31, as_int8(nearest_int(iscale * f[j])))) + 32
        d = fp16_bits(F32(1) / iscale)
    out[96:108] = 0
    for j in range(16):  # low nibbles: blocks 0-7 in bytes 0-7's low half, 8-15 in their high; top 2 bits in 8-11
        out[96 + j % 8] |= (sc[j] & 0xF) << (4 * (j // 8))
        out[104 + j % 4] |= (sc[j] >> 4) << (2 * (j // 4))
        sc[j] -= 32
    refit_signed(x, L, 4, fp16_value(d), sc, 16)
    for i in range(32):  # value 32 k + i's third bit in bit k of byte i
        bits = 0
        for k in range(8):
            if L[32 * k + i] > 3:
                bits |= 1 << k
                L[32 * k + i] -= 4
        out[i] = bits
    for h in range(2):  # each half of 128: value 32 k + i in bits 2k of byte i
        for i in range(32):
            b = 128 * h + i
            out[32 + 32 * h + i] = L[b] | L[b + 32] << 2 | L[b + 64] << 4 | L[b + 96] << 6
    put_fp16(out, 108, d)


@njit(**EXACT)
def q6_k_block(x, out, L, small, f):
    largest, amax = largest_scale(x, L, small, f, False)
    if amax < GROUP_MAX_EPS:  # the whole super-block written as zeros
        out[:] = 0
        return
    iscale = F32(-128) / largest
    d = fp16_bits(F32(1) / iscale)
    sc = small[:16]
    for j in range(16):  # ggml narrows min(127, l) into an int8
        sc[j] = as_int8(min(127, nearest_int(iscale * f[j])))
        out[192 + j] = sc[j] & 0xFF
    refit_signed(x, L, 32, fp16_value(d), sc, 16)
    for h in range(2):  # each half of 128: value 32k + i's low nibble in byte i (+32 for k odd; high nibble for
        for i in range(32):  # k >= 2), its top 2 bits in bits 2k of qh byte i
            b = 128 * h + i
            out[64 * h + i] = (L[b] & 0xF) | (L[b + 64] & 0xF) << 4
            out[64 * h + 32 + i] = (L[b + 32] & 0xF) | (L[b + 96] & 0xF) << 4
            out[128 + 32 * h + i] = L[b] >> 4 | (L[b + 32] >> 4) << 2 | (L[b + 64] >> 4) << 4 | (L[b + 96] >> 4) << 6
    put_fp16(out, 208, d)
