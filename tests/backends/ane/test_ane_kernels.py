"""Kernels on ane-sim vs fp32 NumPy (and torch autograd for SDPA backward), plus golden MIL text.

Tolerance: fp16 keeps 11 significant bits (relative step 2**-11 ~ 4.9e-4). Each kernel rounds after
every op, so we allow TOL = 5e-3 of the reference's largest magnitude (~10 fp16 steps) as max abs diff.
"""
import os
from pathlib import Path

import numpy as np
import pytest

from fusegrad.backends.ane import kernels as K
from fusegrad.backends.ane.mil import format_program
from fusegrad.backends.ane.sim import AneSim

TOL = 5e-3
GOLDEN = Path(__file__).parent / "golden"


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def cf(a):
    """(C, S) -> channel-first (1, C, 1, S)."""
    return a[None, :, None, :].astype(np.float32)


def check(name, got, ref):
    diff = float(np.abs(got - ref).max())
    bound = TOL * float(np.abs(ref).max())
    print(f"{name}: max abs diff {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound, f"{name}: max abs diff {diff} > {bound}"


def run(kernel, x):
    program, weights = kernel
    return AneSim().run(program, weights, {"x": x})["y"][0, :, 0, :]


# ---- fp32 references written here, independent of the kernels ----------------------------------
def rmsnorm(x, g, eps=1e-5):  # x (D, S)
    return x / np.sqrt((x * x).mean(axis=0, keepdims=True) + eps) * g[:, None]


def rope(x, n_heads):  # x (H*hd, S), llama2.c pairs (2i, 2i+1)
    hd, s = x.shape[0] // n_heads, x.shape[1]
    out = x.copy()
    for h in range(n_heads):
        for i in range(0, hd, 2):
            freq = 1.0 / 10000.0 ** (i / hd)
            ang = freq * np.arange(s)
            a, b = x[h * hd + i], x[h * hd + i + 1]
            out[h * hd + i] = a * np.cos(ang) - b * np.sin(ang)
            out[h * hd + i + 1] = a * np.sin(ang) + b * np.cos(ang)
    return out


def attention(q, k, v, n_heads, n_kv):  # (D, S), (KV, S) -> (D, S), causal
    hd, s = q.shape[0] // n_heads, q.shape[1]
    out = np.zeros_like(q)
    for h in range(n_heads):
        kvh = h // (n_heads // n_kv)
        qh, kh, vh = q[h * hd:(h + 1) * hd], k[kvh * hd:(kvh + 1) * hd], v[kvh * hd:(kvh + 1) * hd]
        scores = qh.T @ kh / np.sqrt(hd)
        scores[np.triu_indices(s, 1)] = -np.inf
        p = np.exp(scores - scores.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[h * hd:(h + 1) * hd] = vh @ p.T
    return out


def silu(x):
    return x / (1 + np.exp(-x))


# ---- backward dx --------------------------------------------------------------------------------
@pytest.mark.parametrize("dim, hidden, seq", [(768, 2048, 64), (64, 96, 16)])
def test_ffn_w13_backward_dx_seed_case(dim, hidden, seq):
    # the seed's data: W ~ U(-1, 1)/sqrt(HIDDEN), dh1 = 0.01 sin(0.007 i), dh3 = 0.01 cos(0.011 i), i over (S, H)
    rng = np.random.default_rng(42)
    w1, w3 = ((rng.random((hidden, dim)) * 2 - 1) / np.sqrt(hidden)).astype(np.float32), \
        ((rng.random((hidden, dim)) * 2 - 1) / np.sqrt(hidden)).astype(np.float32)
    i = np.arange(seq * hidden).reshape(seq, hidden)
    dh1, dh3 = (0.01 * np.sin(0.007 * i)).T.astype(np.float32), (0.01 * np.cos(0.011 * i)).T.astype(np.float32)
    ref = w1.T @ dh1 + w3.T @ dh3
    x = cf(np.concatenate([dh1, dh3]))
    check(f"ffn_w13_backward_dx {dim}x{hidden}x{seq}", run(K.ffn_w13_backward_dx(w1, w3, seq), x), ref)
    packed = K.pack_dynamic(np.concatenate([dh1, dh3]), np.concatenate([w1, w3]))
    check("ffn_w13_backward_dx_dynamic", run(K.ffn_w13_backward_dx_dynamic(dim, hidden, seq), packed), ref)


def test_qkv_backward_dx():
    rng = np.random.default_rng(1)
    dim, kv, seq = 64, 32, 16
    wq, wk, wv = rand(rng, dim, dim, scale=0.1), rand(rng, kv, dim, scale=0.1), rand(rng, kv, dim, scale=0.1)
    dq, dk, dv = rand(rng, dim, seq), rand(rng, kv, seq), rand(rng, kv, seq)
    ref = wq.T @ dq + wk.T @ dk + wv.T @ dv
    act = np.concatenate([dq, dk, dv])
    check("qkv_backward_dx", run(K.qkv_backward_dx(wq, wk, wv, seq), cf(act)), ref)
    packed = K.pack_dynamic(act, np.concatenate([wq, wk, wv]))
    check("qkv_backward_dx_dynamic", run(K.qkv_backward_dx_dynamic(dim, kv, seq), packed), ref)


# ---- forward ------------------------------------------------------------------------------------
def test_ffn_forward():
    rng = np.random.default_rng(2)
    dim, hidden, seq = 64, 160, 16
    w1, w3, w2 = rand(rng, hidden, dim, scale=0.12), rand(rng, hidden, dim, scale=0.12), rand(rng, dim, hidden, scale=0.08)
    x = rand(rng, dim, seq)
    ref = w2 @ (silu(w1 @ x) * (w3 @ x))
    check("ffn_forward", run(K.ffn_forward(w1, w2, w3, seq), cf(x)), ref)
    packed = K.pack_dynamic(x, w1.T, w3.T, w2)
    check("ffn_forward_dynamic", run(K.ffn_forward_dynamic(dim, hidden, seq), packed), ref)


@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2)])
def test_attention_forward(n_heads, n_kv):
    rng = np.random.default_rng(3)
    dim, seq = 64, 16
    kv = dim // n_heads * n_kv
    wq, wk, wv, wo = (rand(rng, o, dim, scale=0.12) for o in (dim, kv, kv, dim))
    g = (1 + 0.1 * rng.standard_normal(dim)).astype(np.float32)
    x = rand(rng, dim, seq, scale=3.0)
    xn = rmsnorm(x, g)
    ref = wo @ attention(rope(wq @ xn, n_heads), rope(wk @ xn, n_kv), wv @ xn, n_heads, n_kv)
    check(f"attention_forward H{n_heads} KV{n_kv}",
          run(K.attention_forward(wq, wk, wv, wo, g, n_heads, n_kv, seq), cf(x)), ref)
    packed = K.pack_dynamic(x, (wq * g).T, (wk * g).T, (wv * g).T, wo)
    check("attention_forward_dynamic", run(K.attention_forward_dynamic(dim, n_heads, n_kv, seq), packed), ref)


