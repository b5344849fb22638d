"""The OpenBLAS that numpy loaded: its cblas_sgemm (for C += A B) and the kernel family it runs.

OpenBLAS picks its kernels once, at load, from the CPU or from OPENBLAS_CORETYPE. The family can halve
sgemm's speed (docs/performance.md), so benchmarks report it.

>>> core = corename()  # e.g. 'SkylakeX' or 'Haswell'; None when numpy is not on OpenBLAS
>>> core is None or isinstance(core, str)
True
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np

from fusegrad.core.errors import BackendError


def _numpy_openblas():
    """ctypes handle of numpy's bundled OpenBLAS (numpy >= 2 wheels, 64-bit ints), or None."""
    root = os.path.dirname(np.__file__)
    paths = glob.glob(os.path.join(root, "..", "numpy.libs", "libscipy_openblas64_*"))
    paths += glob.glob(os.path.join(root, ".dylibs", "libscipy_openblas64_*"))
    for path in paths:
        try:
            return ctypes.CDLL(path)  # the library numpy already holds: dlopen returns the same handle
        except OSError:
            continue
    return None


LIB = _numpy_openblas()


def _cblas_sgemm():
    """Only for what numpy's matmul cannot do: C += A B (beta = 1). Not scipy's sgemm: that is a second
    OpenBLAS whose threads spin after a GEMM and fight numpy's (docs/performance.md)."""
    f = getattr(LIB, "scipy_cblas_sgemm64_", None)
    if f is None:
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    f.argtypes = [ctypes.c_int] * 3 + [i64] * 3 + [f32, ptr, i64, ptr, i64, f32, ptr, i64]
    f.restype = None
    return f


CBLAS_SGEMM = _cblas_sgemm()
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


def _as_row_major(x, trans: bool):
    """(x or x.T, trans flag, leading dimension) with unit column stride, or None when neither layout has it."""
    s0, s1 = x.strides
    if s1 == 4 and s0 % 4 == 0 and s0 // 4 >= max(x.shape[1], 1):
        return x, trans, s0 // 4
    if s0 == 4 and s1 % 4 == 0 and s1 // 4 >= max(x.shape[0], 1):  # a transposed view: flip the flag
        return x.T, not trans, s1 // 4
    return None


def sgemm_accumulate(c, a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0):
    """A call that does c += alpha op(a) op(b) in place by one cblas_sgemm (beta = 1); None when numpy's
    OpenBLAS is out of reach or an operand is not a 2-D float32 array with a unit stride (a column slice
    `y[:, rows]` or a transposed view is fine) or the shapes do not chain."""
    if CBLAS_SGEMM is None or not all(isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 2
                                      for x in (a, b, c)):
        return None
    ra, rb, rc = _as_row_major(a, trans_a), _as_row_major(b, trans_b), _as_row_major(c, False)
    if ra is None or rb is None or rc is None or rc[1]:  # c must be row-major itself, not a transposed view
        return None
    (a, ta, lda), (b, tb, ldb), (c, _, ldc) = ra, rb, rc
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    if (a.shape[1] if ta else a.shape[0]) != m or (b.shape[0] if tb else b.shape[1]) != n \
            or (b.shape[1] if tb else b.shape[0]) != k:
        return None
    args = (ROW_MAJOR, TRANS if ta else NO_TRANS, TRANS if tb else NO_TRANS, m, n, k, float(alpha),
            a.ctypes.data, lda, b.ctypes.data, ldb, 1.0, c.ctypes.data, ldc)
    return lambda: CBLAS_SGEMM(*args)


def corename() -> str | None:
    """The kernel family OpenBLAS chose at load ('Haswell', 'SkylakeX', ...), or None without OpenBLAS."""
    f = getattr(LIB, "scipy_openblas_get_corename64_", None)
    if f is None:
        return None
    f.restype = ctypes.c_char_p
    return f().decode()


def _thread_count_functions():
    get = getattr(LIB, "scipy_openblas_get_num_threads64_", None)
    set_ = getattr(LIB, "scipy_openblas_set_num_threads64_", None)
    if get is None or set_ is None:
        return None
    set_.argtypes, set_.restype = [ctypes.c_int], None
    return get, set_


THREAD_COUNT = _thread_count_functions()  # (get, set), or None where fusegrad cannot set OpenBLAS's threads


@contextlib.contextmanager
def threads(n: int):
    """Each OpenBLAS GEMM runs on `n` threads inside (a process-wide setting); the count is restored after."""
    if THREAD_COUNT is None:
        raise BackendError("OpenBLAS's thread count is out of reach: numpy is not on its bundled OpenBLAS")
    get, set_ = THREAD_COUNT
    outer = get()
    set_(n)
    try:
        yield
    finally:
        set_(outer)


def stop_idle_threads() -> None:
    """End OpenBLAS's thread pool now; its next threaded call starts it again. After a threaded GEMM its
    threads spin for 2^28 cycles (~0.1 s, OPENBLAS_THREAD_TIMEOUT) on cores that another process's work
    then shares: a benchmark calls this after its own GEMMs. No-op without numpy's OpenBLAS."""
    shutdown = getattr(LIB, "blas_thread_shutdown_", None)
    if shutdown is not None:
        shutdown()


def blas_info() -> dict:
    """What runs the float32 GEMMs, for `fusegrad info` and `fusegrad bench --json`."""
    return {"blas_core": corename(), "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE")}
