"""The reference kernels (fusegrad.backends.base.Backend's bodies, on numpy arrays) themselves: properties
every faster backend must share.

RoPE as complex rotation, attention independent of its block size and of GQA folding, the chunked
classifier loss independent of the chunk, flags that skip work, dtypes kept, no overflow warnings.
"""
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusegrad.backends import base
from fusegrad.backends.numpy_backend import NumpyBackend

ref = NumpyBackend()  # the plain numpy backend runs Backend's reference bodies


def qkv_case(rng, B, T, H, Hkv, D, dtype=np.float64):
    cos, sin = base.rope_tables(T, D, 10000.0, dtype)
    return rng.normal(size=(B, T, (H + 2 * Hkv) * D)).astype(dtype), cos, sin


# -- RoPE -----------------------------------------------------------------------------------------------
def test_rope_tables_and_apply_are_complex_rotation(rng):
    T, H, D, theta = 9, 3, 8, 500.0
    cos, sin = base.rope_tables(T, D, theta, np.float64)
    angles = np.arange(T)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None, :]
    np.testing.assert_allclose(cos + 1j * sin, np.exp(1j * angles), rtol=1e-13, atol=1e-15)
    x = rng.normal(size=(2, T, H, D))
    y = ref.rope_apply(x, cos, sin)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angles)[:, None, :]  # pair (x[2i], x[2i+1]) as complex
    np.testing.assert_allclose(y[..., 0::2], z.real, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(y[..., 1::2], z.imag, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ref.rope_apply(y, cos, sin, inverse=True), x, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])  # position 0 is not rotated


# -- attention ------------------------------------------------------------------------------------------
@given(T=st.integers(1, 40), block=st.integers(1, 45), seed=st.integers(0, 2 ** 16))
def test_attention_independent_of_block_size(T, block, seed):
    rng = np.random.default_rng(seed)
    qkv, cos, sin = qkv_case(rng, 2, T, 4, 2, 4)
    dy = rng.normal(size=(2, T, 16))
    y_ref, saved_ref = ref.attention_forward(qkv, 4, 2, cos, sin, block=T)  # one block: plain attention
    y, saved = ref.attention_forward(qkv, 4, 2, cos, sin, block=block)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ref.attention_backward(dy, saved, 4, 2),
                               ref.attention_backward(dy, saved_ref, 4, 2), rtol=1e-11, atol=1e-12)


def test_attention_skips_the_masked_triangle(rng):
    """Query block [lo, hi) keeps probabilities against keys [0, hi) only, and its rows' logsumexp."""
    qkv, cos, sin = qkv_case(rng, 1, 300, 2, 1, 4)
    saved = ref.attention_forward(qkv, 2, 1, cos, sin)[1]
    his = [min(lo + base.ATTENTION_BLOCK, 300) for lo in range(0, 300, base.ATTENTION_BLOCK)]
    assert [p.shape[-1] for p in saved.probs] == his == [128, 256, 300]
    np.testing.assert_allclose(np.concatenate([p.sum(-1) for p in saved.probs], -1), 1.0, rtol=1e-12)
    assert [lse.shape for lse in saved.lse] == [(1, 1, 2 * 128, 1), (1, 1, 2 * 128, 1), (1, 1, 2 * 44, 1)]


def test_attention_past_the_budget_keeps_no_probabilities(rng, monkeypatch):
    """Past ATTENTION_PROBS_BUDGET only q, k, v and the rows' logsumexp stay; the backward recomputes the
    probabilities from them and gets the same gradient."""
    qkv, cos, sin = qkv_case(rng, 2, 40, 4, 2, 4)
    dy = rng.normal(size=(2, 40, 16))
    y_kept, saved_kept = ref.attention_forward(qkv, 4, 2, cos, sin, block=16)
    monkeypatch.setattr(base, "ATTENTION_PROBS_BUDGET", 0)
    y, saved = ref.attention_forward(qkv, 4, 2, cos, sin, block=16)
    assert saved.probs is None and saved_kept.probs is not None
    np.testing.assert_array_equal(y, y_kept)
    np.testing.assert_allclose(ref.attention_backward(dy, saved, 4, 2), ref.attention_backward(dy, saved_kept, 4, 2),
                               rtol=1e-12, atol=1e-13)
    saved.lse = None  # nothing kept at all (torch's fused forward): the backward takes max and sum again
    np.testing.assert_allclose(ref.attention_backward(dy, saved, 4, 2), ref.attention_backward(dy, saved_kept, 4, 2),
                               rtol=1e-12, atol=1e-13)


