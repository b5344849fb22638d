"""The torch backend: arrays are torch tensors on one device (cuda, mps or cpu), kernels are torch ops.

fusegrad's own graph and explicit backward formulas drive everything; torch only stores arrays and runs
kernels (its autograd stays off: no tensor here ever has requires_grad). Parameters, activations, grads
and optimizer moments stay on the device; the host<->device copies that do happen (inputs, rope tables
once, checkpoints, `.numpy()`) are counted in the tracer under category "transfer" and the counters
`transfer:h2d`, `transfer:d2h` (and `..._bytes`).

>>> import fusegrad as fg
>>> be = fg.backends.get_backend("torch:cpu")
>>> x = fg.tensor([[1.0, 2.0]], backend=be, requires_grad=True)
>>> (x @ x.T).sum().backward()
>>> type(x.grad).__name__, x.grad.tolist()
('Tensor', [[2.0, 4.0]])

`torch_gemm_offload(device)` is the other way to use torch: a CPU-resident (numpy) model sends its large
GEMMs to the device one call at a time, through `fusegrad.backends.dispatch.GEMM_CHAIN`.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from fusegrad.backends import torch_kernels
from fusegrad.backends.base import Backend
from fusegrad.backends.dispatch import GEMM_CHAIN, gemm_dims
from fusegrad.core.errors import BackendError
from fusegrad.core.trace import count, span

DEVICES = ("cuda", "mps", "cpu")


def best_device() -> str:
    """cuda if present, else mps (Apple GPU), else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.cache
