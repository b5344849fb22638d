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


def blas_info() -> dict:
    """What runs the float32 GEMMs, for `fusegrad info` and `fusegrad bench --json`."""
    return {"blas_core": corename(), "openblas_coretype_env": os.environ.get("OPENBLAS_CORETYPE")}
