"""The GEMM dispatch chain and pre-warming.

A GEMM of CPU arrays is offered to each accelerator of its backend's chain in turn (added and removed
by `fusegrad.backends.gemm_offload`); one is tried only when the GEMM is at least its `min_flops`
(below that, transfer costs more than it saves). When an accelerator raises, that one call falls back
down the chain — the result stays correct — the reason is warned once per accelerator and recorded in
the tracer, and the accelerator is dropped only after `max_failures` failures.

>>> import numpy as np
>>> from fusegrad.backends.dispatch import GemmChain
>>> chain = GemmChain()
>>> def broken(a, b, ta, tb): raise RuntimeError("device lost")
>>> entry = chain.add_offload("broken", broken, min_flops=0)
>>> out = chain.run(np.ones((2, 3)), np.ones((3, 4)), False, False, lambda a, b, ta, tb: a @ b)
>>> out.shape, chain.offloads[0].failures
((2, 4), 1)
"""
from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np

from fusegrad.backends.base import gemm_dims
from fusegrad.core.errors import ConfigError
from fusegrad.core.registry import get_backend
from fusegrad.core.trace import count, instant, span

log = logging.getLogger("fusegrad.dispatch")


@dataclasses.dataclass
class Offload:
    """One accelerator in the chain. `gemm(a, b, trans_a, trans_b)` takes and returns CPU arrays."""
    name: str
    gemm: callable
    min_flops: float = 2 * 256 ** 3  # below this, the transfer costs more than it saves
    max_failures: int = 3
    failures: int = 0
    calls: int = 0
    warned: bool = False
    prewarm: callable = None
    accepts: callable = None  # accepts(a, b, trans_a, trans_b) -> False: this GEMM is not for it (no failure)

    @property
    def disabled(self) -> bool:
        return self.failures >= self.max_failures


class GemmChain:
    def __init__(self):
        self.offloads: list[Offload] = []

    def add_offload(self, name: str, gemm, min_flops: float = 2 * 256 ** 3, max_failures: int = 3,
                    prewarm=None, accepts=None) -> Offload:
        """Put an accelerator ahead of the CPU (later additions are tried after earlier ones)."""
        self.remove_offload(name)
        entry = Offload(name, gemm, min_flops, max_failures, prewarm=prewarm, accepts=accepts)
        self.offloads.append(entry)
        return entry

    def remove_offload(self, name: str) -> None:
        self.offloads = [o for o in self.offloads if o.name != name]

    def run(self, a, b, trans_a: bool, trans_b: bool, cpu_gemm):
        if self.offloads:
            m, k, n, batch = gemm_dims(a.shape, b.shape, trans_a, trans_b)
            flops = 2.0 * m * k * n * batch
            for entry in self.offloads:
                if entry.disabled or flops < entry.min_flops:
                    continue
                if entry.accepts is not None and not entry.accepts(a, b, trans_a, trans_b):
                    continue
                try:
                    with span("gemm", "matmul", m=m, k=k, n=n, batch=batch, backend=entry.name):
                        out = entry.gemm(a, b, trans_a, trans_b)
                    entry.calls += 1
                    count(f"dispatch:{entry.name}")
                    return out
                except Exception as exc:  # any accelerator failure: this call goes down the chain
                    self._record_failure(entry, exc, (m, k, n))
        return cpu_gemm(a, b, trans_a, trans_b)

    def _record_failure(self, entry: Offload, exc: Exception, shape) -> None:
        entry.failures += 1
        reason = f"{type(exc).__name__}: {exc}"
        instant("fallback", "dispatch", backend=entry.name, shape=shape, reason=reason)
        count(f"fallback:{entry.name}")
        if not entry.warned:
            entry.warned = True
            warnings.warn(f"fusegrad: GEMM {shape} on {entry.name} failed ({reason}); "
                          f"this call ran on the CPU", RuntimeWarning, stacklevel=4)
        if entry.disabled:
            log.warning("fusegrad: %s failed %d times (last: %s); no more GEMMs go there",
                        entry.name, entry.failures, reason)


def prewarm(shapes=None, backend=None, dtype="float32") -> dict:
    """Run each GEMM shape (m, k, n) once on every accelerator in the numpy backend's chain, on the CPU,
    and on `backend` (default: the current one) when that is another (torch on a GPU, say). Shapes for
    a model: `Llama.gemm_shapes(batch, seq)`.

    Returns {"shapes": [...], "warmed": {backend: n}, "failed": {backend: [(shape, reason)]},
    "kernels_s": seconds spent loading the CPU's JIT kernels}.
    Failures here count toward an accelerator's `max_failures` like any other call.
    """
    if shapes is None:
        raise ConfigError("prewarm: give shapes=[(m, k, n), ...], e.g. model.gemm_shapes(batch, seq)")
    report = {"shapes": list(shapes), "warmed": {}, "failed": {}}
    cpu, current = get_backend("numpy"), get_backend(backend)
    report["kernels_s"] = cpu.prewarm_kernels()  # JIT kernels from the disk cache (compiled once, cold)
    chains = [cpu.chain] + ([current.chain] if current is not cpu and hasattr(current, "chain") else [])
    targets = [(o.name, o, chain) for chain in chains for o in chain.offloads if not o.disabled]
    targets += [("numpy", cpu, None)] + ([(current.name, current, None)] if current is not cpu else [])
    for name, entry, chain in targets:
        warmed, failed = 0, []
        for m, k, n in shapes:
            if chain is not None and entry.disabled:  # stop, as run() does, after max_failures
                failed.append(((m, k, n), f"skipped: {name} disabled after {entry.failures} failures"))
                continue
            try:
                with span("prewarm", "matmul", m=m, k=k, n=n, backend=name):
                    if chain is None:  # a backend
                        entry.prewarm_gemm(m, k, n, np.dtype(dtype))
                    elif entry.prewarm is not None:
                        entry.prewarm(m, k, n, np.dtype(dtype))
                    else:
                        entry.gemm(np.zeros((m, k), dtype), np.zeros((k, n), dtype), False, False)
                warmed += 1
            except Exception as exc:
                failed.append(((m, k, n), f"{type(exc).__name__}: {exc}"))
                if chain is not None:
                    chain._record_failure(entry, exc, (m, k, n))
        report["warmed"][name] = warmed
        report["failed"][name] = failed
    return report
