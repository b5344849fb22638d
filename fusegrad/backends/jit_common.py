"""What every numba kernel shares: the jit settings, float32 exps and a row max that vectorise, the dtype
gate, a traced matmul for the fused ops. Kernels in other files inline `fast_exp`, `exp_shifted` and `row_max`:
after changing them or OPTIONS, delete numba's caches (`find fusegrad -name '*.nb[ic]' -delete`).

>>> from numba import njit
>>> njit(lambda x: fast_exp(x))(np.float32(0.0))
1.0
"""
from __future__ import annotations

import os
from types import FunctionType

import numba
import numpy as np
import llvmlite.binding as ll
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from fusegrad.backends.base import gemm_dims
from fusegrad.core.trace import span

# numba's own workqueue threads, not OpenMP's: GNU OpenMP's idle threads spin against OpenBLAS's GEMM
# threads (docs/performance.md). Set NUMBA_THREADING_LAYER to choose another.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


def _full_width_vectors() -> None:
    """On an AVX-512 CPU, let LLVM vectorise with 512-bit registers: for Intel server cores it prefers 256
    (its `prefer-256-bit` tuning), and the exps of the softmaxes then run 1.3-1.5x slower (docs/performance.md,
    round 7). Set at import, before numba builds its target machine; NUMBA_CPU_NAME or NUMBA_CPU_FEATURES in
    the environment keep the choice to the user. numba keys its disk cache by these features."""
    if numba.config.CPU_NAME is not None or numba.config.CPU_FEATURES is not None:
        return
    features = ll.get_host_cpu_features()
    if features.get("avx512f"):
        numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


_full_width_vectors()

# Reassociation (vectorised reductions) and FMA contraction only: no 'nnan'/'ninf', so -inf masks and
# NaNs still propagate exactly as in the reference.
FAST = {"reassoc", "contract", "arcp", "nsz"}
# error_model="numpy": a float division by zero gives inf/NaN instead of raising, so a loop with a division
# vectorises (numba's default checks every divisor: SiLU ran 7x slower, 6.6 against 0.9 ns an element)
OPTIONS = dict(cache=True, fastmath=FAST, error_model="numpy")
SERIAL_MAX_WORK = 1 << 16  # multiply-adds (or elements) under which a kernel's `serial` twin runs


class Kernel:
    """A numba kernel compiled for numba's threads (its prange loops shared out) and, at first need, again for
    the calling thread alone (`serial`, prange run as range). A thread whose numba thread count is 1 (a worker
    process, `one_core()`) always runs the serial twin: a parallel launch hands the loop to numba's pool and
    waits: 0.08-0.17 ms a call on a KVM guest even with one thread (docs/performance.md, round 15), against
    microseconds of work for many of these loops. On more threads a caller that knows its work small picks the
    twin with `sized`. The twin is cached on disk under its own name (numba keys its cache by name and bytecode, not
    by `parallel`)."""

    def __init__(self, f, options: dict):
        self.py_func, self.options = f, options
        self.parallel = njit(parallel=True, **options)(f)
        self._serial = None

    @property
    def serial(self):
        if self._serial is None:
            f = self.py_func
            twin = FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
            twin.__qualname__ = f.__qualname__ + "_serial"
            self._serial = njit(**self.options)(twin)
        return self._serial

    def sized(self, work: int, serial_below: int = SERIAL_MAX_WORK):
        """The serial twin for `work` (multiply-adds or elements) under `serial_below`, too little to wake the
        other threads for; else this kernel (which still runs serially on one thread)."""
        return self.serial if work < serial_below else self

    def __call__(self, *args):
        return (self.serial if numba.get_num_threads() == 1 else self.parallel)(*args)


def kernel(**options):
    """Decorator: the function as a `Kernel` compiled with these numba options (cache, fastmath, ...)."""
    return lambda f: Kernel(f, options)


jit = kernel(**OPTIONS)


