"""Kernel library: MIL program generators for a Llama layer, channel-first [1, C, 1, S].

Every kernel takes one fp32 input `x`, casts it to fp16, computes in fp16 and returns one fp32 output
`y` (the seed's convention, so a kernel needs one input and one output IOSurface). Each returns
`(program, weights)`; weights maps BLOBFILE paths to MILBlob bytes. With `dialect="m1"` (M1/M2
compilers, see builder.py) `x` and `y` are fp16 and there is no cast.

Two flavours:
- baked: weights are BLOBFILE consts. Changing a weight means compiling again (the ANE ignores a
  rewritten blob), and a process can compile only ~119 programs.
- dynamic (`*_dynamic`): the weights ride in the input after the activations, `[1, IC, 1, S + ...]`,
  so training compiles each kernel once and restages weights per step. Pack with `pack_dynamic`.
  Only data-independent tables (causal mask, RoPE cos/sin) stay as BLOBFILE consts.

>>> import numpy as np
>>> w1, w3 = np.ones((8, 4), np.float32), np.ones((8, 4), np.float32)     # (hidden, dim)
>>> program, weights = ffn_w13_backward_dx(w1, w3, seq=2)
>>> program.inputs[0].type.text, program.output_vars[0].type.text
('tensor<fp32, [1, 16, 1, 2]>', 'tensor<fp32, [1, 4, 1, 2]>')
"""
from __future__ import annotations

import numpy as np

from fusegrad.backends.ane.builder import MilBuilder
from fusegrad.backends.ane.sim import INNER_MULTIPLE, MIN_IO_BYTES
from fusegrad.core.errors import ShapeError

MASK_VALUE = -65504.0  # most negative fp16; the ANE's SDPA ignores masks, so the mask is added by hand


# ---- shared pieces ------------------------------------------------------------------------------
def pack_dynamic(act: np.ndarray, *mats: np.ndarray) -> np.ndarray:
    """[1, C, 1, S + sum(cols)] fp32: activations (C, S), then each matrix (C, cols) per channel row."""
    for m in mats:
        if m.shape[0] != act.shape[0]:
            raise ShapeError(f"pack_dynamic: matrix {m.shape} needs {act.shape[0]} rows like activations {act.shape}")
    packed = np.concatenate([act, *mats], axis=1).astype(np.float32)
    return packed[None, :, None, :]


def _input16(b: MilBuilder, channels: int, width: int):
    """The fp16 input: cast from fp32 ("m3"), or fp16 I/O with no cast ("m1": M1/M2 reject cast)."""
    if b.dialect == "m1":
        return b.input("x", (1, channels, 1, width), "fp16")
    return b.cast(b.input("x", (1, channels, 1, width)), "fp16", name="x16")


def _output32(b: MilBuilder, y):
    return b.build([b.rename(y, "y") if b.dialect == "m1" else b.cast(y, "fp32", name="y")])


def _channels(b, x, begin, count, name):
    """x[:, begin:begin+count, :, :] of a (1, C, 1, W) value."""
    _, _, _, width = x.type.shape
    return b.slice_by_size(x, [0, begin, 0, 0], [1, count, 1, width], name=name)


def _columns(b, x, begin, count, name):
    """x[:, :, :, begin:begin+count] of a (1, C, 1, W) value."""
    _, channels, _, _ = x.type.shape
    return b.slice_by_size(x, [0, 0, 0, begin], [1, channels, 1, count], name=name)


def _linear(b, x, w: np.ndarray, name: str, weight_name: str):
    """W @ x as a 1x1 conv: x (1, IC, 1, S), w (OC, IC) -> (1, OC, 1, S)."""
    return b.conv(x, b.weight(weight_name, w.reshape(*w.shape, 1, 1)), name=name)


def _linear_dynamic(b, x, w, transposed: bool, name: str):
    """W @ x with W taken from the input. x (1, IC, 1, S); w is (1, IC, 1, OC) holding W^T when
    `transposed`, else (1, OC, 1, IC) holding W. -> (1, OC, 1, S)."""
    _, ic, _, s = x.type.shape
    _, rows, _, cols = w.type.shape
    oc = cols if transposed else rows
    x2 = b.reshape(x, (1, 1, ic, s), name=name + "_x")
    w2 = b.reshape(w, (1, 1, rows, cols), name=name + "_w")
    y = b.matmul(w2, x2, transpose_x=transposed, name=name + "_mm")
    return b.reshape(y, (1, oc, 1, s), name=name)


