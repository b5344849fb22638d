"""The fused kernels as torch ops: same signatures and math as `fusegrad.backends.reference`.

Inputs and outputs are torch tensors on one device; nothing goes back to the host (the loss stays a
0-d device tensor). torch's autograd is never used: fusegrad's explicit backward calls the `*_backward`
kernels, and every kernel runs under `torch.no_grad()`. Shapes: B batch, T time, C channels, H heads,
Hkv kv heads, G = H / Hkv, D head size, V vocabulary.

>>> import torch
>>> x, w = torch.ones(2, 4), torch.full((4,), 2.0)
>>> y, rstd = rmsnorm_forward(x, w, eps=0.0)
>>> y[0].tolist(), rstd.shape
([2.0, 2.0, 2.0, 2.0], torch.Size([2, 1]))
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTENTION_BLOCK = 128  # query rows per block in the attention backward (bounds the (rows, T) scores)


def _accum_dtype(device: torch.device):
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


# -- RMSNorm ------------------------------------------------------------------------------------------
@torch.no_grad()
def rmsnorm_forward(x, weight, eps: float):
    """x (N, C), weight (C,) -> y (N, C), rstd (N, 1)."""
    rstd = torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps)
    return x * rstd * weight, rstd


@torch.no_grad()
def rmsnorm_backward(dy, x, weight, rstd, need_dx: bool = True, need_dw: bool = True):
    """dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), dw = sum over rows of dy * xhat."""
    xhat = x * rstd
    dw = torch.sum(dy * xhat, dim=0) if need_dw else None
    dx = None
    if need_dx:
        dxhat = dy * weight
        dx = rstd * (dxhat - xhat * torch.mean(dxhat * xhat, dim=-1, keepdim=True))
    return dx, dw


# -- RoPE (interleaved pairs, llama2.c) -----------------------------------------------------------------
@torch.no_grad()
def rope_apply(x, cos, sin, inverse: bool = False):
    """x (..., T, H, D) rotated per position by cos, sin (T, D/2); inverse=True rotates back."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., T, H, D/2, 2): a view
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], (-sin if inverse else sin)[:, None, :]  # (T, 1, D/2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


# -- causal grouped-query attention on the packed qkv -------------------------------------------------------
def _split_heads(qkv, n_heads: int, n_kv_heads: int, cos, sin):
    """qkv (B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k, v (B, Hkv, T, D), rope applied to q and k."""
    B, T, width = qkv.shape
    D = width // (n_heads + 2 * n_kv_heads)
    q, k, v = torch.split(qkv, [n_heads * D, n_kv_heads * D, n_kv_heads * D], dim=-1)
    q = rope_apply(q.reshape(B, T, n_heads, D), cos[:T], sin[:T]).transpose(1, 2)
    k = rope_apply(k.reshape(B, T, n_kv_heads, D), cos[:T], sin[:T]).transpose(1, 2)
    v = v.reshape(B, T, n_kv_heads, D).transpose(1, 2)
    return q.contiguous(), k.contiguous(), v.contiguous()


@torch.no_grad()
def attention_forward(qkv, n_heads: int, n_kv_heads: int, cos, sin, block: int = ATTENTION_BLOCK):
    """qkv (B, T, (H + 2 Hkv) D) -> y (B, T, H D) and (q, k, v, cos, sin, block) for the backward.

    The forward is torch's fused scaled_dot_product_attention (flash / memory-efficient kernels where
    the device has them); query head h reads kv head h // G, as llama2.c. The backward recomputes the
    probabilities block by block instead of keeping the (T, T) matrices alive between the passes.
    """
    B, T, _ = qkv.shape
    q, k, v = _split_heads(qkv, n_heads, n_kv_heads, cos, sin)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_heads != n_kv_heads)
    return y.transpose(1, 2).reshape(B, T, -1), (q, k, v, cos, sin, block)


