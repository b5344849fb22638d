"""The numba kernels (JitBackend) against the reference kernels (Backend's bodies, run by NumpyBackend)."""
import numpy as np
import pytest

pytest.importorskip("numba")

from fusegrad.backends import base, cpu_jit, cpu_jit_attention, get_backend, jit_common, openblas  # noqa: E402
from fusegrad.backends import numpy_backend_class  # noqa: E402
from fusegrad.backends.cpu_jit import JitBackend  # noqa: E402
from fusegrad.backends.numpy_backend import NumpyBackend  # noqa: E402
from fusegrad.core.errors import ShapeError  # noqa: E402

jit, reference = JitBackend(), NumpyBackend()
reference_adamw = reference.adamw_update

F32 = dict(rtol=2e-5, atol=2e-6)


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_fast_exp_accuracy_and_edges():
    from numba import njit

    @njit
    def apply(x):
        out = np.empty_like(x)
        for i in range(x.size):
            out[i] = jit_common.fast_exp(x[i])
        return out

    x = np.linspace(-87.0, 88.0, 100_003).astype(np.float32)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(apply(x) - want) / want) < 1e-6
    edges = apply(np.float32([-1000.0, -88.0, 89.0, np.inf, -np.inf, np.nan, 0.0]))
    assert edges[:2].tolist() == [0.0, 0.0] and edges[2:4].tolist() == [np.inf, np.inf]
    assert edges[4] == 0.0 and np.isnan(edges[5]) and edges[6] == 1.0


def test_exp_shifted_is_fast_exp_bit_for_bit_where_it_applies():
    from numba import njit

    @njit
    def both(x):
        a, b = np.empty_like(x), np.empty_like(x)
        for i in range(x.size):
            a[i], b[i] = jit_common.fast_exp(x[i]), jit_common.exp_shifted(x[i])
        return a, b

    x = np.concatenate([np.linspace(-100.0, 88.0, 200_003), [-np.inf, -87.33, -87.0, 0.0, 88.0]]).astype(np.float32)
    fast, shifted = both(x)
    assert np.array_equal(fast.view(np.int32), shifted.view(np.int32))


def test_softmaxes_of_rows_with_a_non_finite_max_keep_fast_exps_edges(rng):
    # the classifier's and attention's softmaxes take exp_shifted only for rows whose max is finite
    h, w = f32(rng, 3, 8), f32(rng, 10, 8)
    w[4] = np.inf  # +inf logits in every row
    loss, dh, _ = jit.classifier_cross_entropy(h, w, np.arange(3))
    want = reference.classifier_cross_entropy(h, w, np.arange(3))
    assert np.isnan(loss) == np.isnan(want[0])
    qkv = f32(rng, 1, 4, 3 * 8)
    qkv[0, 2, 0] = np.inf
    cos, sin = base.rope_tables(4, 4, 10000.0)
    got = jit.attention_forward(qkv, 2, 2, cos, sin)[0]
    ref = reference.attention_forward(qkv, 2, 2, cos, sin)[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))


@pytest.mark.parametrize("n", [1, 7, 8, 33, 256])
def test_row_max_matches_numpy_on_signed_and_infinite_values(rng, n):
    row = (rng.standard_normal(n) * 1e3).astype(np.float32)
    assert jit_common.row_max(row, n) == row.max()
    assert jit_common.row_max(-np.abs(row), n) == (-np.abs(row)).max()  # all negative: the flipped keys
    assert jit_common.row_max(row, 1) == row[0]
    row[n // 2] = np.inf
    assert jit_common.row_max(row, n) == np.inf
    assert jit_common.row_max(np.full(n, -np.inf, np.float32), n) == -np.inf
    row[n // 2] = np.nan
    assert np.isnan(jit_common.row_max(row, n))  # a NaN score must reach the loss


def test_nan_stays_visible(rng):
    h, w = f32(rng, 4, 8), f32(rng, 10, 8)
    h[1, 3] = np.nan
    assert np.isnan(jit.classifier_cross_entropy(h, w, np.arange(4))[0])
    assert np.isnan(jit.swiglu_forward(np.float32([[np.nan, 1.0]]))).all()


@pytest.mark.parametrize("n, c", [(1, 1), (7, 13), (64, 288), (33, 5)])
def test_rmsnorm_matches_reference(rng, n, c):
    x, w, dy = f32(rng, n, c), f32(rng, c), f32(rng, n, c)
    y, rstd = jit.rmsnorm_forward(x, w, 1e-5)
    y_ref, rstd_ref = reference.rmsnorm_forward(x, w, 1e-5)
    np.testing.assert_allclose(y, y_ref, **F32)
    np.testing.assert_allclose(rstd, rstd_ref, **F32)
    dx, dw = jit.rmsnorm_backward(dy, x, w, rstd)
    dx_ref, dw_ref = reference.rmsnorm_backward(dy, x, w, rstd_ref)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-5)
    assert y.dtype == dx.dtype == dw.dtype == np.float32
    # only what is asked for
    assert jit.rmsnorm_backward(dy, x, w, rstd, need_dx=False)[0] is None
    dx_only, dw_none = jit.rmsnorm_backward(dy, x, w, rstd, need_dw=False)
    assert dw_none is None
    np.testing.assert_allclose(dx_only, dx_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 2), (5, 14), (2, 3, 46), (64, 1536)])
