"""llama.cpp's K-quants (GGML's Q2_K, Q3_K, Q4_K, Q5_K and Q6_K blocks), and the 32-value blocks Q4_0, Q5_0,
Q5_1, Q8_0 they fall back to, byte for byte as ggml's reference quantizers write them (`quantize_row_q2_K_ref` ...
in ggml-quants.c: what llama-quantize writes without an importance matrix).

A row is cut into super-blocks of 256 values (blocks of 32). The block kernels are numba, one block at a time in C's
float32 order (kquant_minmax: Q2_K, Q4_K, Q5_K with a scale and a min per block; kquant_symmetric: Q3_K, Q6_K with a
signed scale; block32: the 32-value types), run in parallel over runs of CHUNK blocks.

>>> import numpy as np
>>> w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
>>> q = quantize_k(w, "Q4_K")
>>> q.shape, q.dtype  # 2 super-blocks of 144 bytes a row
((4, 288), dtype('uint8'))
>>> float(np.abs(dequantize_k(q, "Q4_K") - w).max()) < 0.3
True
"""
from __future__ import annotations

from types import FunctionType

import numba
import numpy as np
from numba import njit, prange

from fusegrad.core.errors import ShapeError
from fusegrad.quant.block32 import q4_0_block, q5_0_block, q5_1_block, q8_0_block
from fusegrad.quant.ggml_scalar import EXACT
from fusegrad.quant.kquant_minmax import q2_k_block, q4_k_block, q5_k_block
from fusegrad.quant.kquant_symmetric import q3_k_block, q6_k_block

QK_K = 256
BLOCKS = {"Q2_K": q2_k_block, "Q3_K": q3_k_block, "Q4_K": q4_k_block, "Q5_K": q5_k_block, "Q6_K": q6_k_block,
          "Q4_0": q4_0_block, "Q5_0": q5_0_block, "Q5_1": q5_1_block, "Q8_0": q8_0_block}
KINDS = tuple(BLOCKS)
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q4_0": 18, "Q5_0": 22, "Q5_1": 24,
               "Q8_0": 34}
BLOCK_VALUES = {kind: QK_K if kind.endswith("_K") else 32 for kind in KINDS}
CHUNK = 64  # (super-)blocks a thread takes at a time, with one set of scratch arrays


def quantize_blocks(x, out):
    """x (n, values) float32 -> out (n, block bytes) uint8: each row one (super-)block by the global `block`, which
    each kind's twin of this function (KERNELS) binds to its block function."""
    n = x.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        L, small, f = np.empty(QK_K, np.int32), np.empty(64, np.int32), np.empty(256, np.float32)
        for i in range(c * CHUNK, min(n, c * CHUNK + CHUNK)):
            block(x[i], out[i], L, small, f)  # noqa: F821 (bound in the twin's globals)


def kernel(kind: str):
    """quantize_blocks for `kind`, compiled on first use and cached by numba under its own name, so that an export
    compiles only the kinds it writes (docs/performance.md, K-quant export)."""
    f = quantize_blocks
    twin = FunctionType(f.__code__, {**f.__globals__, "block": BLOCKS[kind]}, f"quantize_{kind.lower()}_blocks")
    twin.__qualname__ = twin.__name__
    return njit(parallel=True, **EXACT)(twin)


KERNELS = {kind: kernel(kind) for kind in KINDS}


def quantize_k(a, kind: str, threads: int | None = None):
    """float array (..., n), n a multiple of BLOCK_VALUES[kind] -> uint8 (..., n / values * block bytes): its rows
    as `kind` blocks (KINDS), the bytes ggml's quantize_row_*_ref write; on `threads` (None: numba's, every core)."""
    a = np.asarray(a, dtype=np.float32)
    values = BLOCK_VALUES[kind]
    if a.ndim == 0 or a.shape[-1] % values:
        what = f"{values}-value super-blocks" if values == QK_K else f"{values}-value blocks"
        raise ShapeError(f"{kind}: rows must be a whole number of {what}, got shape {a.shape}")
    x = np.ascontiguousarray(a).reshape(-1, values)
    out = np.empty((x.shape[0], BLOCK_BYTES[kind]), np.uint8)
    every = numba.get_num_threads()
    numba.set_num_threads(min(threads or every, numba.config.NUMBA_NUM_THREADS))
    try:
        KERNELS[kind](x, out)
    finally:
        numba.set_num_threads(every)
    return out.reshape(*a.shape[:-1], a.shape[-1] // values * BLOCK_BYTES[kind])


def dequantize_k(q, kind: str):
    """`quantize_k`'s bytes (..., nbytes) -> float32 (..., n), as the gguf package dequantizes them."""
    import gguf

    return gguf.quants.dequantize(np.asarray(q, np.uint8), getattr(gguf.GGMLQuantizationType, kind))
