"""Training on the ANE: the NumPy backend with the projection GEMMs offloaded to ANE kernels.

Parameters, activations and gradients stay numpy fp32; every CPU kernel runs unchanged. Offloaded, in
fp16: forward y = x W^T and backward dx = dy W (for wqkv and w13 that is the seed's fused
`concat(dq, dk, dv) -> dx` / `concat(dh1, dh3) -> dx` program, `kernels.matmul_dynamic`). dW = dy^T x
(`trans_a`) and batched GEMMs stay on the CPU in fp32, as in the seed. Weights ride in the input, so a
kernel is compiled once per (tokens, in, out), padded to what the hardware is reported to need
(`kernels.gemm_padding`), in the chip's MIL dialect (`runtime.dialect_for`).

Results are checked at run time: the first call of every shape, then every `check_every`-th, is
compared with the CPU's `np.matmul`; a mismatch returns the CPU result and disables the shape (warned
once, traced as "ane-mismatch"). Calls outside fp16's range are not judged (loss scaling handles
them). A failed compile/load is retried once, then the shape is disabled and the chain warns with the
compiler's message; evaluation errors fall back per call ("fallback:ane-sim"), `max_failures` drop the ANE.

>>> import numpy as np
>>> be = AneBackend("ane-sim")
>>> x, w = np.ones((8, 16), np.float32), np.full((4, 16), 0.5, np.float32)
>>> be.gemm(x, w, trans_b=True)[0].tolist()        # x W^T on ane-sim, padded to (384, 32, 4)
[8.0, 8.0, 8.0, 8.0]
>>> be.kernels_built
1
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from fusegrad.backends.ane import get_runner, kernels
from fusegrad.backends.ane.runtime import chip_name, dialect_for
from fusegrad.backends.dispatch import GemmChain
from fusegrad.backends import numpy_backend_class
from fusegrad.core.errors import BackendError
from fusegrad.core.trace import count, instant

LOSS_SCALE = 1024.0  # initial fp16 loss scale (the seed uses 256); the trainer halves it on overflow
CHECK_RTOL = 2e-2  # |ANE - CPU| <= 2% of max|CPU|: fp16 operands give ~1e-3, silent zeros or garbage ~100%
CHECK_EVERY = 64  # after its first call, every 64th call of a shape is checked too
FP16_MAX = 65504.0
log = logging.getLogger("fusegrad.ane")


@dataclass
class _Gemm:
    program: object
    weights: dict
    m2: int  # padded tokens
    k2: int  # padded inner dimension
    calls: int = 0
    next_check: int = 1


class AneBackend(numpy_backend_class()):  # the CPU side (norms, attention, AdamW) on the fastest kernels here
    """`name` "ane-sim" (the fp16 simulator, any OS) or "ane" (Apple Silicon; BackendError elsewhere).

    `runner` overrides the kernel runner (tests inject faulty ones); `min_flops` is the smallest GEMM
    worth offloading (0: every projection, so the whole model trains on the kernels); `chip` overrides
    the detected chip name (it picks the MIL dialect); `check_every` is the result-check sampling period.
    """

    loss_scale = LOSS_SCALE  # asks the trainer for fp16 loss scaling with overflow detection

    def __init__(self, name: str = "ane-sim", runner=None, min_flops: float = 0.0, max_failures: int = 8,
                 chip: str | None = None, check_every: int = CHECK_EVERY):
        super().__init__()
        self.name = name
        self.runner = runner if runner is not None else get_runner(name)
        self.chip = chip if chip is not None else chip_name()
        self.dialect = dialect_for(self.chip)
        self.check_every = check_every
        self.chain = GemmChain()  # its own chain: the ANE first, then the CPU
        self.chain.add_offload(name, self.ane_gemm, min_flops=min_flops, max_failures=max_failures,
                               accepts=self.accepts_gemm)
        self._kernels = {}  # (m, k, n) -> _Gemm: built once per shape
        self.disabled = {}  # (m, k, n) -> why that shape runs on the CPU
        self._warned = False

    @property
    def kernels_built(self) -> int:
        return len(self._kernels)

    def accepts_gemm(self, a, b, trans_a: bool, trans_b: bool) -> bool:
        """Not dW or batched GEMMs (CPU fp32, as in the seed), nor a disabled shape."""
        return (not trans_a and a.ndim == 2 and b.ndim == 2
                and (*a.shape, b.shape[0] if trans_b else b.shape[1]) not in self.disabled)

    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        return self.chain.run(a, b, trans_a, trans_b, self.cpu_gemm)

    def ane_gemm(self, a, b, trans_a: bool, trans_b: bool):
        """a (M, K) @ op(b) (K, N) as the kernel's y^T: act = a^T (K, M), packed weights op(b) (K, N)."""
        mat = b.T if trans_b else b  # (K, N)
        key = (*a.shape, mat.shape[1])
        g = self._kernels.get(key) or self._build(key)
        io = np.float16 if self.dialect == "m1" else np.float32
        y = self.runner.run(g.program, g.weights, {"x": kernels.pack_gemm(a, mat, g.m2, g.k2, io)})["y"]
        y = np.ascontiguousarray(y[0, :, 0, :key[0]].T, dtype=a.dtype)
        g.calls += 1
        if g.calls >= g.next_check:
            y = self._check(key, g, a, mat, y)
        return y

    def _build(self, key) -> _Gemm:
        m, k, n = key
        m2, k2 = kernels.gemm_padding(m, k, n, 2 if self.dialect == "m1" else 4)
        program, weights = kernels.matmul_dynamic(k2, n, m2, self.dialect)
        prepare = getattr(self.runner, "prepare", None)  # compile + load, where the runner separates them
        for attempt in (1, 2) if prepare else ():
            try:
                prepare(program, weights)
                break
            except Exception as e:  # any compiler/loader failure: retried once, then the shape goes to the CPU
                if attempt == 2:
                    self.disabled[key] = f"compile/load failed twice: {e}"
                    instant("ane-compile-failed", "ane", backend=self.name, shape=key, reason=str(e))
                    raise BackendError(f"{self.name} could not compile/load GEMM {key} "
                                       f"(tried twice; that shape now runs on the CPU): {e}") from None
        self._kernels[key] = g = _Gemm(program, weights, m2, k2)
        return g

    def _check(self, key, g: _Gemm, a, mat, y):
        ref = np.matmul(a, mat)  # bit for bit what cpu_gemm computes
        if not np.isfinite(ref).all() or max(np.abs(v).max(initial=0) for v in (a, mat, ref)) > FP16_MAX:
            return y  # outside fp16: the ANE overflows by design (loss scaling handles it); check a later call
        g.next_check = g.calls + self.check_every
        count(f"ane-check:{self.name}")
        diff, bound = float(np.abs(y - ref).max(initial=0)), CHECK_RTOL * float(np.abs(ref).max(initial=0))
        if diff <= bound:
            return y
        self.disabled[key] = f"max |ANE - CPU| {diff:.3g} > {bound:.3g}"
        instant("ane-mismatch", "ane", backend=self.name, shape=key, diff=diff, bound=bound, call=g.calls)
        count(f"ane-mismatch:{self.name}")
        msg = (f"fusegrad: {self.name} computed GEMM {key} wrong (max |ANE - CPU| {diff:.3g} > {bound:.3g}); "
               f"that shape runs on the CPU from now on")
        if self._warned:
            log.warning(msg)
        else:
            self._warned = True
            warnings.warn(msg + " (later mismatches are logged, not warned)", RuntimeWarning, stacklevel=2)
        return ref