def test_swiglu_matches_reference(rng, shape):
    h13 = f32(rng, *shape, scale=3.0)
    out = jit.swiglu_forward(h13)
    np.testing.assert_allclose(out, reference.swiglu_forward(h13), **F32)
    g = f32(rng, *out.shape)
    np.testing.assert_allclose(jit.swiglu_backward(g, h13), reference.swiglu_backward(g, h13), rtol=1e-4,
                               atol=1e-5)


def test_swiglu_extreme_inputs_stay_finite():
    h13 = np.float32([[-200.0, 200.0, 1.0, 1.0]])
    out = jit.swiglu_forward(h13)
    np.testing.assert_allclose(out, reference.swiglu_forward(h13))
    assert np.isfinite(jit.swiglu_backward(np.ones_like(out), h13)).all()


@pytest.mark.parametrize("n, c, vocab", [(1, 3, 2), (37, 5, 4), (300, 288, 1000)])
def test_embedding_backward_matches_reference(rng, n, c, vocab):
    g = f32(rng, n, c)
    tokens = rng.integers(0, vocab, n)
    tokens[: n // 2] = tokens[0]  # many repeats must accumulate
    np.testing.assert_allclose(jit.embedding_backward(g, tokens, vocab),
                               reference.embedding_backward(g, tokens, vocab), rtol=1e-5, atol=1e-5)


def test_embedding_backward_into_adds_to_what_dw_holds(rng):
    g, tokens = f32(rng, 40, 6), rng.integers(0, 9, 40)
    dw = f32(rng, 9, 6)
    expected = dw + reference.embedding_backward(g, tokens, 9)
    jit.embedding_backward_into(dw, g, tokens)
    np.testing.assert_allclose(dw, expected, rtol=1e-5, atol=1e-5)
    wide = f32(rng, 9, 12)  # a column slice is not C-contiguous: the reference scatter, still in place
    expected = wide[:, ::2] + reference.embedding_backward(g, tokens, 9)
    jit.embedding_backward_into(wide[:, ::2], g, tokens)
    np.testing.assert_allclose(wide[:, ::2], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, c, vocab, chunk", [(1, 4, 3, 256), (37, 8, 50, 16), (200, 32, 513, 64), (64, 16, 40, 64)])
def test_classifier_cross_entropy_matches_reference(rng, n, c, vocab, chunk):
    h, w = f32(rng, n, c), f32(rng, vocab, c, scale=0.5)
    targets = rng.integers(0, vocab, n)
    loss, dh, dw = jit.classifier_cross_entropy(h, w, targets, chunk)
    loss_ref, dh_ref, dw_ref = reference.classifier_cross_entropy(h, w, targets, chunk)
    # an independent float64 oracle for the loss
    logits = h.astype(np.float64) @ w.T.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    assert loss == pytest.approx(np.mean(lse - logits[np.arange(n), targets]), rel=1e-5)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(dh, dh_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-6)
    loss2, dh2, dw2 = jit.classifier_cross_entropy(h, w, targets, chunk, need_dh=False, need_dw=False)
    assert loss2 == pytest.approx(loss_ref, rel=1e-5) and dh2 is None and dw2 is None


def _ce_float64(h, w, targets):
    """Mean cross-entropy of h w^T and its dh, in float64 (an oracle for the frozen-weight path)."""
    logits = h.astype(np.float64) @ w.T.astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    lse = np.log(p.sum(1)) + logits.max(1)
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(targets)), targets] -= 1.0
    return np.mean(lse - logits[np.arange(len(targets)), targets]), p @ w.astype(np.float64) / len(targets)


