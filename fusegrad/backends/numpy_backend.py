"""The default backend: numpy arrays, BLAS GEMMs, and the reference version of every fused kernel."""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import numpy as np

from fusegrad.backends import reference
from fusegrad.backends.base import Backend
from fusegrad.backends.dispatch import GEMM_CHAIN, gemm_dims
from fusegrad.core.trace import count, span


@functools.cache
def _jit_kernels() -> dict:
    """The numba kernels (fusegrad.backends.cpu_jit.KERNELS), or {} when numba does not import."""
    try:
        from fusegrad.backends import cpu_jit
    except ImportError:
        return {}
    return cpu_jit.KERNELS


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel; True if set.

    A training step allocates and frees ~280 MB of large arrays (activations, grads, logits chunks).
    glibc maps large blocks with mmap (anything over 32 MB, such as a (V, C) grad, always) and unmaps them or
    trims the heap on free, so every step page-faulted them in again: 68 K minor faults, ~0.15 s of a
    1.3-1.5 s stories15M step (batch 8 x seq 256).
    With no mmap threshold and no trimming, the heap keeps them: 0 faults, same peak RSS. Process-wide
    (a glibc setting); FUSEGRAD_MALLOC=default leaves malloc alone.

    >>> isinstance(keep_freed_memory(), bool)
    True
    """
    if os.environ.get("FUSEGRAD_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl has no mallopt thresholds
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, ctypes.c_int(int(KEEP_FREED_MEMORY_ENV["MALLOC_MMAP_THRESHOLD_"])))
                and libc.mallopt(m_trim_threshold, ctypes.c_int(int(KEEP_FREED_MEMORY_ENV["MALLOC_TRIM_THRESHOLD_"]))))


# the same policy for another process (a benchmark's peer), through glibc's environment variables
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 31 - 1)}


def _op(x, trans: bool):
    return x.swapaxes(-1, -2) if trans else x  # a strided view: BLAS reads it with its transpose flag


class NumpyBackend(Backend):
    name = "numpy"
    xp = np
    device = "cpu"

    def __init__(self):
        self.malloc_tuned = keep_freed_memory()  # before the first large array

    def asarray(self, data, dtype=None):
        return np.asarray(data, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(array)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype=dtype)

    def owns(self, array) -> bool:
        return isinstance(array, np.ndarray)

    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        return GEMM_CHAIN.run(a, b, trans_a, trans_b, self.cpu_gemm)

    def cpu_gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        m, k, n, batch = gemm_dims(a.shape, b.shape, trans_a, trans_b)
        count("dispatch:numpy")
        with span("gemm", "matmul", m=m, k=k, n=n, batch=batch, backend="numpy"):
            return np.matmul(_op(a, trans_a), _op(b, trans_b))

    def prewarm_gemm(self, m, k, n, dtype) -> None:
        np.matmul(np.zeros((m, k), dtype), np.zeros((k, n), dtype))

    def prewarm_kernels(self) -> float:
        """Load (or compile, on a cold disk cache) every JIT kernel now; seconds taken, 0.0 without JIT."""
        if os.environ.get("FUSEGRAD_JIT", "1") == "0" or not _jit_kernels():
            return 0.0
        from fusegrad.backends import cpu_jit

        return cpu_jit.prewarm()

    # fused kernels: the reference implementations (fusegrad.backends.reference), overridden by the
    # JIT-compiled CPU kernels where numba is installed (FUSEGRAD_JIT=0 turns them off)
    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        kernel = None if os.environ.get("FUSEGRAD_JIT", "1") == "0" else _jit_kernels().get(name)
        kernel = kernel or getattr(reference, name, None)
        if kernel is None:
            raise AttributeError(f"backend numpy has no kernel {name!r}")
        return kernel
