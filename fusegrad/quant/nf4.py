"""NF4 (4-bit NormalFloat) weights exactly as bitsandbytes stores them, in NumPy.

A float32 array is flattened and cut into blocks of `blocksize` (64) values. Each block is divided by
its absmax and every value snaps to the nearest of the 16 `NF4_CODE` values; two 4-bit indices share a
byte, the FIRST element in the HIGH nibble. Dequantizing is `NF4_CODE[idx] * absmax[block]`.

Double quantization (QLoRA) shrinks the per-block float32 absmax values (0.5 bit/param) to 8 bits:
subtract their mean (`offset`), cut them into blocks of 256, divide each by its own absmax (one float32
`nested_absmax` per 256 blocks) and snap to the nearest value of bitsandbytes' signed dynamic 8-bit map
(`DYNAMIC_CODE`, from `create_dynamic_map`). About 0.127 bit/param of overhead remains.

A size that is not a multiple of the block size is handled as bitsandbytes does: the last, shorter
block gets the absmax of its own values (stored clamped to >= 1e-38); an odd count is padded with one
0.0 (code 7) in the packed bytes. Packing and non-nested scales are bit-identical to bitsandbytes, and
so is dequantizing a given state. The nested (double-quant) state can differ slightly: `offset` is the
mean accumulated in float64 (torch sums in float32: an ulp apart at most), and the 8-bit scale codes
are the exact nearest map values, where bitsandbytes' CPU binary search rounds a few values lying just
below a midpoint up by one code.

>>> import numpy as np
>>> w = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
>>> q = quantize_nf4(w)
>>> q.packed.shape, q.dequantize().shape
((64,), (2, 64))
>>> float(np.abs(q.dequantize() - w).max()) < 0.153  # half the widest code gap, (1 - 0.696) / 2
True
>>> round(q.fp32_ratio(), 3) <= 0.16
True
"""
from __future__ import annotations

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.quant.fused import Fused

# The 16 NF4 values (bitsandbytes, QLoRA paper appendix), index 0..15, sorted ascending.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)

# Decision boundaries between adjacent codes, computed in float32 like bitsandbytes' quantize_4bit.
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)

# Byte -> (high-nibble value, low-nibble value): dequantizing is one gather of (nbytes, 2) pairs.
_NF4_PAIRS = np.stack([NF4_CODE[np.arange(256) >> 4], NF4_CODE[np.arange(256) & 15]], axis=1)

NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) bit for bit: float32 step, the first half counted
    up from start and the second half down from end, each value rounded once (torch uses an FMA)."""
    start32, end32 = np.float64(np.float32(start)), np.float64(np.float32(end))
    step = np.float64(np.float32((np.float32(end) - np.float32(start)) / np.float32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    return np.where(i < steps // 2, start32 + step * i, end32 - step * (steps - 1 - i)).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic 8-bit map (Dettmers 2015), bit for bit: a sign, a unary decimal exponent,
    then as many linear fraction bits as remain. Exponent level i holds the midpoints of a uniform
    float32 grid on [0.1, 1] times 10**(i - max_exponent_bits + 1); plus 0 and 1.0, sorted.

    >>> m = create_dynamic_map()
    >>> m.shape, float(m[0]) > -1.0, float(m[-1]), int((m == 0).sum())
    ((256,), True, 1.0, 1)
    """
    non_sign_bits = total_bits - 1
    values: list = []

    def add_level(n_means: int, exponent: int) -> None:
        edges = _linspace_f32(0.1, 1.0, n_means + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2)
        scale = np.float32(10.0 ** exponent)  # torch scales a float32 tensor by a Python float in float32
        values.extend((scale * means).tolist())
        if signed:
            values.extend((-scale * means).tolist())

    for i in range(max_exponent_bits):
        add_level(2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)), i - max_exponent_bits + 1)
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:  # all-zero exponent with no indicator bit: one more linear level at the last scale
        add_level(extra, 0)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))  # bitsandbytes always returns 256 entries, zero-filled
    return np.array(sorted(values), dtype=np.float32)


DYNAMIC_CODE = create_dynamic_map()


def _nearest_dynamic(x: np.ndarray) -> np.ndarray:
    """Index of the nearest DYNAMIC_CODE value for each float32 x in [-1, 1] (ties -> lower index),
    the rule of bitsandbytes' CPU kernel: binary search for the left neighbour, then step right if
    strictly closer (distances in float32)."""
    left = np.clip(np.searchsorted(DYNAMIC_CODE, x, side="right") - 1, 0, DYNAMIC_CODE.size - 2)
    closer_right = np.abs(x - DYNAMIC_CODE[left + 1]) < np.abs(x - DYNAMIC_CODE[left])
    return (left + closer_right).astype(np.uint8)


