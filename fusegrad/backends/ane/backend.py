"""Training on the ANE: the NumPy backend with the projection GEMMs offloaded to ANE kernels.

Parameters, activations and gradients stay numpy fp32, so every CPU kernel (norms, attention,
SwiGLU, embedding, classifier + cross-entropy, AdamW) runs unchanged. Offloaded, in fp16:

- forward   y  = x W^T   (tokens, in) x (in, out)    the projection
- backward  dx = dy W    (tokens, out) x (out, in)   for wqkv and w13 this IS the seed's fused
  `concat(dq, dk, dv) -> dx` / `concat(dh1, dh3) -> dx` kernel (same program: `kernels.matmul_dynamic`)

dW = dy^T x (`trans_a=True`) and batched GEMMs stay on the CPU in fp32, as in the seed. Every
offloaded GEMM runs one dynamic kernel: the weights ride in the input, so a kernel is compiled once
per (in, out, tokens) and updated weights are restaged each call, never recompiled.

A GEMM goes through this backend's own `GemmChain`: if the runner raises, that call runs on the CPU,
the reason is warned once and recorded in the tracer ("fallback:ane-sim"), and the ANE is dropped
after `max_failures` failures. Dispatches are counted per backend ("dispatch:ane-sim", "dispatch:numpy").

>>> import numpy as np
>>> be = AneBackend("ane-sim")
>>> x, w = np.ones((8, 16), np.float32), np.full((4, 16), 0.5, np.float32)
>>> be.gemm(x, w, trans_b=True)[0].tolist()        # x W^T on ane-sim
[8.0, 8.0, 8.0, 8.0]
>>> be.kernels_built
1
"""
from __future__ import annotations

import numpy as np

from fusegrad.backends.ane import get_runner, kernels
from fusegrad.backends.dispatch import GemmChain
from fusegrad.backends.numpy_backend import NumpyBackend

LOSS_SCALE = 1024.0  # initial fp16 loss scale (the seed uses 256); the trainer halves it on overflow


class AneBackend(NumpyBackend):
    """`name` "ane-sim" (the fp16 simulator, any OS) or "ane" (Apple Silicon; BackendError elsewhere).

    `runner` overrides the kernel runner (tests inject faulty ones); `min_flops` is the smallest GEMM
    worth offloading (0: every projection, so the whole model trains on the kernels).
    """

    device = "ane"
    loss_scale = LOSS_SCALE  # asks the trainer for fp16 loss scaling with overflow detection

    def __init__(self, name: str = "ane-sim", runner=None, min_flops: float = 0.0, max_failures: int = 8):
        self.name = name
        self.runner = runner if runner is not None else get_runner(name)
        self.chain = GemmChain()
        self.chain.add_offload(name, self.ane_gemm, min_flops=min_flops, max_failures=max_failures,
                               accepts=self.accepts_gemm)
        self._kernels = {}  # (IC, OC, S) -> (program, weights): built once per shape

    @property
    def kernels_built(self) -> int:
        return len(self._kernels)

    @staticmethod
    def accepts_gemm(a, b, trans_a: bool, trans_b: bool) -> bool:
        return not trans_a and a.ndim == 2 and b.ndim == 2  # dW and batched GEMMs: CPU fp32, as in the seed

    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        return self.chain.run(a, b, trans_a, trans_b, self.cpu_gemm)

    def ane_gemm(self, a, b, trans_a: bool, trans_b: bool):
        """a (M, K) @ op(b) (K, N) as the kernel's y^T: act = a^T (K, M), packed weights op(b) (K, N)."""
        mat = b.T if trans_b else b  # (K, N)
        (m, k), n = a.shape, mat.shape[1]
        key = (k, n, m)
        if key not in self._kernels:
            self._kernels[key] = kernels.matmul_dynamic(k, n, m)
        program, weights = self._kernels[key]
        y = self.runner.run(program, weights, {"x": kernels.pack_dynamic(a.T, mat)})["y"]  # (1, N, 1, M)
        return np.ascontiguousarray(y[0, :, 0, :].T, dtype=a.dtype)