@given(G=st.sampled_from([1, 2, 4]), Hkv=st.integers(1, 2), T=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_gqa_equals_mha_with_repeated_kv_heads(G, Hkv, T, seed):
    """n_kv_heads < n_heads is exactly MHA whose k, v heads are copied G times (query head h -> kv head h // G)."""
    rng = np.random.default_rng(seed)
    H, D = G * Hkv, 4
    qkv, cos, sin = qkv_case(rng, 1, T, H, Hkv, D)
    q, k, v = np.split(qkv, [H * D, (H + Hkv) * D], axis=-1)
    rep = lambda a: np.repeat(a.reshape(1, T, Hkv, D), G, axis=2).reshape(1, T, H * D)  # noqa: E731
    mha = np.concatenate([q, rep(k), rep(v)], -1)
    y_gqa, saved_gqa = ref.attention_forward(qkv, H, Hkv, cos, sin)
    y_mha, saved_mha = ref.attention_forward(mha, H, H, cos, sin)
    np.testing.assert_allclose(y_gqa, y_mha, rtol=1e-12, atol=1e-13)
    dy = rng.normal(size=y_gqa.shape)
    d_gqa = ref.attention_backward(dy, saved_gqa, H, Hkv)
    d_mha = ref.attention_backward(dy, saved_mha, H, H)
    dq, dk, dv = np.split(d_mha, [H * D, 2 * H * D], axis=-1)
    fold = lambda a: a.reshape(1, T, Hkv, G, D).sum(3).reshape(1, T, Hkv * D)  # noqa: E731 (copies' grads add)
    np.testing.assert_allclose(d_gqa, np.concatenate([dq, fold(dk), fold(dv)], -1), rtol=1e-11, atol=1e-12)


# -- RMSNorm, SwiGLU, embedding ---------------------------------------------------------------------------
def test_rmsnorm_flags_and_dtype(rng):
    x, w = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=8).astype(np.float32)
    y, rstd = ref.rmsnorm_forward(x, w, 1e-5)
    assert y.dtype == rstd.dtype == np.float32 and rstd.shape == (5, 1)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(y, x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-5)
    dy = rng.normal(size=(5, 8)).astype(np.float32)
    dx, dw = ref.rmsnorm_backward(dy, x, w, rstd, need_dx=False, need_dw=True)
    assert dx is None and dw.shape == (8,) and dw.dtype == np.float32
    dx, dw = ref.rmsnorm_backward(dy, x, w, rstd, need_dx=True, need_dw=False)
    assert dw is None and dx.shape == (5, 8) and dx.dtype == np.float32
    assert np.abs(dx).max() > 0


def test_rmsnorm_backward_orthogonal_to_x(rng):
    """With eps = 0 the norm is scale invariant, y(a x) = y(x), so each row of dx is orthogonal to x."""
    x, w, dy = rng.normal(size=(4, 6)), rng.normal(size=6), rng.normal(size=(4, 6))
    _, rstd = ref.rmsnorm_forward(x, w, 0.0)
    dx, _ = ref.rmsnorm_backward(dy, x, w, rstd)
    np.testing.assert_allclose((dx * x).sum(-1), 0.0, atol=1e-12)


def test_swiglu_extreme_inputs_no_overflow_warning():
    h13 = np.array([[-1e4, -100.0, 0.0, 100.0, 2.0, 3.0, 5.0, 7.0]], np.float32)  # [h1 | h3], Hd = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ref.swiglu_forward(h13)
        d = ref.swiglu_backward(np.ones((1, 4), np.float32), h13)
    assert y.dtype == d.dtype == np.float32 and np.all(np.isfinite(y)) and np.all(np.isfinite(d))
    np.testing.assert_allclose(y[0], [0.0, 0.0, 0.0, 700.0], atol=1e-30)
    np.testing.assert_allclose(d[0], [0.0, 0.0, 0.5 * 5.0, 7.0, 0.0, 0.0, 0.0, 100.0], atol=1e-30)


def test_embedding_backward_is_onehot_transpose_times_grad(rng):
    tokens = np.array([3, 0, 3, 3, 5])
    g = rng.normal(size=(5, 4))
    onehot = np.eye(7)[tokens]  # (N, V)
    np.testing.assert_allclose(ref.embedding_backward(g, tokens, 7), onehot.T @ g, rtol=1e-14)


# -- classifier + cross-entropy -----------------------------------------------------------------------------
def dense_ce(h, w, t):
    """float64 log-softmax + NLL on the materialised logits, and its grads."""
    logits = h.astype(np.float64) @ w.astype(np.float64).T
    m = logits.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(-1))
    N = len(t)
    p = np.exp(logits - lse[:, None])
    p[np.arange(N), t] -= 1.0
    p /= N
    return float(np.mean(lse - logits[np.arange(N), t])), p @ w, p.T @ h


@given(N=st.integers(1, 30), chunk=st.integers(1, 35), seed=st.integers(0, 2 ** 16))
def test_classifier_ce_equals_dense_for_any_chunk(N, chunk, seed):
    rng = np.random.default_rng(seed)
    h, w, t = rng.normal(size=(N, 6)), rng.normal(size=(9, 6)), rng.integers(0, 9, N)
    loss, dh, dw = ref.classifier_cross_entropy(h, w, t, chunk)
    loss_ref, dh_ref, dw_ref = dense_ce(h, w, t)
    assert abs(loss - loss_ref) < 1e-12 * max(1.0, loss_ref)
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-10, atol=1e-13)


def test_classifier_ce_flags_dtype_and_large_logits(rng):
    h = (rng.normal(size=(10, 4)) * 300).astype(np.float32)  # logits ~1e3: naive exp would overflow
    w = rng.normal(size=(7, 4)).astype(np.float32)
    t = rng.integers(0, 7, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, dh, dw = ref.classifier_cross_entropy(h, w, t, 3)
    loss_ref, dh_ref, dw_ref = dense_ce(h, w, t)
    assert np.isfinite(loss) and abs(loss - loss_ref) <= 1e-5 * loss_ref
    assert dh.dtype == dw.dtype == np.float32
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-4, atol=1e-5)
    assert ref.classifier_cross_entropy(h, w, t, 3, need_dh=False, need_dw=False)[1:] == (None, None)
    only_dw = ref.classifier_cross_entropy(h, w, t, 4, need_dh=False)
    assert only_dw[1] is None and np.allclose(only_dw[2], dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", [ref.rmsnorm_forward, ref.swiglu_forward])
def test_kernels_do_not_modify_inputs(fn, rng):
    x = rng.normal(size=(3, 8)).astype(np.float32)
    before = x.copy()
    fn(x, np.ones(8, np.float32), 1e-5) if fn == ref.rmsnorm_forward else fn(x)
    np.testing.assert_array_equal(x, before)