@intrinsic
def bits_of_float32(typingctx, x):
    """The int32 IEEE bits of the float32 `x` (an LLVM bitcast)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits` (an LLVM bitcast, which vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@njit(inline="always", fastmath=FAST, cache=True)
def _exp_reduced(xc, kf):
    """e^r for r = xc - kf ln 2 (ln 2 split in two for exactness), |r| <= ln2 / 2: Cephes' expf polynomial."""
    r = xc - kf * np.float32(0.693359375) + kf * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * r * r + r + np.float32(1.0)


@njit(inline="always", fastmath=FAST, cache=True)
def fast_exp(x):
    """float32 exp that vectorises (numba's scalar expf does not: no SVML here); max relative error
    ~3e-7 over [-87, 88], exactly 0 below -87.33 and inf above 88.72 like expf, NaN stays NaN.

    exp(x) = 2^k e^r with k = round(x / ln 2), 2^k built from its exponent bits (a table gather is slower).
    """
    xc = min(max(x, np.float32(-87.0)), np.float32(88.0))
    kf = np.floor(xc * np.float32(1.44269504) + np.float32(0.5))
    k = min(max(np.int32(kf), np.int32(-126)), np.int32(127))  # a normal 2^k, also for a NaN's garbage kf
    p = _exp_reduced(xc, kf) * float32_from_bits((k + np.int32(127)) << np.int32(23))
    p = np.float32(0.0) if x < np.float32(-87.33) else p
    p = np.float32(np.inf) if x > np.float32(88.72) else p
    return x if x != x else p  # NaN in, NaN out: a NaN loss must stay visible to the trainer


@njit(inline="always", fastmath=FAST, cache=True)
def exp_shifted(x):
    """`fast_exp`, bit for bit, of x <= 88 that is not NaN, such as a softmax's x = value - (a finite row max):
    the upper clamps and the inf and NaN selects go (0.8 against 1.0 ns an element in the classifier's
    softmax). Callers keep `fast_exp` for a row whose max is not finite. -inf gives 0."""
    xc = max(x, np.float32(-87.0))
    kf = np.floor(xc * np.float32(1.44269504) + np.float32(0.5))  # in [-125, 127]: 2^k is normal
    p = _exp_reduced(xc, kf) * float32_from_bits((np.int32(kf) + np.int32(127)) << np.int32(23))
    return np.float32(0.0) if x < np.float32(-87.33) else p


@njit(inline="always", fastmath=FAST, cache=True)
def row_max(row, n):
    # max of row[:n], n >= 1, as an int32 max over order-preserving keys of the float bits (negative floats get
    # their magnitude bits flipped): LLVM vectorises an integer max, not numba's float max (3-5x slower).
    # A NaN (positive sign) is the largest key, so the row's exp sum and loss become NaN and stay visible
    m = np.int32(-2147483648)
    for j in range(n):
        b = bits_of_float32(row[j])
        m = max(m, b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF)))
    return float32_from_bits(m ^ ((m >> np.int32(31)) & np.int32(0x7FFFFFFF)))


def traced_matmul(a, b, op: str, out=None):
    """np.matmul(a, b, out=out) as a "gemm" span of a trace, like the backend's own GEMMs, tagged with the fused
    op it serves (`op`: "classifier", "attention"): a trace then counts those GEMMs as GEMM time, not as the
    op's overhead, and can still tell them from the projections'."""
    m, k, n, batch = gemm_dims(a.shape, b.shape, False, False)
    with span("gemm", "matmul", m=m, k=k, n=n, batch=batch, backend="numpy", op=op):
        return np.matmul(a, b, out=out)


def is_f32(*arrays) -> bool:
    """True when every array is a float32 ndarray: the only dtype the compiled kernels are built for."""
    for a in arrays:  # a loop, not all(<generator>): called a few hundred times a generated token
        if not (isinstance(a, np.ndarray) and a.dtype == np.float32):
            return False
    return True


def row_chunks(n: int) -> int:
    """How many row ranges a reduction over rows splits into (one partial sum per thread)."""
    return max(1, min(n, numba.get_num_threads()))