def torch_dtype(dtype) -> torch.dtype:
    """numpy dtype (or name, or torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.empty(0, np.dtype(dtype))).dtype


@functools.cache
def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def resolve_device(device: str | None) -> torch.device:
    """A torch.device that really exists here, with its index ("cuda" -> cuda:0); BackendError if not."""
    name = device or best_device()
    if name.split(":")[0] not in DEVICES:
        raise BackendError(f"torch backend: unknown device {name!r}; use one of {', '.join(DEVICES)}")
    try:
        return torch.empty(0, device=name).device
    except (RuntimeError, AssertionError) as exc:
        raise BackendError(f"torch backend: device {name!r} is not usable here ({exc}); "
                           f"this machine has {best_device()}") from None


def _h2d(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    with span("h2d", "transfer", bytes=array.nbytes):
        out = torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)
    count("transfer:h2d")
    count("transfer:h2d_bytes", array.nbytes)
    return out


def _d2h(array: torch.Tensor) -> np.ndarray:
    nbytes = array.numel() * array.element_size()
    with span("d2h", "transfer", bytes=nbytes):
        out = array.detach().to("cpu").numpy()
    count("transfer:d2h")
    count("transfer:d2h_bytes", nbytes)
    return out


def _matmul(a, b, trans_a: bool, trans_b: bool):
    return torch.matmul(a.mT if trans_a else a, b.mT if trans_b else b)  # .mT is a view, no copy


class TorchBackend(Backend):
    """Backend over torch tensors on `device`; registered as "torch" (best device) and "torch:<device>"."""

    def __init__(self, device: str | None = None):
        import array_api_compat.torch as xp  # numpy-style names (axis=, keepdims=, permute_dims) on torch

        self.xp = xp
        self.device = resolve_device(device)
        self.name = f"torch:{self.device.type}"
        self._constants = {}  # id(numpy array) -> (array, device copy): rope tables go over once

    # -- arrays -----------------------------------------------------------------------------------
    def asarray(self, data, dtype=None):
        dt = torch_dtype(dtype) if dtype is not None else None
        if isinstance(data, torch.Tensor):
            if data.device != self.device:
                return _h2d(_d2h(data), self.device, dt)
            return data if dt is None or data.dtype == dt else data.to(dt)
        if isinstance(data, np.ndarray):
            return _h2d(data, self.device, dt)
        if isinstance(data, (int, float, bool)) or np.isscalar(data):  # a python number: no host array
            return torch.tensor(data, dtype=dt, device=self.device)
        return _h2d(np.asarray(data, dtype=numpy_dtype(dt) if dt is not None else None), self.device)

    def constant(self, array):
        """A device copy of a host array that does not change (rope tables), made once per array."""
        if isinstance(array, torch.Tensor):
            return self.asarray(array)
        hit = self._constants.get(id(array))
        if hit is None or hit[0] is not array:
            hit = self._constants[id(array)] = (array, self.asarray(array))  # keeps `array` alive: id stays unique
        return hit[1]

    def to_numpy(self, array) -> np.ndarray:
        return _d2h(array)

    def full(self, shape, value, dtype):
        return torch.full(tuple(shape), value, dtype=torch_dtype(dtype), device=self.device)

    def owns(self, array) -> bool:
        return isinstance(array, torch.Tensor) and array.device == self.device

    def numpy_dtype(self, dtype) -> np.dtype:
        return numpy_dtype(dtype)

    def copy(self, array):
        return array.clone()

    def owns_memory(self, array) -> bool:
        return not array._is_view()

    def index_add(self, target, key, values) -> None:
        """target[key] += values with repeated indices accumulating (numpy's np.add.at)."""
        key = key if isinstance(key, tuple) else (key,)
        key = tuple(self.asarray(k) if isinstance(k, np.ndarray) else k for k in key)
        target.index_put_(key, values, accumulate=True)

    # -- GEMM -------------------------------------------------------------------------------------
    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        m, k, n, batch = gemm_dims(a.shape, b.shape, trans_a, trans_b)
        count(f"dispatch:{self.name}")
        with span("gemm", "matmul", m=m, k=k, n=n, batch=batch, backend=self.name):
            return _matmul(a, b, trans_a, trans_b)

    def prewarm_gemm(self, m, k, n, dtype) -> None:
        dt = torch_dtype(dtype)
        torch.matmul(torch.zeros((m, k), dtype=dt, device=self.device), torch.zeros((k, n), dtype=dt, device=self.device))
        self.synchronize()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    # -- fused kernels (fusegrad.backends.torch_kernels) ------------------------------------------------
    rmsnorm_forward = staticmethod(torch_kernels.rmsnorm_forward)
    rmsnorm_backward = staticmethod(torch_kernels.rmsnorm_backward)
    rope_apply = staticmethod(torch_kernels.rope_apply)
    swiglu_forward = staticmethod(torch_kernels.swiglu_forward)
    swiglu_backward = staticmethod(torch_kernels.swiglu_backward)
    attention_backward = staticmethod(torch_kernels.attention_backward)
    adamw_update = staticmethod(torch_kernels.adamw_update)
    sum_of_squares = staticmethod(torch_kernels.sum_of_squares)

    def attention_forward(self, qkv, n_heads, n_kv_heads, cos, sin, block=torch_kernels.ATTENTION_BLOCK):
        return torch_kernels.attention_forward(qkv, n_heads, n_kv_heads, self.constant(cos), self.constant(sin), block)

    def embedding_backward(self, g, tokens, vocab_size):
        return torch_kernels.embedding_backward(g, self.asarray(tokens), vocab_size)

    def classifier_cross_entropy(self, h, weight, targets, chunk=256, need_dh=True, need_dw=True):
        return torch_kernels.classifier_cross_entropy(h, weight, self.asarray(targets), chunk, need_dh, need_dw)

    def __repr__(self) -> str:
        return f"<backend {self.name}>"


# -- per-op GEMM offload of a numpy model ---------------------------------------------------------------
def torch_gemm_offload(device: str):
    """A GEMM over numpy operands that runs on the torch device: (gemm, prewarm) for GemmChain.add_offload.

    Operands go to the device (counted transfers), one torch.matmul with transposed views, result back.
    """
    backend = TorchBackend(device)

    def gemm(a, b, trans_a, trans_b):
        return _d2h(_matmul(_h2d(a, backend.device), _h2d(b, backend.device), trans_a, trans_b))  # chain counts it

    return gemm, backend.prewarm_gemm


def enable_gemm_offload(spec: str, min_flops: float | None = None):
    """`--offload_gemm torch:cuda` (or torch:mps, torch:cpu): put that device ahead of the CPU in GEMM_CHAIN.

    >>> entry = enable_gemm_offload("torch:cpu", min_flops=0)
    >>> entry.name
    'torch:cpu'
    >>> GEMM_CHAIN.remove_offload("torch:cpu")
    """
    kind, _, device = spec.partition(":")
    if kind != "torch":
        raise BackendError(f"offload_gemm: {spec!r} is not a torch device; use torch:cuda, torch:mps or torch:cpu")
    gemm, prewarm = torch_gemm_offload(device or None)
    kwargs = {} if min_flops is None else {"min_flops": min_flops}
    return GEMM_CHAIN.add_offload(f"torch:{resolve_device(device or None).type}", gemm, prewarm=prewarm, **kwargs)
