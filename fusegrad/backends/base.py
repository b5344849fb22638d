"""The kernel contract: every kernel the ops call, each with its reference body, forward beside backward.

A backend owns one kind of array (numpy arrays, torch tensors on a device, ...) and names its array-API
namespace `xp`. The reference bodies below are written once against `self.xp`, so they run on any
backend; a backend overrides a kernel only where it has something faster (numba on the CPU, torch's fused
attention), and `tests/backends/test_kernels.py` checks every override against these bodies. What a
forward kernel saves for its backward is an object of the backend that made it; the ops only hand it back.

Shapes: B batch, T time, C channels, H query heads, Hkv kv heads, G = H / Hkv, D head size, Hd FFN hidden,
V vocabulary, N rows (tokens).

>>> from fusegrad.backends import get_backend
>>> be = get_backend("numpy")
>>> y, rstd = be.rmsnorm_forward(np.ones((2, 4), np.float32), np.full(4, 2.0, np.float32), 0.0)
>>> y[0].tolist(), rstd.shape
([2.0, 2.0, 2.0, 2.0], (2, 1))
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np

from fusegrad.core.errors import BackendError, ShapeError
from fusegrad.core.trace import count, span

ATTENTION_BLOCK = 128  # query rows per attention block: keys past the block's last row are never touched
# bytes of probabilities an attention forward keeps for its backward; past this it keeps only each score row's
# logsumexp, and the backward recomputes the probabilities block by block (memory linear in T; the recompute
# costs ~10-30% of attention's time: docs/performance.md, "Longer contexts")
ATTENTION_PROBS_BUDGET = 64 << 20


def gemm_dims(a_shape, b_shape, trans_a: bool, trans_b: bool):
    """(m, k, n, batch) of op(a) @ op(b); raises ShapeError when the inner dimensions differ."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ShapeError(f"gemm: operands must be at least 2-D, got a {tuple(a_shape)}, b {tuple(b_shape)}")
    m, k = (a_shape[-1], a_shape[-2]) if trans_a else (a_shape[-2], a_shape[-1])
    k2, n = (b_shape[-1], b_shape[-2]) if trans_b else (b_shape[-2], b_shape[-1])
    if k != k2:
        raise ShapeError(f"gemm: inner dimensions differ: op(a) is {m}x{k}, op(b) is {k2}x{n}")
    if len(a_shape) == len(b_shape) == 2:
        return m, k, n, 1
    try:  # leading axes broadcast like numpy.matmul: (3, 1, M, K) x (2, K, N) is 6 GEMMs
        batch = math.prod(np.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2])))
    except ValueError:
        raise ShapeError(f"gemm: batch dimensions do not broadcast: a {tuple(a_shape)}, b {tuple(b_shape)}") from None
    return m, k, n, batch