def _rmsnorm_unit(b, x, eps: float):
    """x / sqrt(mean(x^2) + eps) over channels; x pre-scaled by 1/sqrt(C) so fp16 sums don't overflow."""
    channels = x.type.shape[1]
    xs = b.mul(x, 1.0 / np.sqrt(channels), name="xs")
    ms = b.reduce_sum(b.mul(xs, xs, name="xs2"), axes=[1], name="ms")  # (1, 1, 1, S)
    inv = b.pow(b.add(ms, eps, name="ms_eps"), -0.5, name="inv_rms")
    return b.mul(x, inv, name="xn")


def rope_tables(head_dim: int, seq: int, theta: float = 10000.0):
    """cos and signed sin (1, 1, hd, S) for llama2.c's interleaved pairs (x[2i], x[2i+1]):
    out[2i] = x[2i] cos - x[2i+1] sin, out[2i+1] = x[2i+1] cos + x[2i] sin."""
    freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hd/2,)
    angle = freq[:, None] * np.arange(seq)[None, :]  # (hd/2, S)
    cos = np.repeat(np.cos(angle), 2, axis=0)
    sin = np.repeat(np.sin(angle), 2, axis=0) * np.tile([-1.0, 1.0], head_dim // 2)[:, None]
    return cos.reshape(1, 1, head_dim, seq), sin.reshape(1, 1, head_dim, seq)


def causal_mask(seq: int) -> np.ndarray:
    """(1, 1, S, S): 0 where key <= query, -65504 above the diagonal."""
    return np.triu(np.full((seq, seq), MASK_VALUE, np.float32), 1).reshape(1, 1, seq, seq)


def _rope(b, x, heads: int, head_dim: int, cos, sin, tag: str):
    """Rotate interleaved pairs of x (1, heads*hd, 1, S) -> (1, heads, hd, S); cos, sin are rope_tables consts."""
    s = x.type.shape[3]
    pairs = b.reshape(x, (1, heads * head_dim // 2, 2, s), name=tag + "_pairs")
    half = (1, heads * head_dim // 2, 1, s)
    even = b.slice_by_size(pairs, [0, 0, 0, 0], half, name=tag + "_even")
    odd = b.slice_by_size(pairs, [0, 0, 1, 0], half, name=tag + "_odd")
    swapped = b.reshape(b.concat([odd, even], axis=2, name=tag + "_swap"), (1, heads, head_dim, s), name=tag + "_sw")
    heads_x = b.reshape(x, (1, heads, head_dim, s), name=tag + "_h")
    return b.add(b.mul(heads_x, cos, name=tag + "_c"), b.mul(swapped, sin, name=tag + "_s"), name=tag + "_rope")


def _repeat_kv(b, x, rep: int, tag: str):
    """(1, KVH, hd, S) -> (1, KVH*rep, hd, S); query head h reads kv head h // rep."""
    return x if rep == 1 else b.concat([x] * rep, axis=1, interleave=True, name=tag + "_rep")


def _attention_probs(b, q, k, mask):
    """softmax(q^T k + mask) per head: q (1, H, hd, S), k (1, H, hd, S) -> (1, H, S_q, S_k)."""
    scores = b.matmul(q, k, transpose_x=True, name="scores")
    return b.softmax(b.add(scores, mask, name="masked"), axis=-1, name="probs")


def _check_heads(dim: int, n_heads: int, n_kv_heads: int):
    if dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2:
        raise ShapeError(f"ane attention: dim {dim}, n_heads {n_heads}, n_kv_heads {n_kv_heads} need dim % n_heads"
                         f" == 0, n_heads % n_kv_heads == 0 and an even head size")
    return dim // n_heads, dim // n_heads * n_kv_heads


# ---- backward dx (the seed's kernels) -----------------------------------------------------------
def ffn_w13_backward_dx(w1: np.ndarray, w3: np.ndarray, seq: int, dialect: str = "m3"):
    """dx = W1^T dh1 + W3^T dh3. x = concat(dh1, dh3) (1, 2H, 1, S) -> y (1, D, 1, S); w1, w3 (H, D)."""
    hidden, dim = w1.shape
    b = MilBuilder(dialect=dialect)
    x = _input16(b, 2 * hidden, seq)
    dx1 = _linear(b, _channels(b, x, 0, hidden, "dh1"), w1.T, "dx1", "W1t")
    dx3 = _linear(b, _channels(b, x, hidden, hidden, "dh3"), w3.T, "dx3", "W3t")
    return _output32(b, b.add(dx1, dx3, name="dx"))


def qkv_backward_dx(wq: np.ndarray, wk: np.ndarray, wv: np.ndarray, seq: int, dialect: str = "m3"):
    """dx = Wq^T dq + Wk^T dk + Wv^T dv. x = concat(dq, dk, dv) (1, D+2KV, 1, S) -> y (1, D, 1, S)."""
    dim, kv = wq.shape[0], wk.shape[0]
    b = MilBuilder(dialect=dialect)
    x = _input16(b, dim + 2 * kv, seq)
    dxq = _linear(b, _channels(b, x, 0, dim, "dq"), wq.T, "dxq", "Wqt")
    dxk = _linear(b, _channels(b, x, dim, kv, "dk"), wk.T, "dxk", "Wkt")
    dxv = _linear(b, _channels(b, x, dim + kv, kv, "dv"), wv.T, "dxv", "Wvt")
    return _output32(b, b.add(b.add(dxq, dxk, name="dxqk"), dxv, name="dx"))


def matmul_dynamic(in_channels: int, dim: int, seq: int, dialect: str = "m3"):
    """x = pack_dynamic(act (IC, S), M (IC, OC)) -> y = M^T act (1, OC, 1, S), OC = dim, in fp16: one
    program for any weights, so training compiles it once per shape. It is the program of the fused
    backward-dx kernels below, and the ANE backend's GEMM for every projection."""
    b = MilBuilder(dialect=dialect)
    x = _input16(b, in_channels, seq + dim)
    act, w = _columns(b, x, 0, seq, "act"), _columns(b, x, seq, dim, "wt")
    return _output32(b, _linear_dynamic(b, act, w, transposed=True, name="dx"))


def gemm_padding(m: int, k: int, n: int, itemsize: int = 4) -> tuple:
    """(m', k') to run y = a (m, k) @ w (k, n) as matmul_dynamic(k', n, m'): the inner dimension k up to a
    multiple of INNER_MULTIPLE, the tokens m up until both I/O surfaces (input k' x (m' + n), output
    n x m', `itemsize` bytes each) hold MIN_IO_BYTES. Zero padding leaves y[:m] unchanged."""
    k2 = -(-k // INNER_MULTIPLE) * INNER_MULTIPLE
    need = -(-MIN_IO_BYTES // itemsize)
    return max(m, -(-need // n), -(-need // k2) - n), k2


def pack_gemm(a: np.ndarray, mat: np.ndarray, m2: int, k2: int, dtype=np.float32) -> np.ndarray:
    """The input of matmul_dynamic(k2, n, m2) for a (m, k) @ mat (k, n): pack_dynamic(a^T, mat), zero padded."""
    (m, k), n = a.shape, mat.shape[1]
    x = np.zeros((1, k2, 1, m2 + n), dtype)
    x[0, :k, 0, :m] = a.T
    x[0, :k, 0, m2:] = mat
    return x


def ffn_w13_backward_dx_dynamic(dim: int, hidden: int, seq: int, dialect: str = "m3"):
    """x = pack_dynamic(concat(dh1, dh3) (2H, S), vstack(W1, W3) (2H, D)) -> y = W1^T dh1 + W3^T dh3."""
    return matmul_dynamic(2 * hidden, dim, seq, dialect)


def qkv_backward_dx_dynamic(dim: int, kv_dim: int, seq: int, dialect: str = "m3"):
    """x = pack_dynamic(concat(dq, dk, dv) (D+2KV, S), vstack(Wq, Wk, Wv) (D+2KV, D)) -> y (1, D, 1, S)."""
    return matmul_dynamic(dim + 2 * kv_dim, dim, seq, dialect)


# ---- forward FFN --------------------------------------------------------------------------------
def _swiglu(b, h1, h3, name: str = "g"):
    return b.mul(b.mul(h1, b.sigmoid(h1, name="sig"), name="silu"), h3, name=name)


def ffn_forward(w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, seq: int, dialect: str = "m3"):
    """y = W2 (silu(W1 x) * W3 x). x (1, D, 1, S) -> y (1, D, 1, S); w1, w3 (H, D), w2 (D, H)."""
    dim = w1.shape[1]
    b = MilBuilder(dialect=dialect)
    x = _input16(b, dim, seq)
    g = _swiglu(b, _linear(b, x, w1, "h1", "W1"), _linear(b, x, w3, "h3", "W3"))
    return _output32(b, _linear(b, g, w2, "ffn", "W2"))


def ffn_forward_dynamic(dim: int, hidden: int, seq: int, dialect: str = "m3"):
    """x = pack_dynamic(x (D, S), W1^T (D, H), W3^T (D, H), W2 (D, H)) -> y (1, D, 1, S)."""
    b = MilBuilder(dialect=dialect)
    x = _input16(b, dim, seq + 3 * hidden)
    act = _columns(b, x, 0, seq, "act")
    w1t, w3t, w2 = (_columns(b, x, seq + i * hidden, hidden, n) for i, n in enumerate(("w1t", "w3t", "w2")))
    h1 = _linear_dynamic(b, act, w1t, transposed=True, name="h1")
    h3 = _linear_dynamic(b, act, w3t, transposed=True, name="h3")
    return _output32(b, _linear_dynamic(b, _swiglu(b, h1, h3), w2, transposed=False, name="ffn"))


# ---- forward attention --------------------------------------------------------------------------
def _attention_core(b, q, k, v, n_heads: int, n_kv_heads: int):
    """RoPE'd causal attention of q (1, D, 1, S), k, v (1, KV, 1, S) -> (1, D, 1, S)."""
    dim, seq = q.type.shape[1], q.type.shape[3]
    hd, rep = dim // n_heads, n_heads // n_kv_heads
    cos, sin = (b.weight(n, t) for n, t in zip(("rope_cos", "rope_sin"), rope_tables(hd, seq)))
    qr = b.mul(_rope(b, q, n_heads, hd, cos, sin, "q"), 1.0 / np.sqrt(hd), name="q_scaled")
    kr = _repeat_kv(b, _rope(b, k, n_kv_heads, hd, cos, sin, "k"), rep, "k")
    vh = _repeat_kv(b, b.reshape(v, (1, n_kv_heads, hd, seq), name="v_h"), rep, "v")
    probs = _attention_probs(b, qr, kr, b.weight("mask", causal_mask(seq)))
    out = b.matmul(vh, probs, transpose_y=True, name="attn")  # (1, H, hd, S_q)
    return b.reshape(out, (1, dim, 1, seq), name="attn_flat")


def attention_forward(wq, wk, wv, wo, norm_weight, n_heads: int, n_kv_heads: int, seq: int, eps: float = 1e-5,
                      dialect: str = "m3"):
    """y = Wo attn(RoPE(Wq' xn), RoPE(Wk' xn), Wv' xn) with xn = x / rms(x) and W' = W diag(norm_weight)
    (the RMSNorm weight folded into the projections). x (1, D, 1, S) -> y (1, D, 1, S)."""
    dim = wq.shape[1]
    _check_heads(dim, n_heads, n_kv_heads)
    g = np.asarray(norm_weight, np.float32)[None, :]
    b = MilBuilder(dialect=dialect)
    xn = _rmsnorm_unit(b, _input16(b, dim, seq), eps)
    q, k, v = (_linear(b, xn, w * g, n, "W" + n) for w, n in ((wq, "q"), (wk, "k"), (wv, "v")))
    return _output32(b, _linear(b, _attention_core(b, q, k, v, n_heads, n_kv_heads), wo, "o", "Wo"))


def attention_forward_dynamic(dim: int, n_heads: int, n_kv_heads: int, seq: int, eps: float = 1e-5,
                              dialect: str = "m3"):
    """x = pack_dynamic(x (D, S), (Wq diag(g))^T (D, D), (Wk diag(g))^T (D, KV), (Wv diag(g))^T (D, KV), Wo (D, D))
    -> y (1, D, 1, S); g is the attention RMSNorm weight, folded in by the caller."""
    _, kv = _check_heads(dim, n_heads, n_kv_heads)
    b = MilBuilder(dialect=dialect)
    x = _input16(b, dim, seq + 2 * dim + 2 * kv)
    xn = _rmsnorm_unit(b, _columns(b, x, 0, seq, "act"), eps)
    offsets = np.cumsum([seq, dim, kv, kv])
    wqt, wkt, wvt = (_columns(b, x, int(o), n, t) for o, n, t in zip(offsets, (dim, kv, kv), ("wqt", "wkt", "wvt")))
    wo = _columns(b, x, int(offsets[-1]), dim, "wo")
    q, k, v = (_linear_dynamic(b, xn, w, True, n) for w, n in ((wqt, "q"), (wkt, "k"), (wvt, "v")))
    attn = _attention_core(b, q, k, v, n_heads, n_kv_heads)
    return _output32(b, _linear_dynamic(b, attn, wo, transposed=False, name="o"))


# ---- SDPA backward ------------------------------------------------------------------------------
def sdpa_backward(dim: int, n_heads: int, n_kv_heads: int, seq: int, dialect: str = "m3"):
    """Gradients of causal softmax(q^T k / sqrt(hd)) attention. x = concat(q, k, v, dout) (1, 2D+2KV, 1, S)
    with q, k already RoPE'd -> y = concat(dq, dk, dv) (1, D+2KV, 1, S), the input of qkv_backward_dx.
    No weights, so there is one flavour; dq, dk are w.r.t. the rotated q, k."""
    hd, kv = _check_heads(dim, n_heads, n_kv_heads)
    rep = n_heads // n_kv_heads
    b = MilBuilder(dialect=dialect)
    x = _input16(b, 2 * dim + 2 * kv, seq)

    def heads(t, n, h):  # (1, h*hd, 1, S) -> (1, h, hd, S)
        return b.reshape(t, (1, h, hd, seq), name=n + "_h")

    q = b.mul(heads(_channels(b, x, 0, dim, "q"), "q", n_heads), 1.0 / np.sqrt(hd), name="q_scaled")
    k = _repeat_kv(b, heads(_channels(b, x, dim, kv, "k"), "k", n_kv_heads), rep, "k")
    v = _repeat_kv(b, heads(_channels(b, x, dim + kv, kv, "v"), "v", n_kv_heads), rep, "v")
    dout = heads(_channels(b, x, dim + 2 * kv, dim, "dout"), "dout", n_heads)
    probs = _attention_probs(b, q, k, b.weight("mask", causal_mask(seq)))  # (1, H, S_q, S_k)
    dv = b.matmul(dout, probs, name="dv_h")  # (1, H, hd, S_k)
    dp = b.matmul(dout, v, transpose_x=True, name="dp")  # (1, H, S_q, S_k)
    row = b.reduce_sum(b.mul(probs, dp, name="pdp"), axes=[-1], name="pdp_sum")  # (1, H, S_q, 1)
    ds = b.mul(probs, b.sub(dp, row, name="dp_c"), name="ds")
    dq = b.mul(b.matmul(k, ds, transpose_y=True, name="dq_h"), 1.0 / np.sqrt(hd), name="dq_s")
    dk = b.matmul(q, ds, name="dk_h")  # q is pre-scaled, so this is already scale * q ds
    out = [b.reshape(dq, (1, dim, 1, seq), name="dq")]
    for t, n in ((dk, "dk"), (dv, "dv")):
        if rep > 1:  # sum the gradients of the query heads sharing one kv head
            t = b.reduce_sum(b.reshape(t, (1, n_kv_heads, rep, hd * seq), name=n + "_g"), axes=[2], name=n + "_sum")
        out.append(b.reshape(t, (1, kv, 1, seq), name=n))
    return _output32(b, b.concat(out, axis=1, name="dqkv"))


KERNELS = ("matmul_dynamic", "ffn_w13_backward_dx", "ffn_w13_backward_dx_dynamic", "qkv_backward_dx",
           "qkv_backward_dx_dynamic", "ffn_forward", "ffn_forward_dynamic", "attention_forward",
           "attention_forward_dynamic", "sdpa_backward")