def _blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """(n,) -> (ceil(n / blocksize), blocksize), zero-padded: zeros change no block's absmax."""
    pad = -flat.size % blocksize
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, flat.dtype)])
    return flat.reshape(-1, blocksize)


def _check_float_array(w, what: str) -> np.ndarray:
    w = np.asarray(w)
    if not np.issubdtype(w.dtype, np.floating):
        raise ShapeError(f"{what}: expected a floating-point array, got dtype {w.dtype}")
    if w.size == 0:
        raise ShapeError(f"{what}: cannot quantize an empty array of shape {w.shape}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        bad = np.flatnonzero(~np.isfinite(w.reshape(-1)))[0]
        raise ShapeError(f"{what}: non-finite value {w.reshape(-1)[bad]} at flat index {bad} of shape {w.shape}")
    return w


class NF4Tensor:
    """A frozen weight in bitsandbytes' NF4 layout.

    packed: uint8 (ceil(n / 2),)      two 4-bit code indices per byte, first element high
    absmax: float32 (n_blocks,)       per-block scales, or uint8 (n_blocks,) when double-quantized
    nested_absmax: float32 (ceil(n_blocks / 256),)   scales of the quantized absmax (double quant only)
    offset: float32 scalar            mean subtracted from absmax before quantizing it (double quant only)
    """
    scale_code = DYNAMIC_CODE  # what the uint8 absmax of a double-quantized tensor indexes
    nested_blocksize = NESTED_BLOCKSIZE
    format = "NF4"

    def __init__(self, packed, absmax, shape, blocksize=64, nested_absmax=None, offset=None):
        self.packed, self.absmax = packed, absmax
        self.shape, self.blocksize = tuple(int(s) for s in shape), int(blocksize)
        self.nested_absmax, self.offset = nested_absmax, offset

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes held: packed codes + all scales (+ the 4-byte offset with double quantization)."""
        n = self.packed.nbytes + self.absmax.nbytes
        return n + self.nested_absmax.nbytes + 4 if self.double_quant else n

    def fp32_ratio(self) -> float:
        """nbytes relative to the same weight stored in float32 (QLoRA with double quant: ~0.129)."""
        return self.nbytes / (4 * self.size)

    def block_scales(self) -> np.ndarray:
        """The float32 absmax of every 64-block, (n_blocks,); undoes the double quantization."""
        if not self.double_quant:
            return self.absmax
        nested = NESTED_BLOCKSIZE
        scales = DYNAMIC_CODE[self.absmax]
        full = scales.size - scales.size % nested  # a last short group has its own nested scale
        body = scales[:full].reshape(-1, nested)
        np.multiply(body, self.nested_absmax[: full // nested, None], out=body)
        scales[full:] *= self.nested_absmax[-1]
        scales += self.offset
        return scales

    def dequantize(self) -> np.ndarray:
        """float32 array of the original shape (the per-GEMM path of QLoRA)."""
        return self.dequantize_into(np.empty(self.shape, np.float32))

    def dequantize_into(self, out: np.ndarray) -> np.ndarray:
        """Dequantize into a preallocated C-contiguous float32 `out` of the original shape; returns it."""
        if out.shape != self.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ShapeError(f"NF4Tensor.dequantize_into: out must be C-contiguous float32 {self.shape}, "
                             f"got {out.dtype} {out.shape}")
        n, bs = self.size, self.blocksize
        flat = out.reshape(-1)
        pairs = n // 2
        # mode="clip": uint8 indices are always in range and it lets numpy write into `out` unbuffered
        np.take(_NF4_PAIRS, self.packed[:pairs], axis=0, out=flat[: 2 * pairs].reshape(pairs, 2), mode="clip")
        if n % 2:
            flat[-1] = NF4_CODE[self.packed[-1] >> 4]
        scales = self.block_scales()
        full = n - n % bs
        body = flat[:full].reshape(-1, bs)
        np.multiply(body, scales[: full // bs, None], out=body)
        flat[full:] *= scales[-1]
        return out

    def to_dict(self) -> dict:
        """numpy arrays only (safetensors-ready), key names as in bitsandbytes' QuantState.as_dict."""
        d = {"packed": self.packed, "absmax": self.absmax,
             "shape": np.array(self.shape, np.int64), "blocksize": np.array([self.blocksize], np.int64)}
        if self.double_quant:
            d["nested_absmax"] = self.nested_absmax
            d["nested_offset"] = np.array([self.offset], np.float32)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "NF4Tensor") -> "NF4Tensor":
        """Inverse of to_dict; `where` names the source (file, key prefix) in errors."""
        missing = [k for k in ("packed", "absmax", "shape", "blocksize") if k not in d]
        if missing:
            raise FormatError(f"{where}: missing NF4 entries {missing} (have {sorted(d)})")
        packed, absmax = np.asarray(d["packed"]), np.asarray(d["absmax"])
        shape = tuple(int(s) for s in np.asarray(d["shape"]).reshape(-1))
        blocksize = int(np.asarray(d["blocksize"]).reshape(-1)[0])
        n = int(np.prod(shape, dtype=np.int64))
        n_blocks = -(-n // blocksize) if blocksize > 0 else -1
        nested = "nested_absmax" in d
        want_absmax = np.uint8 if nested else np.float32
        problems = []
        if blocksize not in VALID_BLOCKSIZES:
            problems.append(f"blocksize {blocksize} not in {VALID_BLOCKSIZES}")
        if packed.dtype != np.uint8 or packed.shape != ((n + 1) // 2,):
            problems.append(f"packed is {packed.dtype} {packed.shape}, expected uint8 ({(n + 1) // 2},)")
        if absmax.dtype != want_absmax or absmax.shape != (n_blocks,):
            problems.append(f"absmax is {absmax.dtype} {absmax.shape}, expected {np.dtype(want_absmax)} ({n_blocks},)")
        nested_absmax = offset = None
        if nested:
            nested_absmax = np.asarray(d["nested_absmax"])
            n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
            if nested_absmax.dtype != np.float32 or nested_absmax.shape != (n_nested,):
                problems.append(f"nested_absmax is {nested_absmax.dtype} {nested_absmax.shape}, "
                                f"expected float32 ({n_nested},)")
            if "nested_offset" not in d:
                problems.append("nested_absmax present but nested_offset missing")
            else:
                offset = np.float32(np.asarray(d["nested_offset"]).reshape(-1)[0])
        if problems:
            raise FormatError(f"{where}: bad NF4 tensor for shape {shape}: " + "; ".join(problems))
        return cls(packed, absmax, shape, blocksize, nested_absmax, offset)

    def __repr__(self) -> str:
        return (f"NF4Tensor(shape={self.shape}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"{self.fp32_ratio():.3f}x fp32)")


def quantize_nf4(w: np.ndarray, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize a float array to NF4 (bit-identical packing to bitsandbytes' quantize_4bit).

    >>> q = quantize_nf4(np.float32([[0.5, -1.0], [0.0, 0.25]]), double_quant=False)
    >>> q.packed.tolist(), q.absmax.tolist()   # codes 12,0 | 7,10
    ([192, 122], [1.0])
    """
    if blocksize not in VALID_BLOCKSIZES:
        raise ConfigError(f"quantize_nf4: blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    w = _check_float_array(w, "quantize_nf4")
    n = w.size
    blocks = _blocks(w.reshape(-1), blocksize)                      # (n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)                             # (n_blocks,)
    if n % blocksize:  # bitsandbytes stores the short last block's absmax clamped to >= 1e-38
        absmax[-1] = max(absmax[-1], np.float32(1e-38))
    inv = np.float32(1) / np.maximum(absmax, np.float32(1e-38))     # bitsandbytes multiplies by 1/absmax
    scaled = np.clip(blocks * inv[:, None], -1, 1).reshape(-1)[: n + n % 2]  # pad zero -> code 7
    codes = np.searchsorted(_NF4_BOUNDS, scaled, side="left").astype(np.uint8)  # = torch.bucketize
    packed = (codes[0::2] << 4) | codes[1::2]
    if not double_quant:
        return NF4Tensor(packed, absmax, w.shape, blocksize)
    offset = np.float32(absmax.sum(dtype=np.float64) / absmax.size)
    centred = _blocks(absmax - offset, NESTED_BLOCKSIZE)            # (n_nested, 256)
    nested_absmax = np.abs(centred).max(axis=1)                     # (n_nested,)
    normed = centred / np.maximum(nested_absmax, np.float32(1e-38))[:, None]
    qabsmax = _nearest_dynamic(normed.reshape(-1)[: absmax.size])
    return NF4Tensor(packed, qabsmax, w.shape, blocksize, nested_absmax, offset)


def nf4_nbytes(n: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """NF4Tensor.nbytes of `n` values, without quantizing them (what a base kept otherwise would take in NF4).

    >>> nf4_nbytes(300 * 192) == quantize_nf4(np.ones((300, 192), np.float32)).nbytes
    True
    """
    blocks = -(-n // blocksize)
    if not double_quant:
        return (n + 1) // 2 + 4 * blocks
    return (n + 1) // 2 + blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4


class FusedNF4(Fused):
    """One weight made of row blocks quantized each on its own (QLoRA's q, k, v inside a fused q/k/v), as
    bitsandbytes quantizes each Hugging Face module: parts [(NF4Tensor, unpermute or None)] (fused.Fused)."""
    span = "nf4_dequantize"

    def dequantize_on(self, backend, out=None):
        return backend.dequantize_nf4(self, NF4_CODE, out)
