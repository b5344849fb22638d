"""The kernel interface every backend implements.

A backend owns one kind of array (numpy arrays, torch tensors on a device, ...). It offers:
- `xp`: an array-API namespace for the generic elementwise and shape ops in `fusegrad.ops`;
- `gemm(a, b, trans_a, trans_b)`: (batched) matrix products with transpose flags, never a copy;
- named fused kernels (`rmsnorm_forward`, `cross_entropy_chunked`, ...), added as methods. The NumPy
  backend holds the reference version of each; another backend overrides only where its hardware
  needs it, and its tests compare against the reference.
"""
from __future__ import annotations

import numpy as np


class Backend:
    name = "base"
    xp = None  # array-API namespace (numpy for the CPU)
    device = "cpu"

    # -- arrays -----------------------------------------------------------------------------------
    def asarray(self, data, dtype=None):
        raise NotImplementedError

    def to_numpy(self, array) -> np.ndarray:
        raise NotImplementedError

    def full(self, shape, value, dtype):
        raise NotImplementedError

    def zeros(self, shape, dtype):
        return self.full(shape, 0.0, dtype)

    def owns(self, array) -> bool:
        return True

    def numpy_dtype(self, dtype) -> np.dtype:
        """The numpy dtype that names an array dtype of this backend (fusegrad's Tensor.dtype)."""
        return np.dtype(dtype)

    def copy(self, array):
        return array.copy()

    def owns_memory(self, array) -> bool:
        """True if the array owns its memory (not a view that could alias an activation)."""
        flags = getattr(array, "flags", None)
        return flags is None or (flags.owndata and flags.writeable)

    def index_add(self, target, key, values) -> None:
        """target[key] += values in place, repeated indices accumulating (numpy's np.add.at)."""
        np.add.at(target, key, values)

    # -- GEMM -------------------------------------------------------------------------------------
    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        """op(a) @ op(b) where op transposes the last two axes when its flag is set; leading axes
        broadcast like numpy.matmul. (M, K) x (K, N) -> (M, N)."""
        raise NotImplementedError

    def prewarm_gemm(self, m: int, k: int, n: int, dtype) -> None:
        """Make the first real GEMM of this shape fast (JIT, kernel selection, allocation)."""

    def __repr__(self) -> str:
        return f"<backend {self.name} on {self.device}>"