@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2)])
def test_sdpa_backward_matches_torch_autograd(n_heads, n_kv):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    dim, seq = 64, 16
    hd, kv = dim // n_heads, dim // n_heads * n_kv
    q, k, v, dout = rand(rng, dim, seq), rand(rng, kv, seq), rand(rng, kv, seq), rand(rng, dim, seq)
    tq, tk, tv = (torch.tensor(a.T.reshape(seq, -1, hd).transpose(1, 0, 2).copy(), requires_grad=True)
                  for a in (q, k, v))  # (heads, S, hd)
    rep = n_heads // n_kv
    out = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(rep, 0), tv.repeat_interleave(rep, 0), is_causal=True)
    out.backward(torch.tensor(dout.T.reshape(seq, n_heads, hd).transpose(1, 0, 2).copy()))
    ref = np.concatenate([t.grad.numpy().transpose(0, 2, 1).reshape(-1, seq) for t in (tq, tk, tv)])
    got = run(K.sdpa_backward(dim, n_heads, n_kv, seq), cf(np.concatenate([q, k, v, dout])))
    check(f"sdpa_backward H{n_heads} KV{n_kv}", got, ref)


def test_sdpa_backward_chains_into_qkv_backward_dx():
    dim, kv, seq = 32, 16, 8
    program, _ = K.sdpa_backward(dim, 4, 2, seq)
    chained, _ = K.qkv_backward_dx(*(np.ones((o, dim), np.float32) for o in (dim, kv, kv)), seq)
    assert program.output_vars[0].type.shape == chained.inputs[0].type.shape


# ---- golden MIL text ----------------------------------------------------------------------------
def golden_kernels():
    rng = np.random.default_rng(0)
    d, h, kv, s = 8, 16, 4, 4

    def w(out, inp):
        return rand(rng, out, inp)

    return {
        "ffn_w13_backward_dx": K.ffn_w13_backward_dx(w(h, d), w(h, d), s),
        "ffn_w13_backward_dx_dynamic": K.ffn_w13_backward_dx_dynamic(d, h, s),
        "qkv_backward_dx": K.qkv_backward_dx(w(d, d), w(kv, d), w(kv, d), s),
        "qkv_backward_dx_dynamic": K.qkv_backward_dx_dynamic(d, kv, s),
        "ffn_forward": K.ffn_forward(w(h, d), w(d, h), w(h, d), s),
        "ffn_forward_dynamic": K.ffn_forward_dynamic(d, h, s),
        "attention_forward": K.attention_forward(w(d, d), w(kv, d), w(kv, d), w(d, d), np.ones(d), 2, 1, s),
        "attention_forward_dynamic": K.attention_forward_dynamic(d, 2, 1, s),
        "sdpa_backward": K.sdpa_backward(d, 2, 1, s),
    }


@pytest.mark.parametrize("name", list(golden_kernels()))
def test_golden_text(name):
    text = format_program(golden_kernels()[name][0])
    path = GOLDEN / f"{name}.mil"
    if os.environ.get("FUSEGRAD_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs; rerun with FUSEGRAD_UPDATE_GOLDEN=1 if intended"