@torch.no_grad()
def attention_backward(dy, saved, n_heads: int, n_kv_heads: int):
    """dy (B, T, H D) -> dqkv (B, T, (H + 2 Hkv) D) = concat(dq, dk, dv), rope undone on dq and dk."""
    q, k, v, cos, sin, block = saved
    B, H, T, D = q.shape
    G = H // n_kv_heads
    scale = 1.0 / math.sqrt(D)
    # fold the G query heads of a kv head into rows: (B, Hkv, G, T, D)
    qg = q.reshape(B, n_kv_heads, G, T, D)
    do = dy.reshape(B, T, n_kv_heads, G, D).permute(0, 2, 3, 1, 4)
    dq = torch.empty_like(qg)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    rows = torch.arange(T, device=q.device)
    for lo in range(0, T, block):
        hi = min(lo + block, T)
        qb = qg[:, :, :, lo:hi].reshape(B, n_kv_heads, G * (hi - lo), D)
        dob = do[:, :, :, lo:hi].reshape(B, n_kv_heads, G * (hi - lo), D)
        s = torch.matmul(qb, k[:, :, :hi].mT) * scale  # (B, Hkv, G bq, hi)
        masked = rows[lo:hi].repeat(G)[:, None] < rows[None, :hi]
        p = torch.softmax(s.masked_fill_(masked, float("-inf")), dim=-1)
        dv[:, :, :hi] += torch.matmul(p.mT, dob)
        dp = torch.matmul(dob, v[:, :, :hi].mT)
        ds = p * (dp - torch.sum(dp * p, dim=-1, keepdim=True)) * scale
        dq[:, :, :, lo:hi] = torch.matmul(ds, k[:, :, :hi]).reshape(B, n_kv_heads, G, hi - lo, D)
        dk[:, :, :hi] += torch.matmul(ds.mT, qb)
    c, s_ = cos[:T], sin[:T]
    dq = rope_apply(dq.reshape(B, H, T, D).transpose(1, 2), c, s_, inverse=True)  # (B, T, H, D)
    dk = rope_apply(dk.transpose(1, 2), c, s_, inverse=True)
    return torch.cat((dq.reshape(B, T, -1), dk.reshape(B, T, -1), dv.transpose(1, 2).reshape(B, T, -1)), dim=-1)


# -- SwiGLU ---------------------------------------------------------------------------------------------
@torch.no_grad()
def swiglu_forward(h13):
    """h13 (N, 2 Hd) = [h1 | h3] -> silu(h1) * h3 (N, Hd)."""
    h1, h3 = h13.chunk(2, dim=-1)
    return F.silu(h1) * h3


@torch.no_grad()
def swiglu_backward(g, h13):
    """g (N, Hd) -> dh13 (N, 2 Hd) = [dh1 | dh3]."""
    h1, h3 = h13.chunk(2, dim=-1)
    sig = torch.sigmoid(h1)
    return torch.cat((g * h3 * sig * (1.0 + h1 * (1.0 - sig)), g * h1 * sig), dim=-1)


# -- embedding ------------------------------------------------------------------------------------------
@torch.no_grad()
def embedding_backward(g, tokens, vocab_size: int):
    """g (N, C), tokens (N,) int64 -> dW (V, C); repeated tokens accumulate."""
    return torch.zeros((vocab_size, g.shape[-1]), dtype=g.dtype, device=g.device).index_add_(0, tokens, g)


# -- classifier + cross-entropy, chunked ------------------------------------------------------------------
@torch.no_grad()
def classifier_cross_entropy(h, weight, targets, chunk: int = 256, need_dh: bool = True, need_dw: bool = True):
    """h (N, C), weight (V, C), targets (N,) -> (mean loss as a 0-d device tensor, dh (N, C), dW (V, C)).

    Chunks of `chunk` rows: the (chunk, V) logits are the largest temporary; their gradient
    (softmax - onehot) / N is folded into dh and dW at once.
    """
    N = h.shape[0]
    total = torch.zeros((), dtype=_accum_dtype(h.device), device=h.device)
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        logits = torch.matmul(h[lo:hi], weight.mT)  # (n, V)
        t = targets[lo:hi]
        lse = torch.logsumexp(logits, dim=-1)
        total += torch.sum(lse.to(total.dtype) - logits.gather(1, t[:, None])[:, 0].to(total.dtype))
        if need_dh or need_dw:
            p = torch.exp_(logits.sub_(lse[:, None])).div_(N)  # softmax / N, in place of the logits
            p[torch.arange(hi - lo, device=p.device), t] -= 1.0 / N
            if need_dh:
                torch.matmul(p, weight, out=dh[lo:hi])
            if need_dw:
                dw.addmm_(p.mT, h[lo:hi])
    return (total / N).to(h.dtype), dh, dw


# -- optimizer ------------------------------------------------------------------------------------------
@torch.no_grad()
def adamw_update(p, g, m, v, lr, beta1, beta2, eps, wd, step, tmp=None) -> None:
    """In place on p, m, v: the math of `fusegrad.train.optim.adamw_update` (torch.optim.AdamW)."""
    if wd:
        p.mul_(1.0 - lr * wd)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = tmp if tmp is not None else torch.empty_like(p)
    torch.sqrt(v, out=denom).div_(math.sqrt(1.0 - beta2 ** step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))


@torch.no_grad()
def sum_of_squares(arrays) -> float:
    """sum(x^2) over every array, accumulated in float64 (float32 on MPS); one device->host sync."""
    if not arrays:
        return 0.0
    dtype = _accum_dtype(arrays[0].device)
    return float(sum(torch.sum(torch.square(a.to(dtype))) for a in arrays))
