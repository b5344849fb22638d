"""Frozen weights kept as a GGUF file stores them: ggml's quantized blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
Q5_K, Q6_K) or plain F16 / BF16 / F32 rows, dequantized on the fly (QLoRA on the file's own base).

A (rows, cols) weight is `raw` (rows, cols / B * S) uint8: each row cols / B blocks of B values in S bytes, in the
file's row order, untouched. Dequantizing is the gguf package's `gguf.quants.dequantize` (the reference here;
the numba kernel, fusegrad.backends.cpu_jit_ggml, equals it bit for bit). Block layouts: ggml's ggml-common.h.

>>> import gguf
>>> w = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
>>> t = GGMLTensor(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), 8, (3, 64))
>>> t.format, t.nbytes, float(np.abs(t.dequantize() - w).max()) < 0.02
('Q8_0', 204, True)
"""
from __future__ import annotations

import numpy as np

from fusegrad.core.errors import FormatError
from fusegrad.quant.fused import Fused

# ggml type number (gguf.GGMLQuantizationType) -> (name, values per block, bytes per block, byte offsets of the
# block's fp16 scales: d, and dmin / m where it has one)
TYPES = {0: ("F32", 1, 4, ()), 1: ("F16", 1, 2, ()), 30: ("BF16", 1, 2, ()),
         8: ("Q8_0", 32, 34, (0,)), 2: ("Q4_0", 32, 18, (0,)), 3: ("Q4_1", 32, 20, (0, 2)),
         6: ("Q5_0", 32, 22, (0,)), 7: ("Q5_1", 32, 24, (0, 2)), 12: ("Q4_K", 256, 144, (0, 2)),
         13: ("Q5_K", 256, 176, (0, 2)), 14: ("Q6_K", 256, 210, (208,))}
FLOATS = (0, 1, 30)  # a base in these types is quantized to NF4 instead (4.1 bits a value, not 16 or 32)


def kept(qtype: int) -> bool:
    """Whether a weight in this ggml type can be kept as it is stored (the kernels decode it)."""
    return qtype in TYPES


def finite_values(raw: np.ndarray, qtype: int) -> bool:
    """Whether every value of `raw` blocks dequantizes finite: the floats themselves, or a quantized type's fp16
    scales (its codes are small integers times them, so finite scales give finite values; no pass over the data)."""
    _, _, size, scales = TYPES[qtype]
    if qtype == 0:
        return bool(np.isfinite(raw.view(np.float32)).all())
    if qtype in (1, 30):  # all exponent bits set: inf or NaN (BF16's exponent sits where F16's does, 8 bits wide)
        mask = 0x7C00 if qtype == 1 else 0x7F80
        return not ((raw.view(np.uint16) & mask) == mask).any()
    blocks = raw.reshape(-1, size)
    return all(np.isfinite(blocks[:, o:o + 2].copy().view(np.float16)).all() for o in scales)


class GGMLTensor:
    """A frozen (rows, cols) weight as ggml type `qtype` blocks: raw (rows, bytes per row) uint8, the file's rows.
    `where` (the file and tensor) names it in errors; FormatError for a type no kernel decodes, raw bytes that
    are not whole blocks of `shape`, or a non-finite value."""

    def __init__(self, raw: np.ndarray, qtype: int, shape, where: str = "GGML tensor"):
        if qtype not in TYPES:
            raise FormatError(f"{where}: ggml type {qtype} cannot be kept as a frozen base (kept: "
                              f"{', '.join(t[0] for t in TYPES.values())})")
        name, block, size, _ = TYPES[qtype]
        rows, cols = self.shape = tuple(int(s) for s in shape)
        want = (rows, cols // block * size)
        if raw.dtype != np.uint8 or raw.shape != want or cols % block:
            raise FormatError(f"{where}: {name} data {raw.dtype} {raw.shape} is not the whole blocks of a "
                              f"{self.shape} weight ({want} bytes, {block} values a block)")
        if not finite_values(raw, qtype):
            raise FormatError(f"{where}: {name} data holds NaN or inf (a value or a block scale); nothing "
                              f"non-finite is loaded")
        self.raw, self.qtype, self.format = np.ascontiguousarray(raw), qtype, name

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.raw.nbytes

    @property
    def block(self) -> tuple:
        """(values, bytes) of one block of its type."""
        return TYPES[self.qtype][1:3]

    def dequantize(self) -> np.ndarray:
        """float32 (rows, cols) by the gguf package (the reference the kernel is tested against)."""
        import gguf

        return np.asarray(gguf.quants.dequantize(self.raw, gguf.GGMLQuantizationType(self.qtype)),
                          np.float32).reshape(self.shape)

    def dequantize_into(self, out: np.ndarray) -> np.ndarray:
        out[...] = self.dequantize()
        return out

    def __repr__(self) -> str:
        return f"GGMLTensor({self.format}, shape={self.shape}, {self.nbytes / (4 * self.size):.3f}x fp32)"


class FusedGGML(Fused):
    """A fused projection kept as the GGUF file's own tensors: parts [(GGMLTensor, unpermute or None)]
    (fused.Fused), each in its own type (a Q4_K_M file mixes Q4_K and Q6_K)."""
    span = "ggml_dequantize"

    def dequantize_on(self, backend, out=None):
        return backend.dequantize_ggml(self, out)