@pytest.mark.parametrize("n, c, vocab, chunk, block", [(1, 4, 3, 256, 1024), (37, 8, 50, 16, 16),
                                                       (200, 32, 513, 64, 64), (64, 16, 40, 64, 7)])
def test_frozen_classifier_in_vocab_blocks_matches_float64(rng, monkeypatch, n, c, vocab, chunk, block):
    monkeypatch.setattr(cpu_jit, "VOCAB_BLOCK", block)
    h, w = f32(rng, n, c), f32(rng, vocab, c, scale=0.5)
    w[vocab // 2:] *= 40.0  # logits of the later blocks pass the first block's max by far more than 60
    targets = rng.integers(0, vocab, n)
    loss_want, dh_want = _ce_float64(h, w, targets)
    loss, dh, dw = jit.classifier_cross_entropy(h, w, targets, chunk, need_dw=False)
    assert dw is None and loss == pytest.approx(loss_want, rel=1e-5, abs=1e-6)
    scale = np.abs(dh_want).max()  # logits up to ~100 in float32: the full path's error is ~1e-5 of it too
    np.testing.assert_allclose(dh, dh_want, rtol=1e-4, atol=3e-5 * scale)
    np.testing.assert_allclose(dh, jit.classifier_cross_entropy(h, w, targets, chunk)[1], rtol=1e-4, atol=1e-5 * scale)
    loss2, dh2, _ = jit.classifier_cross_entropy(h, w, targets, chunk, need_dh=False, need_dw=False)
    assert dh2 is None and loss2 == pytest.approx(loss_want, rel=1e-5, abs=1e-6)


def test_frozen_classifier_holds_no_rows_by_vocab_buffer(rng):
    import tracemalloc
    h, w, targets = f32(rng, 512, 16), f32(rng, 8192, 16), rng.integers(0, 8192, 512)
    jit.classifier_cross_entropy(h, w, targets, 512, need_dw=False)  # compiled before tracing
    tracemalloc.start()
    try:
        jit.classifier_cross_entropy(h, w, targets, 512, need_dw=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 8192 * 4 / 2, peak  # one (512, VOCAB_BLOCK) block, not the (512, 8192) logits (16 MB)
    tracemalloc.start()
    try:  # the full path (with dW) does hold them: the check above can fail
        jit.classifier_cross_entropy(h, w, targets, 512)
        assert tracemalloc.get_traced_memory()[1] >= 512 * 8192 * 4
    finally:
        tracemalloc.stop()


def test_frozen_classifier_non_finite_logits(rng, monkeypatch):
    monkeypatch.setattr(cpu_jit, "VOCAB_BLOCK", 8)
    h, w = np.abs(f32(rng, 6, 4)) + 0.1, f32(rng, 30, 4)  # h > 0: a row of w at -inf gives -inf logits
    targets = np.array([9, 12, 29, 8, 20, 15])
    finite = reference.classifier_cross_entropy(h, w[8:], targets - 8, 4, need_dh=False, need_dw=False)[0]
    w[:8] = -np.inf  # the whole first block at -inf: adds nothing, as exp(-inf) = 0
    loss = jit.classifier_cross_entropy(h, w, targets, 4, need_dh=False, need_dw=False)[0]
    assert loss == pytest.approx(finite, rel=1e-5)
    w[17, 0] = np.nan  # a NaN logit in a later block stays visible in the loss
    assert np.isnan(jit.classifier_cross_entropy(h, w, targets, 4, need_dh=False, need_dw=False)[0])


@pytest.mark.parametrize("B, T, H, Hkv, D, block", [(1, 1, 1, 1, 2, 128), (2, 7, 4, 2, 6, 3), (1, 33, 6, 6, 8, 16),
                                                    (2, 20, 6, 1, 4, 128), (1, 9, 4, 4, 10, 4)])
def test_attention_matches_reference(rng, B, T, H, Hkv, D, block):
    qkv = f32(rng, B, T, (H + 2 * Hkv) * D)
    cos, sin = base.rope_tables(T + 5, D, 10000.0)  # longer tables than T, like the model's
    y, saved = cpu_jit_attention.attention_forward(qkv, H, Hkv, cos, sin, block)
    y_ref, saved_ref = reference.attention_forward(qkv, H, Hkv, cos, sin, block)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    dy = f32(rng, *y.shape)
    np.testing.assert_allclose(cpu_jit_attention.attention_backward(dy, saved, H, Hkv),
                               reference.attention_backward(dy, saved_ref, H, Hkv), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T, rows", [(300, 64), (600, 128)])
def test_attention_default_blocks_follow_the_sequence_length(rng, T, rows):
    """The backend's own block choice (64 query rows up to T = 512, then 128) gives the reference's result."""
    qkv = f32(rng, 1, T, 3 * 2 * 8)
    cos, sin = base.rope_tables(T, 8, 10000.0)
    y, saved = jit.attention_forward(qkv, 2, 2, cos, sin)
    assert saved.block == rows
    assert [lse.shape[-1] for lse in saved.lse] == [hi - lo for lo, hi in base.blocks(T, rows)]
    y_ref, saved_ref = reference.attention_forward(qkv, 2, 2, cos, sin)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    dy = f32(rng, *y.shape)
    np.testing.assert_allclose(jit.attention_backward(dy, saved, 2, 2),
                               reference.attention_backward(dy, saved_ref, 2, 2), rtol=1e-4, atol=1e-5)


def test_attention_probs_are_causal_and_normalised(rng, monkeypatch):
    """Kept, and recomputed from the rows' logsumexp past the budget: the same causal, normalised rows."""
    qkv, dy = f32(rng, 1, 10, 3 * 4), f32(rng, 1, 10, 4)
    cos, sin = base.rope_tables(10, 4, 10000.0)
    _, saved = cpu_jit_attention.attention_forward(qkv, 1, 1, cos, sin, block=4)
    for (lo, hi), p, lse in zip(base.blocks(10, 4), saved.probs, saved.lse):
        p = p.reshape(hi - lo, hi)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
        assert not np.triu(p, k=lo + 1).any()  # no weight on keys after the query's own position
        q, k = saved.q.reshape(10, 4), saved.k.reshape(10, 4)
        # log p_0 = scaled score against key 0 - lse: lse is the row's logsumexp (scale 1/sqrt(4))
        np.testing.assert_allclose(np.log(p[:, 0]) + lse.reshape(-1), (q[lo:hi] @ k[0]) * 0.5, rtol=1e-4, atol=1e-4)
    dqkv = cpu_jit_attention.attention_backward(dy, saved, 1, 1)
    monkeypatch.setattr(base, "ATTENTION_PROBS_BUDGET", 0)
    _, recomputed = cpu_jit_attention.attention_forward(qkv, 1, 1, cos, sin, block=4)
    assert recomputed.probs is None
    np.testing.assert_allclose(cpu_jit_attention.attention_backward(dy, recomputed, 1, 1), dqkv, rtol=1e-5, atol=1e-6)


def test_attention_large_scores_and_nan_match_reference(rng):
    # scores ~1e3 overflow exp unless the row max (16 lanes + a tail at T = 37) is subtracted; a NaN in one
    # position's query must poison the same outputs as in the reference
    qkv = f32(rng, 2, 37, 3 * 2 * 16) * 30
    cos, sin = base.rope_tables(37, 16, 10000.0)
    y, _ = cpu_jit_attention.attention_forward(qkv, 2, 2, cos, sin, 16)
    y_ref, _ = reference.attention_forward(qkv, 2, 2, cos, sin, 16)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-3)
    qkv[1, 20, 3] = np.nan
    y, _ = cpu_jit_attention.attention_forward(qkv, 2, 2, cos, sin, 16)
    y_ref, _ = reference.attention_forward(qkv, 2, 2, cos, sin, 16)
    assert np.isnan(y).any() and np.array_equal(np.isnan(y), np.isnan(y_ref))


@pytest.mark.parametrize("shape", [(1,), (7, 3), (288,), (65, 129)])
@pytest.mark.parametrize("wd, step, clip", [(0.0, 1, 1.0), (0.1, 7, 1.0), (0.1, 3, 0.25)])
def test_adamw_matches_reference(rng, shape, wd, step, clip):
    p, g = f32(rng, *shape), f32(rng, *shape)
    m, v = f32(rng, *shape, scale=0.1), np.abs(f32(rng, *shape, scale=0.1))
    ref = [a.copy() for a in (p, m, v)]
    g_before = g.copy()
    jit.adamw_update(p, g, m, v, 3e-3, 0.9, 0.95, 1e-8, wd, step, grad_scale=clip)
    reference_adamw(ref[0], g, ref[1], ref[2], 3e-3, 0.9, 0.95, 1e-8, wd, step, grad_scale=clip)
    assert np.array_equal(g, g_before)  # the clip's factor is applied on the fly, the grad is left as it was
    for got, want in zip((p, m, v), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_adamw_non_contiguous_or_float64_goes_to_the_reference_and_bad_shapes_raise(rng):
    for make in (lambda a: np.repeat(a, 2, axis=1)[:, ::2], lambda a: a.astype(np.float64)):
        p, g = make(f32(rng, 4, 4)), make(f32(rng, 4, 4))
        m, v = np.zeros_like(p), np.zeros_like(p)
        p_ref, m_ref, v_ref = p.copy(), m.copy(), v.copy()
        jit.adamw_update(p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
        reference.adamw_update(p_ref, g, m_ref, v_ref, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)
        np.testing.assert_array_equal(p, p_ref)
        np.testing.assert_array_equal(v, v_ref)
    p = f32(rng, 4, 4)
    with pytest.raises(ShapeError, match=r"adamw_update: arrays must all have p's shape \(4, 4\)"):
        jit.adamw_update(p, p.copy(), np.zeros((4, 8), np.float32), np.zeros_like(p), 1e-3, 0.9, 0.95, 1e-8, 0.0, 1)


def test_float64_goes_to_the_reference(rng):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal(4)
    y, _ = jit.rmsnorm_forward(x, w, 1e-5)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, reference.rmsnorm_forward(x, w, 1e-5)[0])


def test_backend_uses_jit_unless_disabled(monkeypatch):
    backend = get_backend("numpy")
    assert backend.rmsnorm_forward.__func__ is JitBackend.rmsnorm_forward
    assert backend.adamw_update.__func__ is JitBackend.adamw_update
    monkeypatch.setenv("FUSEGRAD_JIT", "0")  # read when "numpy" is first made (a new process)
    assert numpy_backend_class()().rmsnorm_forward.__func__ is base.Backend.rmsnorm_forward


def test_prewarm_loads_every_kernel(monkeypatch):
    assert jit.prewarm_kernels() >= 0.0
    assert get_backend("numpy").prewarm_kernels() > 0.0
    monkeypatch.setenv("FUSEGRAD_JIT", "0")
    assert numpy_backend_class()().prewarm_kernels() == 0.0
    for name, kernel in vars(JitBackend).items():  # every kernel the JIT overrides is one of the contract's
        assert not callable(kernel) or name.startswith("_") or hasattr(base.Backend, name)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc malloc setting")
def test_numpy_backend_keeps_freed_memory_so_big_arrays_do_not_page_fault_again():
    import resource

    from fusegrad.backends.numpy_backend import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc")
    faults = []
    for _ in range(3):  # a (V, C)-sized grad, made and freed as every training step does
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.ones((32000, 288), np.float32)
        del a
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    assert faults[-1] < 100, faults  # 36 MB fresh from the kernel would be ~9000 faults


@pytest.mark.parametrize("blas", [True, False])
def test_accumulate_gemm_adds_in_place(rng, monkeypatch, blas):
    if not blas:
        monkeypatch.setattr(openblas, "CBLAS_SGEMM", None)  # the scratch + add path
    elif openblas.CBLAS_SGEMM is None:
        pytest.skip("numpy's OpenBLAS is not reachable")
    dw, dlogits, h = f32(rng, 37, 5), f32(rng, 11, 37), f32(rng, 11, 5)
    want = dw.astype(np.float64) + 2 * dlogits.astype(np.float64).T @ h.astype(np.float64)
    scratch = cpu_jit.accumulate_gemm(dw, dlogits, h, True)
    cpu_jit.accumulate_gemm(dw, dlogits, h, True, scratch)
    np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("retain", [False, True])
def test_tied_embedding_grads_summed_in_place_stay_correct(rng, retain):
    # the engine adds the embedding's grad into the classifier's dW in place only when nothing else holds
    # dW; with retain_graph the op's closure still does, so the sum (and a second backward) must not alias it
    torch = pytest.importorskip("torch")
    import fusegrad as fg
    from fusegrad.ops.llama import classifier_cross_entropy, embedding

    w0, ids, targets = f32(rng, 50, 8), rng.integers(0, 50, 12), rng.integers(0, 50, 12)
    w = fg.tensor(w0, requires_grad=True)
    loss = classifier_cross_entropy(embedding(w, ids), w, targets, chunk=5)
    wt = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    torch.nn.functional.cross_entropy(wt[torch.tensor(ids)] @ wt.T, torch.tensor(targets)).backward()
    want = wt.grad.numpy()
    loss.backward(retain_graph=retain)
    np.testing.assert_allclose(w.grad, want, rtol=1e-4, atol=1e-6)
    if retain:
        w.grad *= 0.5  # in place, as clip_grad_norm does
        loss.backward()
        np.testing.assert_allclose(w.grad, 1.5 * want, rtol=1e-4, atol=1e-6)


def test_classifier_grads_stay_accurate_when_the_model_is_confident(rng):
    # near p_target = 1, dlogits at the target is a cancellation (p - 1): float32 grads against float64
    n, c, vocab = 64, 16, 300
    w = f32(rng, vocab, c)
    targets = rng.integers(0, vocab, n)
    h = 3.0 * w[targets]  # the target logit far above the rest: p_target ~ 0.99999
    logits = h.astype(np.float64) @ w.T.astype(np.float64)
    d = np.exp(logits - logits.max(1, keepdims=True))
    d /= d.sum(1, keepdims=True)
    assert np.median(d[np.arange(n), targets]) > 0.9999
    d[np.arange(n), targets] -= 1.0
    d /= n
    _, dh, dw = jit.classifier_cross_entropy(h, w, targets, chunk=16)
    np.testing.assert_allclose(dh, d @ w.astype(np.float64), rtol=0, atol=1e-7)
    # dW entries reach ~0.1: float32 sums of 64 products round at ~2e-7 there (any BLAS, the reference too)
    np.testing.assert_allclose(dw, d.T @ h.astype(np.float64), rtol=1e-5, atol=1e-7)


def test_accumulate_adds_in_place_and_falls_back_off_the_fast_path(rng):
    out, x = f32(rng, 7, 5), f32(rng, 7, 5)
    want = out.astype(np.float64) + x
    jit.accumulate(out, x)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    strided = f32(rng, 7, 10)[:, ::2]  # not contiguous: the reference's numpy add
    want = strided.astype(np.float64) + x
    jit.accumulate(strided, x)
    np.testing.assert_allclose(strided, want, rtol=1e-6)
    with pytest.raises(ShapeError, match="accumulate"):
        jit.accumulate(out, x[:3])


def test_full_width_vectors_on_avx512_only_and_never_over_the_users_choice():
    import os
    import subprocess
    import sys

    import llvmlite.binding as ll

    code = "import numba, fusegrad.backends.jit_common; print(numba.config.CPU_FEATURES)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CPU_")}

    def features(**extra):
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()

    if ll.get_host_cpu_features().get("avx512f"):
        assert features().endswith(",-prefer-256-bit") and "+avx512f" in features()
    else:
        assert features() == "None"
    assert "prefer-256-bit" not in features(NUMBA_CPU_NAME="haswell")
    assert features(NUMBA_CPU_FEATURES="+avx2,+fma") == "+avx2,+fma"


def test_a_trace_counts_the_gemms_inside_the_classifier_and_attention_as_gemm_time(rng):
    from fusegrad.core.trace import trace

    h, w = f32(rng, 6, 8), f32(rng, 10, 8)
    qkv = f32(rng, 1, 4, 3 * 8)
    cos, sin = base.rope_tables(4, 4, 10000.0)
    with trace() as t:
        jit.classifier_cross_entropy(h, w, np.arange(6), chunk=4)
        y, saved = jit.attention_forward(qkv, 2, 2, cos, sin)
        jit.attention_backward(y, saved, 2, 2)
    gemms = [(a["m"], a["k"], a["n"], a["batch"]) for _, cat, _, _, _, _, a in t.events if cat == "matmul"]
    ops = [a["op"] for _, cat, _, _, _, _, a in t.events if cat == "matmul"]
    assert ops == ["classifier"] * 6 + ["attention"] * 6
    # per chunk of 4 then 2 rows: logits h W^T, dh = E W, dW = E^T (s h)
    assert gemms[:6] == [(4, 8, 10, 1), (4, 10, 8, 1), (10, 4, 8, 1), (2, 8, 10, 1), (2, 10, 8, 1), (10, 2, 8, 1)]
    # attention, one block of 4 rows, 2 heads of 4: scores and P V, then dV, dP, dQ, dK
    assert gemms[6:] == [(4, 4, 4, 2)] * 6
    assert t.totals()["classifier_softmax"]["count"] == 2
