"""The NumPy backend: numpy arrays, BLAS GEMMs through this backend's GEMM chain, the reference kernels.

Its subclass `fusegrad.backends.cpu_jit.JitBackend` (numba) is what "numpy" names when numba imports.
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

from fusegrad.backends import openblas
from fusegrad.backends.base import Backend, gemm_dims
from fusegrad.backends.dispatch import GemmChain
from fusegrad.core.trace import count, span, tracing

# glibc malloc keeps freed memory (no mmap threshold, no trimming), so the large arrays a training step
# frees are not page-faulted in again next step (docs/performance.md); the same policy for another process
# (a benchmark's peer) through glibc's environment variables
KEEP_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(2 ** 31 - 1)}


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel; True if set.
    Process-wide (a glibc setting); FUSEGRAD_MALLOC=default leaves malloc alone.

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


FEW_ROWS = 32  # a @ b^T with fewer rows of a runs as (b @ a^T)^T


def _op(x, trans: bool):
    return x.swapaxes(-1, -2) if trans else x  # a strided view: BLAS reads it with its transpose flag


def _blas_gemm(a, b, trans_a: bool, trans_b: bool):
    if trans_b and not trans_a and 1 < a.shape[0] < FEW_ROWS and a.ndim == b.ndim == 2:
        # a few rows times a weight (a prompt in generation): OpenBLAS's sgemm packs b for so few
        # rows and runs 35% slower than the same product as b a^T (docs/performance.md, Generation)
        return np.ascontiguousarray(np.matmul(b, a.T).T)
    return np.matmul(_op(a, trans_a), _op(b, trans_b))


class NumpyBackend(Backend):
    """numpy arrays on the CPU. `chain` holds the accelerators its GEMMs are offered to first
    (`fusegrad.backends.gemm_offload`)."""

    name = "numpy"
    xp = np
    device = "cpu"

    def __init__(self):
        self.malloc_tuned = keep_freed_memory()  # before the first large array
        self.chain = GemmChain()

    def asarray(self, data, dtype=None):
        return np.asarray(data, dtype=dtype)

    def to_numpy(self, array) -> np.ndarray:
        return np.asarray(array)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype=dtype)

    def owns(self, array) -> bool:
        return isinstance(array, np.ndarray)

    def contiguous(self, array):
        return np.ascontiguousarray(array)

    def index_add(self, target, key, values) -> None:
        np.add.at(target, key, values)

    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        if self.chain.offloads:
            return self.chain.run(a, b, trans_a, trans_b, self.cpu_gemm)
        return self.cpu_gemm(a, b, trans_a, trans_b)

    def cpu_gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        """The GEMM on the CPU's BLAS, never offloaded."""
        count("dispatch:numpy")
        if tracing():
            m, k, n, batch = gemm_dims(a.shape, b.shape, trans_a, trans_b)
            with span("gemm", "matmul", m=m, k=k, n=n, batch=batch, backend="numpy"):
                return _blas_gemm(a, b, trans_a, trans_b)
        # untraced (a generated token runs 121 GEMVs): inner dimensions are checked only when numpy refuses them
        if a.ndim < 2 or b.ndim < 2:
            gemm_dims(a.shape, b.shape, trans_a, trans_b)  # raises: numpy's matmul would take a vector
        try:
            return _blas_gemm(a, b, trans_a, trans_b)
        except ValueError:
            gemm_dims(a.shape, b.shape, trans_a, trans_b)  # raises the ShapeError naming the mismatch
            raise

    def gemm_accumulate(self, c, a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0) -> None:
        """One OpenBLAS sgemm with beta = 1 for float32 operands with a unit stride; else the reference."""
        run = None if self.chain.offloads else openblas.sgemm_accumulate(c, a, b, trans_a, trans_b, alpha)
        if run is None:
            return super().gemm_accumulate(c, a, b, trans_a, trans_b, alpha)
        count("dispatch:numpy")
        with span("gemm", "matmul", m=c.shape[0], k=b.shape[1] if trans_b else b.shape[0], n=c.shape[1], batch=1,
                  backend=self.name):
            run()

    def prewarm_gemm(self, m, k, n, dtype) -> None:
        np.matmul(np.zeros((m, k), dtype), np.zeros((k, n), dtype))
