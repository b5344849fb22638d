"""The backends: which ones exist, which one new tensors use, where the GEMMs of numpy arrays run.

Each backend is one class (see base.py); the table below names where it lives, and it is imported on
first use, so `import fusegrad` never imports torch or the ANE runtime. "numpy" is the numba `JitBackend`
when numba imports and FUSEGRAD_JIT is not "0", else the plain `NumpyBackend`.

>>> import numpy as np
>>> get_backend("numpy").name
'numpy'
>>> with gemm_offload("ane-sim", min_flops=0) as entry:      # GEMMs of numpy arrays go to the simulator
...     _ = get_backend("numpy").gemm(np.ones((8, 16), np.float32), np.ones((4, 16), np.float32), trans_b=True)
>>> entry.calls, get_backend("numpy").chain.offloads            # nothing is left after the block
(1, [])
"""
from __future__ import annotations

import contextlib
import importlib
import os

from fusegrad.backends.dispatch import prewarm
from fusegrad.core.errors import BackendError
from fusegrad.core.registry import available_backends, backend_for_array, get_backend, register_backend, use_backend

__all__ = ["available_backends", "backend_for_array", "gemm_offload", "get_backend", "prewarm", "register_backend",
           "use_backend"]


def _load(spec: str):
    """"package.module:attribute" -> the attribute (a backend class, a function)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _factory(spec: str, *args):
    return lambda: _load(spec)(*args)


def numpy_backend_class() -> type:
    """JitBackend when numba imports and FUSEGRAD_JIT != "0", else NumpyBackend (read when called)."""
    if os.environ.get("FUSEGRAD_JIT", "1") != "0":
        try:
            return _load("fusegrad.backends.cpu_jit:JitBackend")
        except ImportError:  # numba (an optional dependency) is missing
            pass
    return _load("fusegrad.backends.numpy_backend:NumpyBackend")


register_backend("numpy", lambda: numpy_backend_class()())
register_backend("torch", _factory("fusegrad.backends.torch_backend:TorchBackend"))  # best device present
for _device in ("cuda", "mps", "cpu", "meta"):
    register_backend(f"torch:{_device}", _factory("fusegrad.backends.torch_backend:TorchBackend", _device))
for _name in ("ane", "ane-sim"):  # "ane" off Apple Silicon raises BackendError with the reason
    register_backend(_name, _factory("fusegrad.backends.ane.backend:AneBackend", _name))


@contextlib.contextmanager
def gemm_offload(spec: str, min_flops: float | None = None, backend=None):
    """Inside the block, large GEMMs of numpy arrays (of `backend`, default "numpy") go to an accelerator
    first, per call, falling back to the CPU when it fails (fusegrad.backends.dispatch). SPEC: torch:cuda |
    torch:mps | torch:cpu | ane | ane-sim. Yields the chain's Offload entry (.calls, .failures); the chain
    is as before after the block, also on error."""
    chain = get_backend(backend or "numpy").chain
    kwargs = {} if min_flops is None else {"min_flops": min_flops}
    if spec.split(":")[0] == "torch":
        name, gemm, warm = _load("fusegrad.backends.torch_backend:torch_gemm_offload")(spec.partition(":")[2] or None)
        kwargs.update(prewarm=warm)
    elif spec in ("ane", "ane-sim"):
        ane = get_backend(spec)  # off a Mac, "ane" raises BackendError saying why
        name, gemm = spec, ane.ane_gemm
        kwargs.update(accepts=ane.accepts_gemm, max_failures=8)
    else:
        raise BackendError(f"offload_gemm: unknown target {spec!r} (not a torch device or the ANE); use torch:cuda, "
                           f"torch:mps, torch:cpu, ane or ane-sim")
    saved = list(chain.offloads)
    try:
        yield chain.add_offload(name, gemm, **kwargs)
    finally:
        chain.offloads = saved
