"""Backend registry: which backend owns an array, and which one new tensors use by default.

>>> import fusegrad as fg
>>> fg.backends.get_backend("numpy").name
'numpy'
"""
from __future__ import annotations

from fusegrad.core.errors import BackendError

_REGISTRY = {}
_FACTORIES = {}
_DEFAULT = ["numpy"]


def register_backend(name: str, factory) -> None:
    """Register a backend factory; it is called once, on first use (so imports stay cheap)."""
    _FACTORIES[name] = factory
    _REGISTRY.pop(name, None)


def get_backend(name: str | None = None):
    name = name or _DEFAULT[0]
    if name not in _REGISTRY:
        if name not in _FACTORIES:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(_FACTORIES))}")
        _REGISTRY[name] = _FACTORIES[name]()
    return _REGISTRY[name]


def set_default_backend(name: str) -> None:
    get_backend(name)
    _DEFAULT[0] = name


def available_backends() -> list:
    return sorted(_FACTORIES)


def backend_for_array(array):
    """The backend that owns `array`: numpy arrays -> numpy; others ask each instantiated backend."""
    import numpy as np

    if isinstance(array, np.ndarray):
        return get_backend("numpy")
    for backend in _REGISTRY.values():
        if backend.owns(array):
            return backend
    raise BackendError(f"no backend owns an array of type {type(array).__name__}")


def enable_gemm_offload(spec: str, min_flops: float | None = None):
    """`--offload_gemm SPEC`: large GEMMs of the CPU (numpy) model go to an accelerator first, per call,
    falling back to the CPU when it fails (fusegrad.backends.dispatch). SPEC: torch:cuda | torch:mps |
    torch:cpu | ane | ane-sim. Returns the chain's Offload entry.

    >>> entry = enable_gemm_offload("ane-sim", min_flops=0)
    >>> entry.name
    'ane-sim'
    >>> from fusegrad.backends.dispatch import GEMM_CHAIN; GEMM_CHAIN.remove_offload("ane-sim")
    """
    from fusegrad.backends.dispatch import GEMM_CHAIN

    if spec.startswith("torch"):
        from fusegrad.backends.torch_backend import enable_gemm_offload as enable_torch

        return enable_torch(spec, min_flops)
    if spec in ("ane", "ane-sim"):
        ane = get_backend(spec)  # off a Mac, "ane" raises BackendError saying why
        kwargs = {} if min_flops is None else {"min_flops": min_flops}
        return GEMM_CHAIN.add_offload(spec, ane.ane_gemm, accepts=ane.accepts_gemm, max_failures=8, **kwargs)
    raise BackendError(f"offload_gemm: unknown target {spec!r}; use torch:cuda, torch:mps, torch:cpu, ane or ane-sim")


def _numpy_factory():
    from fusegrad.backends.numpy_backend import NumpyBackend

    return NumpyBackend()


def _torch_factory(device=None):
    def factory():
        from fusegrad.backends.torch_backend import TorchBackend

        return TorchBackend(device)
    return factory


def _ane_factory(name: str):
    def make():  # "ane" off Apple Silicon raises BackendError with the reason and the ane-sim hint
        from fusegrad.backends.ane.backend import AneBackend

        return AneBackend(name)
    return make


register_backend("numpy", _numpy_factory)
register_backend("ane-sim", _ane_factory("ane-sim"))
register_backend("ane", _ane_factory("ane"))
register_backend("torch", _torch_factory())  # the best device present: cuda, mps, else cpu
for _device in ("cuda", "mps", "cpu"):
    register_backend(f"torch:{_device}", _torch_factory(_device))
