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
GEMMs to the device one call at a time (`fusegrad.backends.gemm_offload("torch:cuda")`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import os

import array_api_compat.torch as xp  # numpy-style names (axis=, keepdims=, permute_dims) on torch
import numpy as np
import torch
import torch.nn.functional as F

from fusegrad.backends.base import ATTENTION_BLOCK, AttentionSaved, Backend
from fusegrad.core.errors import BackendError
from fusegrad.core.trace import count, span

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_COMPUTE = contextvars.ContextVar("fusegrad_torch_compute", default=None)  # the GEMM dtype of the current run
DEVICES = ("cuda", "mps", "cpu", "meta")  # meta: shapes only, no data (proves a step never leaves the device)


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
def numpy_dtype(dtype: torch.dtype):
    """torch dtype -> numpy dtype of that name; bfloat16, which numpy lacks, stays torch.bfloat16."""
    return dtype if dtype == torch.bfloat16 else torch.empty(0, dtype=dtype).numpy().dtype


def resolve_device(device: str | None) -> torch.device:
    """A torch.device that really exists here, with its index ("cuda" -> cuda:0); BackendError if not."""
    name = device or best_device()
    if name == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():  # torchrun: one GPU per local process
        name = f"cuda:{os.environ['LOCAL_RANK']}"
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
    if array.device.type == "meta":
        raise BackendError(f"torch:meta holds shapes, no data: cannot read a {tuple(array.shape)} tensor on the host")
    nbytes = array.numel() * array.element_size()
    with span("d2h", "transfer", bytes=nbytes):
        out = array.detach().to("cpu")
        out = (out.float() if out.dtype == torch.bfloat16 else out).numpy()  # numpy has no bfloat16
    count("transfer:d2h")
    count("transfer:d2h_bytes", nbytes)
    return out


class TorchBackend(Backend):
    """Backend over torch tensors on `device`; registered as "torch" (best device) and "torch:<device>"."""

    xp = xp

    def __init__(self, device: str | None = None):
        self.device = resolve_device(device)
        self.name = f"torch:{self.device.type}"
        self.accum_dtype = torch.float32 if self.device.type == "mps" else torch.float64  # MPS has no float64
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
        host = np.asarray(data, dtype=None if dt in (None, torch.bfloat16) else numpy_dtype(dt))
        return _h2d(host, self.device, dt)

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

    def contiguous(self, array):
        return array.contiguous()

    def owns_memory(self, array) -> bool:
        return not array._is_view()

    def index_add(self, target, key, values) -> None:
        """target[key] += values with repeated indices accumulating (numpy's np.add.at)."""
        key = key if isinstance(key, tuple) else (key,)
        key = tuple(self.asarray(k) if isinstance(k, np.ndarray) else k for k in key)
        target.index_put_(key, values, accumulate=True)

    # -- kernels torch does better -----------------------------------------------------------------
    def prewarm_gemm(self, m, k, n, dtype) -> None:
        dt = torch_dtype(dtype)
        torch.matmul(torch.zeros((m, k), dtype=dt, device=self.device), torch.zeros((k, n), dtype=dt, device=self.device))
        self.synchronize()

    # -- mixed precision: fp32 master weights, grads and AdamW state; bf16/fp16 GEMMs and activations -------
    @contextlib.contextmanager
    def precision(self, dtype: str = "fp32"):
        """Inside the block (per thread and task) every GEMM multiplies `dtype` operands (tensor cores on a
        GPU) and activations are stored in `dtype`, the residual stream included (Megatron's default);
        softmax, RMSNorm statistics and the loss are computed in float32, and parameters, their grads and
        AdamW state stay float32 (the autograd engine casts a grad to its tensor's dtype)."""
        if dtype not in ("fp32", "float32", *COMPUTE_DTYPES):
            raise BackendError(f"torch backend: dtype must be fp32, bf16 or fp16, got {dtype!r}")
        token = _COMPUTE.set(COMPUTE_DTYPES.get(dtype))
        try:
            yield self
        finally:
            _COMPUTE.reset(token)

    def compute_dtype(self):
        dt = _COMPUTE.get()
        return None if dt is None else numpy_dtype(dt)

    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        """Inside a precision block: operands cast to the compute dtype, the result (an activation, or a
        weight's grad that the engine then casts to float32) stays in it, as under torch.autocast."""
        dt = _COMPUTE.get()
        if dt is None or not a.is_floating_point():
            return super().gemm(a, b, trans_a, trans_b)
        return super().gemm(a.to(dt), b.to(dt), trans_a, trans_b)

    def mm(self, a, b):
        """Inside a kernel: compute-dtype operands, a float32 result (the softmax or loss after it is fp32)."""
        dt = _COMPUTE.get()
        if dt is None or not a.is_floating_point():
            return torch.matmul(a, b)
        return torch.matmul(a.to(dt), b.to(dt)).float()

    def embedding_forward(self, weight, ids):
        dt = _COMPUTE.get()
        return weight[ids] if dt is None else weight[ids].to(dt)

    def embedding_backward(self, g, tokens, vocab_size: int):
        """dW accumulates in the weight's float32 even when g holds bf16 activation grads."""
        return super().embedding_backward(g.float(), tokens, vocab_size)

    def rmsnorm_forward(self, x, weight, eps: float):
        """Statistics in float32 (weight's dtype); y (N, C) in x's dtype, rstd (N, 1) float32."""
        if x.dtype == weight.dtype:
            return super().rmsnorm_forward(x, weight, eps)
        y, rstd = super().rmsnorm_forward(x.to(weight.dtype), weight, eps)
        return y.to(x.dtype), rstd

    def rmsnorm_backward(self, dy, x, weight, rstd, need_dx: bool = True, need_dw: bool = True):
        if x.dtype == weight.dtype:
            return super().rmsnorm_backward(dy, x, weight, rstd, need_dx, need_dw)
        dx, dw = super().rmsnorm_backward(dy.to(weight.dtype), x.to(weight.dtype), weight, rstd, need_dx, need_dw)
        return (None if dx is None else dx.to(x.dtype)), dw

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def erf(self, x):
        return torch.special.erf(x)

    @torch.no_grad()
    def dequantize_nf4(self, q, code, out=None):
        """On the device: the packed codes and block scales go over once per NF4Tensor, each call is a
        table lookup and a scale (no host work, no host copy of the fp32 weight), into `out` if given."""
        if hasattr(q, "parts"):  # a FusedNF4: each HF module quantized on its own (fusegrad.quant.nf4)
            cat = torch.cat if out is None else lambda ws: torch.cat(ws, out=out)
            return q.dequantize_with(lambda part: self.dequantize_nf4(part, code), cat)
        hit = self._constants.get(id(q))
        if hit is None or hit[0] is not q:
            hit = self._constants[id(q)] = (q, self.asarray(q.packed), self.asarray(q.block_scales()))
        packed, scales, n = hit[1], hit[2], q.size
        idx = torch.stack((packed >> 4, packed & 15), dim=1).reshape(-1)[:n].long()  # first element high
        w = self.constant(code)[idx]  # (n,)
        if out is None:
            return (w * scales.repeat_interleave(q.blocksize)[:n]).reshape(q.shape)
        torch.mul(w, scales.repeat_interleave(q.blocksize)[:n], out=out.view(-1))
        return out

    @torch.no_grad()
    def attention_forward(self, qkv, n_heads: int, n_kv_heads: int, cos, sin, block: int = ATTENTION_BLOCK):
        """torch's fused scaled_dot_product_attention (flash / memory-efficient kernels where the device has
        them); the probabilities are not kept: the reference backward recomputes them block by block."""
        B, T, _ = qkv.shape
        cos, sin = self.constant(cos), self.constant(sin)
        q, k, v = self.split_heads(qkv, n_heads, n_kv_heads, cos[:T], sin[:T])  # q (B, Hkv, G, T, D)
        dt = _COMPUTE.get() or q.dtype  # mixed precision: bf16/fp16 operands, float32 out
        y = F.scaled_dot_product_attention(q.flatten(1, 2).to(dt), k.to(dt), v.to(dt), is_causal=True,
                                           enable_gqa=n_heads != n_kv_heads).to(q.dtype)
        return y.transpose(1, 2).reshape(B, T, -1), AttentionSaved(q, k, v, None, None, cos, sin, block)

    def attention_backward(self, dy, saved: AttentionSaved, n_heads: int, n_kv_heads: int):
        """bf16/fp16 q, k, v (saved) are widened to float32 for this layer's backward: the softmax is
        recomputed and dk, dv accumulate over query blocks in float32; dqkv returns in dy's dtype."""
        if saved.q.dtype == torch.float32:
            return super().attention_backward(dy, saved, n_heads, n_kv_heads)
        wide = dataclasses.replace(saved, q=saved.q.float(), k=saved.k.float(), v=saved.v.float())
        return super().attention_backward(dy.float(), wide, n_heads, n_kv_heads).to(dy.dtype)

    @torch.no_grad()
    def adamw_update(self, p, g, m, v, lr, beta1, beta2, eps, wd, step, tmp=None, grad_scale=1.0) -> None:
        """The reference's math with torch's fused in-place ops: no temporaries on the device (the scaled
        grad goes through `tmp`, which then holds the denominator)."""
        denom = tmp if tmp is not None else torch.empty_like(p)
        if not (isinstance(grad_scale, float) and grad_scale == 1.0):
            g = torch.mul(g, grad_scale, out=denom)
        if wd:
            p.mul_(1.0 - lr * wd)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        torch.sqrt(v, out=denom).div_(math.sqrt(1.0 - beta2 ** step)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))


# -- per-op GEMM offload of a numpy model ---------------------------------------------------------------
def torch_gemm_offload(device: str | None):
    """A GEMM over numpy operands that runs on the torch device: (name, gemm, prewarm) for
    GemmChain.add_offload. Operands go to the device (counted transfers), one torch.matmul, result back."""
    backend = TorchBackend(device)

    def gemm(a, b, trans_a, trans_b):
        a, b = _h2d(a, backend.device), _h2d(b, backend.device)
        return _d2h(torch.matmul(a.mT if trans_a else a, b.mT if trans_b else b))  # the chain counts it

    return backend.name, gemm, backend.prewarm_gemm