def rope_tables(seq_len: int, head_dim: int, theta: float, dtype=np.float32):
    """cos, sin (T, D/2) host arrays for positions 0..T-1, frequency theta^(-2i/D) for pair i."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(seq_len, dtype=np.float64), freqs)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def blocks(T: int, block: int) -> list:
    """[(lo, hi), ...] query-row blocks of at most `block` rows covering 0..T."""
    return [(lo, min(lo + block, T)) for lo in range(0, T, block)]


def keeps_probs(B: int, n_heads: int, T: int, block: int, itemsize: int = 4) -> bool:
    """Whether an attention forward on (B, T) keeps its blocks' probabilities (B, H, bq, hi): within
    ATTENTION_PROBS_BUDGET.

    >>> keeps_probs(8, 12, 256, 128), keeps_probs(4, 12, 1024, 128)
    (True, False)
    """
    return B * n_heads * sum((hi - lo) * hi for lo, hi in blocks(T, block)) * itemsize <= ATTENTION_PROBS_BUDGET


@dataclasses.dataclass
class AttentionSaved:
    """What the reference attention forward keeps: q (B, Hkv, G, T, D), k, v (B, Hkv, T, D) with rope
    applied, each query block's probabilities (B, Hkv, G bq, hi) while they fit ATTENTION_PROBS_BUDGET
    (else None: memory linear in T), the logsumexp of its score rows (B, Hkv, G bq, 1) from which the
    backward recomputes them (None too: it takes the max and sum again), the tables."""
    q: object
    k: object
    v: object
    probs: list | None
    lse: list | None
    cos: object
    sin: object
    block: int


class Backend:
    name = "base"
    xp = None  # array-API namespace (numpy; array_api_compat.torch)
    device = "cpu"
    accum_dtype = np.float64  # what sums of many terms (losses, norms) accumulate in

    # -- arrays: per array library ---------------------------------------------------------------------
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

    def contiguous(self, array):
        """The array in C order (a copy only when it is not)."""
        raise NotImplementedError

    def constant(self, array):
        """This backend's copy of a host array that never changes (rope tables); a device makes it once."""
        return self.asarray(array)

    def owns_memory(self, array) -> bool:
        """True if the array owns its memory (not a view that could alias an activation)."""
        flags = getattr(array, "flags", None)
        return flags is None or (flags.owndata and flags.writeable)

    def index_add(self, target, key, values) -> None:
        """target[key] += values in place, repeated indices accumulating (numpy's np.add.at)."""
        raise NotImplementedError

    # -- GEMM -----------------------------------------------------------------------------------------
    def gemm(self, a, b, trans_a: bool = False, trans_b: bool = False):
        """op(a) @ op(b), op transposing the last two axes when its flag is set (a view, never a copy);
        leading axes broadcast like numpy.matmul. (..., M, K) x (..., K, N) -> (..., M, N)."""
        m, k, n, batch = gemm_dims(a.shape, b.shape, trans_a, trans_b)
        xp = self.xp
        count(f"dispatch:{self.name}")
        with span("gemm", "matmul", m=m, k=k, n=n, batch=batch, backend=self.name):
            return xp.matmul(xp.matrix_transpose(a) if trans_a else a, xp.matrix_transpose(b) if trans_b else b)

    def gemm_accumulate(self, c, a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0) -> None:
        """c += alpha op(a) op(b) in place, 2-D: (M, K) x (K, N) into c (M, N), which may be a column slice
        `y[:, rows]` (LoRA's rank-r update into its part of a fused projection) -- no (M, N) temporary where
        the BLAS takes beta = 1.

        >>> from fusegrad.backends import get_backend
        >>> c = np.ones((2, 2), np.float32)
        >>> get_backend("numpy").gemm_accumulate(c, np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), alpha=2.0)
        >>> print(c)
        [[3. 1.]
         [1. 3.]]
        """
        m, _, n, _ = gemm_dims(a.shape, b.shape, trans_a, trans_b)
        if tuple(c.shape) != (m, n):
            raise ShapeError(f"gemm_accumulate: c is {tuple(c.shape)}, op(a) op(b) is ({m}, {n})")
        product = self.gemm(a, b, trans_a, trans_b)
        c += product if alpha == 1.0 else product * alpha

    def mm(self, a, b):
        """a @ b inside a kernel (attention, classifier): no span; a mixed-precision backend multiplies in its
        compute dtype and returns float32, so the softmax that follows runs in float32."""
        return self.xp.matmul(a, b)

    @contextlib.contextmanager
    def precision(self, dtype: str = "fp32"):
        """Inside the block the GEMMs run in `dtype` (fp32 | bf16 | fp16); parameters stay float32. This
        backend computes in float32 only."""
        if dtype not in ("fp32", "float32"):
            raise BackendError(f"backend {self.name} computes in fp32 only; dtype {dtype} needs --backend torch")
        yield self

    def compute_dtype(self):
        """Inside a `precision` block, the dtype of GEMM operands and activations (as Tensor.dtype names it);
        None outside one and on a backend that computes in float32 only."""
        return None

    def prewarm_gemm(self, m: int, k: int, n: int, dtype) -> None:
        """Make the first real GEMM of this shape fast (JIT, kernel selection, allocation)."""
        self.gemm(self.zeros((m, k), dtype), self.zeros((k, n), dtype))

    def synchronize(self) -> None:
        """Wait until the work queued on the device is done (for timing); the CPU runs synchronously."""

    def prewarm_kernels(self) -> float:
        """Load (or compile) this backend's kernels now; seconds taken (0.0: nothing to compile)."""
        return 0.0

    # -- RMSNorm ----------------------------------------------------------------------------------------
    def rmsnorm_forward(self, x, weight, eps: float):
        """x (N, C), weight (C,) -> y (N, C), rstd (N, 1) where y = x * rstd * weight."""
        xp = self.xp
        rstd = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)
        return x * rstd * weight, rstd

    def rmsnorm_backward(self, dy, x, weight, rstd, need_dx: bool = True, need_dw: bool = True):
        """dy, x (N, C), rstd (N, 1) -> dx (N, C) = rstd * (dxhat - xhat * mean(dxhat * xhat)), dw (C,);
        None for what is not needed."""
        xp = self.xp
        xhat = x * rstd
        dw = xp.sum(dy * xhat, axis=0) if need_dw else None
        dx = None
        if need_dx:
            dxhat = dy * weight
            dx = rstd * (dxhat - xhat * xp.mean(dxhat * xhat, axis=-1, keepdims=True))
        return dx, dw

    # -- RoPE (llama2.c: rotate interleaved pairs x[2i], x[2i+1]) ----------------------------------------
    def rope_apply(self, x, cos, sin, inverse: bool = False):
        """x (..., T, H, D) rotated per position by cos, sin (T, D/2); inverse=True rotates back (its
        backward)."""
        x0, x1 = x[..., 0::2], x[..., 1::2]
        c, s = cos[:, None, :], (-sin if inverse else sin)[:, None, :]  # (T, 1, D/2) broadcast over heads
        out = self.xp.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    # -- causal grouped-query attention on the packed qkv ---------------------------------------------------
    def split_heads(self, qkv, n_heads: int, n_kv_heads: int, cos, sin):
        """qkv (B, T, (H + 2 Hkv) D) at the positions of cos, sin (T, D/2) -> q (B, Hkv, G, T, D), k, v
        (B, Hkv, T, D), rope applied to q and k; query head h = kv head h // G, member h % G (llama2.c)."""
        xp = self.xp
        B, T, width = qkv.shape
        D = width // (n_heads + 2 * n_kv_heads)
        q = self.rope_apply(qkv[..., :n_heads * D].reshape(B, T, n_heads, D), cos, sin)
        k = self.rope_apply(qkv[..., n_heads * D:(n_heads + n_kv_heads) * D].reshape(B, T, n_kv_heads, D), cos, sin)
        v = qkv[..., (n_heads + n_kv_heads) * D:].reshape(B, T, n_kv_heads, D)
        q = xp.permute_dims(q.reshape(B, T, n_kv_heads, n_heads // n_kv_heads, D), (0, 2, 3, 1, 4))
        k, v = xp.permute_dims(k, (0, 2, 1, 3)), xp.permute_dims(v, (0, 2, 1, 3))
        return self.contiguous(q), self.contiguous(k), self.contiguous(v)

    def merge_heads(self, out):
        """out (B, Hkv, G, T, D) -> (B, T, H D), head h = kv head * G + g."""
        B, Hkv, G, T, D = out.shape
        return self.xp.permute_dims(out, (0, 3, 1, 2, 4)).reshape(B, T, Hkv * G * D)

    def causal_probs(self, qb, k, lo: int, lse=None):
        """Softmax of the scores of query block qb (B, Hkv, G, bq, D), at positions lo..lo+bq-1, against
        keys k[:, :, :lo+bq] (B, Hkv, >= lo+bq, D) -> p (B, Hkv, G bq, lo+bq) and the rows' logsumexp
        (B, Hkv, G bq, 1); keys after a query's own position get probability 0. Given the rows' lse (the
        backward), p = exp(scores - lse): no max, no sum. The G query heads of a kv head are rows of one GEMM."""
        xp = self.xp
        B, Hkv, G, bq, D = qb.shape
        hi = lo + bq
        s = self.mm(qb.reshape(B, Hkv, G * bq, D), xp.matrix_transpose(k[:, :, :hi]))  # (B, Hkv, G bq, hi)
        s *= 1.0 / math.sqrt(D)
        positions = xp.arange(lo, hi, device=self.device)
        query_pos = xp.reshape(xp.broadcast_to(positions[None, :], (G, bq)), (G * bq,))
        s[..., query_pos[:, None] < xp.arange(hi, device=self.device)[None, :]] = -math.inf
        if lse is not None:
            s -= lse
            return xp.exp(s), lse
        m = xp.max(s, axis=-1, keepdims=True)
        s -= m
        p = xp.exp(s)
        z = xp.sum(p, axis=-1, keepdims=True)
        p /= z
        return p, m + xp.log(z)

    def attention_forward(self, qkv, n_heads: int, n_kv_heads: int, cos, sin, block: int = ATTENTION_BLOCK):
        """qkv (B, T, (H + 2 Hkv) D), cos, sin (>= T, D/2) -> y (B, T, H D) and what the backward needs.

        Query block [lo, hi) attends to keys [0, hi) only: the masked triangle beyond it is skipped.
        """
        xp = self.xp
        T = qkv.shape[1]
        cos, sin = self.constant(cos), self.constant(sin)
        q, k, v = self.split_heads(qkv, n_heads, n_kv_heads, cos[:T], sin[:T])
        out = xp.empty_like(q)  # (B, Hkv, G, T, D)
        probs = [] if keeps_probs(qkv.shape[0], n_heads, T, block) else None
        lse = []
        for lo, hi in blocks(T, block):
            p, block_lse = self.causal_probs(q[:, :, :, lo:hi], k, lo)
            out[:, :, :, lo:hi] = self.mm(p, v[:, :, :hi]).reshape(out[:, :, :, lo:hi].shape)
            lse.append(block_lse)
            if probs is not None:
                probs.append(p)
        return self.merge_heads(out), AttentionSaved(q, k, v, probs, lse, cos, sin, block)

    def attention_backward(self, dy, saved: AttentionSaved, n_heads: int, n_kv_heads: int):
        """dy (B, T, H D) -> dqkv (B, T, (H + 2 Hkv) D), packed (the fused QKV backward takes it whole);
        rope undone on dq and dk. Probabilities the forward did not keep are recomputed block by block."""
        xp = self.xp
        q, k, v = saved.q, saved.k, saved.v
        B, Hkv, G, T, D = q.shape
        scale = 1.0 / math.sqrt(D)
        do = self.contiguous(xp.permute_dims(dy.reshape(B, T, Hkv, G, D), (0, 2, 3, 1, 4)))  # (B, Hkv, G, T, D)
        dq = xp.empty_like(q)
        dk, dv = xp.zeros_like(k), xp.zeros_like(v)
        for i, (lo, hi) in enumerate(blocks(T, saved.block)):
            bq = hi - lo
            if saved.probs is not None:
                p = saved.probs[i]
            else:
                p, _ = self.causal_probs(q[:, :, :, lo:hi], k, lo, None if saved.lse is None else saved.lse[i])
            do_b = do[:, :, :, lo:hi].reshape(B, Hkv, G * bq, D)
            dv[:, :, :hi] += self.mm(xp.matrix_transpose(p), do_b)  # (B, Hkv, hi, D)
            dp = self.mm(do_b, xp.matrix_transpose(v[:, :, :hi]))  # (B, Hkv, G bq, hi)
            dp -= xp.sum(dp * p, axis=-1, keepdims=True)
            ds = p * dp
            ds *= scale
            dq[:, :, :, lo:hi] = self.mm(ds, k[:, :, :hi]).reshape(B, Hkv, G, bq, D)
            dk[:, :, :hi] += self.mm(xp.matrix_transpose(ds), q[:, :, :, lo:hi].reshape(B, Hkv, G * bq, D))
        c, s = saved.cos[:T], saved.sin[:T]
        dq = self.rope_apply(xp.permute_dims(dq, (0, 3, 1, 2, 4)).reshape(B, T, n_heads, D), c, s, inverse=True)
        dk = self.rope_apply(xp.permute_dims(dk, (0, 2, 1, 3)), c, s, inverse=True)
        return xp.concat([dq.reshape(B, T, -1), dk.reshape(B, T, -1),
                          xp.permute_dims(dv, (0, 2, 1, 3)).reshape(B, T, -1)], axis=-1)

    def attention_cached(self, qkv, k_cache, v_cache, start: int, n_heads: int, n_kv_heads: int, cos, sin):
        """Attention for generation. qkv (B, T, (H + 2 Hkv) D) holds tokens at positions start..start+T-1;
        k_cache, v_cache (B, Hkv, S_max, D) hold the rotated keys and the values of positions < start.
        Writes this block's keys and values into the caches and returns y (B, T, H D): each query
        attends to the keys at positions up to its own. No backward (generation only)."""
        T = qkv.shape[1]
        cos, sin = self.constant(cos), self.constant(sin)
        q, k, v = self.split_heads(qkv, n_heads, n_kv_heads, cos[start:start + T], sin[start:start + T])
        k_cache[:, :, start:start + T] = k
        v_cache[:, :, start:start + T] = v
        p, _ = self.causal_probs(q, k_cache, start)  # (B, Hkv, G T, start + T)
        return self.merge_heads(self.mm(p, v_cache[:, :, :start + T]).reshape(q.shape))

    # -- frozen quantized weights (QLoRA) ----------------------------------------------------------------------
    def dequantize_nf4(self, q, code, out=None):
        """An NF4Tensor or FusedNF4 (fusegrad.quant.nf4: host codes and scales) -> its float32 weight as this
        backend's array, written into `out` (a float32 array of q.shape, e.g. a buffer reused by every GEMM)
        when given, and returned; code: the 16 NF4 values. The reference dequantizes on the host and copies
        the result over."""
        return self._host_dequantize(q, out)

    def dequantize_ggml(self, q, out=None):
        """A GGMLTensor or FusedGGML (fusegrad.quant.ggml: a GGUF file's blocks, Q8_0 ... Q6_K, F16, BF16, F32,
        on the host) -> its float32 weight as this backend's array, into `out` when given (as dequantize_nf4).
        The reference is the gguf package's dequantize on the host, copied over."""
        return self._host_dequantize(q, out)

    def _host_dequantize(self, q, out):
        w = self.asarray(q.dequantize())
        if out is None:
            return w
        out[...] = w
        return out

    # -- SwiGLU on the packed W1/W3 output ----------------------------------------------------------------
    def sigmoid(self, x):
        """1 / (1 + exp(-x)) with exp only of -|x|: no overflow (and no RuntimeWarning) for very negative x."""
        xp = self.xp
        e = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1.0, e) / (1.0 + e)

    def erf(self, x):
        """The error function, elementwise, in x's dtype (the exact GELU); the reference is scipy's, on the host."""
        from scipy.special import erf  # heavy (0.3 s): only the exact GELU needs it

        return erf(x).astype(x.dtype)

    def swiglu_forward(self, h13):
        """h13 (N, 2 Hd) = [h1 | h3] -> silu(h1) * h3 (N, Hd)."""
        hd = h13.shape[-1] // 2
        h1, h3 = h13[..., :hd], h13[..., hd:]
        return h1 * self.sigmoid(h1) * h3

    def swiglu_backward(self, g, h13):
        """g (N, Hd) -> dh13 (N, 2 Hd) = [dh1 | dh3], packed for the fused W1/W3 backward GEMM."""
        hd = h13.shape[-1] // 2
        h1, h3 = h13[..., :hd], h13[..., hd:]
        sig = self.sigmoid(h1)
        dh13 = self.xp.empty_like(h13)
        dh13[..., :hd] = g * h3 * sig * (1.0 + h1 * (1.0 - sig))
        dh13[..., hd:] = g * h1 * sig
        return dh13

    # -- embedding ---------------------------------------------------------------------------------------------
    def embedding_forward(self, weight, ids):
        """weight (V, C), ids (...) int on this backend -> the rows (..., C), in the compute dtype inside a
        mixed-precision block: the residual stream starts here."""
        return weight[ids]

    def embedding_backward(self, g, tokens, vocab_size: int):
        """g (N, C), tokens (N,) int -> dW (V, C): scatter-add, repeated tokens accumulate."""
        dw = self.xp.zeros((vocab_size, g.shape[-1]), dtype=g.dtype, device=self.device)
        self.embedding_backward_into(dw, g, tokens)
        return dw

    def embedding_backward_into(self, dw, g, tokens) -> None:
        """dw (V, C) += the scatter-add of g (N, C) at tokens (N,) int, in place (a tied weight's grad)."""
        self.index_add(dw, self.asarray(tokens), g)

    # -- classifier + cross-entropy, chunked ------------------------------------------------------------------
    def classifier_cross_entropy(self, h, weight, targets, chunk: int = 256, need_dh: bool = True,
                                 need_dw: bool = True):
        """h (N, C), weight (V, C), targets (N,) -> (mean loss (0-d), dh (N, C), dW (V, C)).

        Rows go through in chunks: logits (chunk, V) live one chunk at a time, and their gradient
        (softmax - onehot) / N is folded into dh and dW right away, so neither the full (N, V) logits nor
        the probabilities ever exist. Grads are for a loss grad of 1; the op scales them by the real one.
        """
        xp = self.xp
        targets = self.asarray(targets)
        N = h.shape[0]
        total = xp.zeros((), dtype=self.accum_dtype, device=self.device)
        dh = xp.empty_like(h) if need_dh else None
        dw = xp.zeros_like(weight) if need_dw else None
        for lo in range(0, N, chunk):
            hi = min(lo + chunk, N)
            logits = self.mm(h[lo:hi], xp.matrix_transpose(weight))  # (n, V)
            logits -= xp.max(logits, axis=-1, keepdims=True)
            rows = xp.arange(hi - lo, device=self.device)
            picked = logits[rows, targets[lo:hi]]
            p = xp.exp(logits)
            z = xp.sum(p, axis=-1, keepdims=True)
            total += xp.sum(xp.log(z[:, 0]) - picked, dtype=self.accum_dtype)
            if need_dh or need_dw:
                p /= z * N
                p[rows, targets[lo:hi]] -= 1.0 / N  # p is now dlogits for this chunk
                if need_dh:
                    dh[lo:hi] = self.mm(p, weight)
                if need_dw:
                    dw += self.mm(xp.matrix_transpose(p), h[lo:hi])
        return total / N, dh, dw

    # -- optimizer and gradient sums ------------------------------------------------------------------------
    def adamw_update(self, p, g, m, v, lr, beta1, beta2, eps, wd, step, tmp=None, grad_scale=1.0) -> None:
        """One AdamW step in place on p, m, v (torch.optim.AdamW, amsgrad off) with the gradient
        grad_scale * g (a gradient clip's factor, folded in: g is read once and left as it is); `step` is t,
        from 1.

        p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
        p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). `tmp`: a scratch array of p's shape
        that a backend may use (the reference does not). grad_scale: a float, or a 0-d array where p lives.

        >>> from fusegrad.backends import get_backend
        >>> p, g = np.float32([1.0]), np.float32([2.0])
        >>> m, v = np.zeros(1, np.float32), np.zeros(1, np.float32)
        >>> get_backend("numpy").adamw_update(p, g, m, v, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.0, step=1)
        >>> print(p, m, v)
        [0.9] [0.2] [0.2]
        """
        for a in (g, m, v):
            if tuple(a.shape) != tuple(p.shape):
                raise ShapeError(f"adamw_update: arrays must all have p's shape {tuple(p.shape)}, got {tuple(a.shape)}")
        g = g * grad_scale
        if wd:
            p *= 1.0 - lr * wd
        m *= beta1
        m += g * (1.0 - beta1)
        v *= beta2
        v += g * g * (1.0 - beta2)
        denom = self.xp.sqrt(v) / math.sqrt(1.0 - beta2 ** step) + eps
        p -= m / denom * (lr / (1.0 - beta1 ** step))

    def accumulate(self, out, x) -> None:
        """out += x in place (a data-parallel helper's grads into the model's)."""
        if tuple(out.shape) != tuple(x.shape):
            raise ShapeError(f"accumulate: out {tuple(out.shape)} and x {tuple(x.shape)} must have the same shape")
        out += x

    def sum_of_squares(self, arrays):
        """sum(x^2) over every array -> a 0-d array in `accum_dtype`, where the arrays live (no host read)."""
        xp = self.xp
        return sum(xp.sum(xp.square(xp.astype(a, self.accum_dtype))) for a in arrays)

    def __repr__(self) -> str:
        return f"<backend {self.name} on {self.device}>"
