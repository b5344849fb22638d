"""The GEMM dispatch chain and pre-warming.

A GEMM of CPU arrays is offered to each registered accelerator in turn (the seed's CUDA -> wgpu ->
CPU chain); one is tried only when the GEMM is at least its `min_flops` (below that, transfer costs
more than it saves). When an accelerator raises, that one call falls back down the chain — the
result stays correct — the reason is warned once per accelerator and recorded in the tracer, and the
accelerator is dropped only after `max_failures` failures (not, as in the seed, after the first).

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
import math
import warnings

import numpy as np

from fusegrad.core.errors import ShapeError
from fusegrad.core.trace import count, instant, span

log = logging.getLogger("fusegrad.dispatch")


def gemm_dims(a_shape, b_shape, trans_a: bool, trans_b: bool):
    """(m, k, n, batch) of op(a) @ op(b); raises ShapeError when the inner dimensions differ."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ShapeError(f"gemm: operands must be at least 2-D, got a {tuple(a_shape)}, b {tuple(b_shape)}")
    m, k = (a_shape[-1], a_shape[-2]) if trans_a else (a_shape[-2], a_shape[-1])
    k2, n = (b_shape[-1], b_shape[-2]) if trans_b else (b_shape[-2], b_shape[-1])
    if k != k2:
        raise ShapeError(f"gemm: inner dimensions differ: op(a) is {m}x{k}, op(b) is {k2}x{n}")
    try:  # leading axes broadcast like numpy.matmul: (3, 1, M, K) x (2, K, N) is 6 GEMMs
        batch = math.prod(np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])))
    except ValueError:
        raise ShapeError(f"gemm: batch dimensions do not broadcast: a {tuple(a_shape)}, b {tuple(b_shape)}") from None
    return m, k, n, batch


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
            log.warning("fusegrad: %s failed %d times (last: %s); no more GEMMs go there in this process",
                        entry.name, entry.failures, reason)


GEMM_CHAIN = GemmChain()


def gemm_shapes(config=None, batch: int = 1, seq: int = 1, lora_rank: int = 0, num_classes: int = 0) -> list:
    """Every (m, k, n) GEMM a Llama training step runs, deduplicated.

    `config` has dim, hidden_dim, n_heads, n_kv_heads, vocab_size (a model config or a dict). Tokens
    per step M = batch * seq. Forward y = x W^T is (M, in, out); backward dx = dy W is (M, out, in);
    backward dW = dy^T x is (out, M, in). Q/K/V and W1/W3 are fused, so their GEMMs are one each.
    """
    get = (lambda k: config[k]) if isinstance(config, dict) else (lambda k: getattr(config, k))
    dim, hidden, vocab = get("dim"), get("hidden_dim"), get("vocab_size")
    head = dim // get("n_heads")
    kv = head * get("n_kv_heads")
    tokens = batch * seq
    linears = [(dim, dim + 2 * kv), (dim, dim), (dim, 2 * hidden), (hidden, dim), (dim, vocab)]
    if num_classes:
        linears.append((dim, num_classes))
    shapes = set()
    for d_in, d_out in linears:
        shapes |= {(tokens, d_in, d_out), (tokens, d_out, d_in), (d_out, tokens, d_in)}
    if lora_rank:
        for d_in, d_out in [(dim, dim), (dim, kv), (dim, hidden), (hidden, dim)]:
            shapes |= {(tokens, d_in, lora_rank), (tokens, lora_rank, d_out),  # forward A, B
                       (tokens, d_out, lora_rank), (lora_rank, tokens, d_in),  # backward through B, dA
                       (d_out, tokens, lora_rank), (tokens, lora_rank, d_in)}  # dB, dx through A
    # attention: per (batch*head) GEMMs of (T, D) x (D, T) and (T, T) x (T, D)
    shapes |= {(seq, head, seq), (seq, seq, head)}
    return sorted(s for s in shapes if min(s) > 0)


def prewarm(shapes=None, config=None, lora_rank: int = 0, batch: int = 1, seq: int = 1,
            num_classes: int = 0, dtype="float32") -> dict:
    """Run every GEMM shape a training step uses once on each backend in the chain, the CPU, and the
    default backend when that is another (torch on a GPU, say).

    Returns {"shapes": [...], "warmed": {backend: n}, "failed": {backend: [(shape, reason)]},
    "kernels_s": seconds spent loading the CPU's JIT kernels}.
    Failures here count toward an accelerator's `max_failures` like any other call.
    """
    from fusegrad.backends import _DEFAULT, get_backend

    if shapes is None:
        if config is None:
            raise ShapeError("prewarm: give either shapes=[(m, k, n), ...] or config=")
        shapes = gemm_shapes(config, batch, seq, lora_rank, num_classes)
    report = {"shapes": list(shapes), "warmed": {}, "failed": {}}
    cpu = get_backend("numpy")
    report["kernels_s"] = cpu.prewarm_kernels()  # JIT kernels from the disk cache (compiled once, cold)
    targets = [(o.name, o) for o in GEMM_CHAIN.offloads if not o.disabled] + [("numpy", cpu)]
    default = get_backend()
    if default is not cpu:
        targets.append((_DEFAULT[0], default))
    for name, entry in targets:
        warmed, failed = 0, []
        for m, k, n in shapes:
            if isinstance(entry, Offload) and entry.disabled:  # stop, as run() does, after max_failures
                failed.append(((m, k, n), f"skipped: {name} disabled after {entry.failures} failures"))
                continue
            try:
                with span("prewarm", "matmul", m=m, k=k, n=n, backend=name):
                    if not isinstance(entry, Offload):  # a backend
                        entry.prewarm_gemm(m, k, n, np.dtype(dtype))
                    elif entry.prewarm is not None:
                        entry.prewarm(m, k, n, np.dtype(dtype))
                    else:
                        entry.gemm(np.zeros((m, k), dtype), np.zeros((k, n), dtype), False, False)
                warmed += 1
            except Exception as exc:
                failed.append(((m, k, n), f"{type(exc).__name__}: {exc}"))
                if isinstance(entry, Offload):
                    GEMM_CHAIN._record_failure(entry, exc, (m, k, n))
        report["warmed"][name] = warmed
        report["failed"][name] = failed
    return report
