"""The torch backend on torch's CPU device: every kernel against the numpy reference, the whole model's
loss and grads, a few Trainer steps against the numpy loss curve, counted transfers, GEMM offload with
per-call fallback. The GPU paths differ only by the device string."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("array_api_compat")

import fusegrad as fg  # noqa: E402
from fusegrad.backends import base, gemm_offload, get_backend, use_backend  # noqa: E402
from fusegrad.backends.numpy_backend import NumpyBackend  # noqa: E402
from fusegrad.core.errors import BackendError  # noqa: E402
from fusegrad.core.trace import TRACER  # noqa: E402

reference = NumpyBackend()  # Backend's reference bodies on numpy arrays
adamw_update = reference.adamw_update


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared and small: torch's intra-op threads spin and crawl when oversubscribed."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def be():
    return get_backend("torch:cpu")


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def close(got, want, tol=2e-5):
    got = got.numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_rmsnorm(be):
    rng = np.random.default_rng(0)
    x, w, dy = rand(rng, 6, 16), rand(rng, 16), rand(rng, 6, 16)
    y, rstd = be.rmsnorm_forward(be.asarray(x), be.asarray(w), 1e-5)
    y_ref, rstd_ref = reference.rmsnorm_forward(x, w, 1e-5)
    close(y, y_ref), close(rstd, rstd_ref)
    dx, dw = be.rmsnorm_backward(be.asarray(dy), be.asarray(x), be.asarray(w), rstd)
    dx_ref, dw_ref = reference.rmsnorm_backward(dy, x, w, rstd_ref)
    close(dx, dx_ref), close(dw, dw_ref)
    assert be.rmsnorm_backward(be.asarray(dy), be.asarray(x), be.asarray(w), rstd, need_dw=False)[1] is None


@pytest.mark.parametrize("inverse", [False, True])
def test_rope(be, inverse):
    rng = np.random.default_rng(1)
    x = rand(rng, 2, 5, 3, 8)
    cos, sin = base.rope_tables(5, 8, 10000.0)
    close(be.rope_apply(be.asarray(x), be.asarray(cos), be.asarray(sin), inverse),
          reference.rope_apply(x, cos, sin, inverse))


@pytest.mark.parametrize("n_heads,n_kv_heads,T,block", [(4, 2, 7, 3), (2, 2, 5, 128), (6, 1, 9, 4)])
def test_attention(be, n_heads, n_kv_heads, T, block):
    rng = np.random.default_rng(2)
    D, B = 8, 2
    qkv, dy = rand(rng, B, T, (n_heads + 2 * n_kv_heads) * D), rand(rng, B, T, n_heads * D)
    cos, sin = base.rope_tables(16, D, 10000.0)
    y, saved = be.attention_forward(be.asarray(qkv), n_heads, n_kv_heads, cos, sin, block)
    y_ref, saved_ref = reference.attention_forward(qkv, n_heads, n_kv_heads, cos, sin, block)
    close(y, y_ref)
    close(be.attention_backward(be.asarray(dy), saved, n_heads, n_kv_heads),
          reference.attention_backward(dy, saved_ref, n_heads, n_kv_heads))


def test_swiglu(be):
    rng = np.random.default_rng(3)
    h13, g = rand(rng, 5, 12), rand(rng, 5, 6)
    close(be.swiglu_forward(be.asarray(h13)), reference.swiglu_forward(h13))
    close(be.swiglu_backward(be.asarray(g), be.asarray(h13)), reference.swiglu_backward(g, h13))


def test_embedding_backward_accumulates_repeats(be):
    rng = np.random.default_rng(4)
    g, tokens = rand(rng, 6, 4), np.array([1, 3, 1, 0, 3, 3])
    close(be.embedding_backward(be.asarray(g), tokens, 5), reference.embedding_backward(g, tokens, 5))


@pytest.mark.parametrize("chunk", [3, 256])
def test_classifier_cross_entropy(be, chunk):
    rng = np.random.default_rng(5)
    h, w, t = rand(rng, 7, 8), rand(rng, 11, 8), rng.integers(0, 11, 7)
    loss, dh, dw = be.classifier_cross_entropy(be.asarray(h), be.asarray(w), t, chunk)
    loss_ref, dh_ref, dw_ref = reference.classifier_cross_entropy(h, w, t, chunk)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0  # stays on the device: no sync per step
    close(loss, loss_ref), close(dh, dh_ref), close(dw, dw_ref)
    _, dh2, dw2 = be.classifier_cross_entropy(be.asarray(h), be.asarray(w), t, chunk, need_dh=False)
    assert dh2 is None
    close(dw2, dw_ref)


def test_adamw_update(be):
    rng = np.random.default_rng(6)
    p, g, m, v = rand(rng, 4, 5), rand(rng, 4, 5), rand(rng, 4, 5) * 0.1, np.abs(rand(rng, 4, 5))
    tp, tm, tv = be.asarray(p), be.asarray(m), be.asarray(v)
    for step in (1, 2):
        be.adamw_update(tp, be.asarray(g), tm, tv, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
        adamw_update(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, step)
    close(tp, p), close(tm, m), close(tv, v)
    tg = be.asarray(g)
    for clip in (0.5, be.asarray(np.float32(0.25)).reshape(())):  # a host factor, a 0-d device one
        be.adamw_update(tp, tg, tm, tv, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, tmp=be.xp.empty_like(tp), grad_scale=clip)
        adamw_update(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, grad_scale=float(clip))
        close(tp, p), close(tm, m), close(tv, v), close(tg, g)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_flags_and_batches(be, trans_a, trans_b):
    rng = np.random.default_rng(7)
    a = rand(rng, 3, *((5, 4) if trans_a else (4, 5)))
    b = rand(rng, *((6, 5) if trans_b else (5, 6)))
    want = np.matmul(a.swapaxes(-1, -2) if trans_a else a, b.T if trans_b else b)
    close(be.gemm(be.asarray(a), be.asarray(b), trans_a, trans_b), want)


def test_llama_loss_and_grads_match_numpy(be):
    from fusegrad.models import Llama

    tokens = np.random.default_rng(8).integers(0, 64, (2, 17))
    host = Llama.from_preset("tiny", seed=0)
    dev = Llama(host.config, params={n: fg.tensor(t.numpy(), backend=be, requires_grad=True)
                                     for n, t in host.params.items()})
    host.loss(tokens).backward()
    loss = dev.loss(tokens)
    loss.backward()
    assert loss.backend is be and loss.dtype == np.float32
    close(loss.item(), host.loss(tokens).item(), 1e-6)
    for name, t in dev.params.items():
        assert isinstance(t.grad, torch.Tensor), name  # grads stay on the device
        close(t.grad, host.params[name].grad, 1e-5)


def test_generic_ops_and_scatter_add(be):
    x = fg.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], backend=be, requires_grad=True)
    idx = fg.tensor([0, 1, 0])
    y = (x[idx].relu() * 2 + x.softmax(axis=1)[1].sum() - x.mean()).sum()
    y.backward()
    h = fg.tensor(x.numpy(), requires_grad=True)
    (h[idx.numpy()].relu() * 2 + h.softmax(axis=1)[1].sum() - h.mean()).sum().backward()
    assert isinstance(x.grad, torch.Tensor)
    close(x.grad, h.grad)


def test_transfers_are_counted_and_a_step_makes_no_round_trips(be):
    from fusegrad.models import Llama

    model = Llama.from_preset("tiny", seed=0)
    model.params = {n: fg.tensor(t.numpy(), backend=be, requires_grad=True) for n, t in model.params.items()}
    tokens = np.random.default_rng(9).integers(0, 64, (2, 9))
    model.loss(tokens).backward()  # warm-up: rope tables go to the device once
    TRACER.reset()
    TRACER.enabled = True
    try:
        model.zero_grad()
        model.loss(tokens).backward()
    finally:
        TRACER.enabled = False
    # only the token ids and targets go in (2 h2d); nothing comes back until someone asks
    assert TRACER.counters["transfer:h2d"] == 2 and TRACER.counters["transfer:d2h"] == 0
    assert TRACER.totals(by="category")["transfer"]["count"] == 2
    model.params["norm"].numpy()
    assert TRACER.counters["transfer:d2h"] == 1


def test_prewarm_and_unknown_device(be):
    from fusegrad.backends.torch_backend import TorchBackend

    with use_backend("torch:cpu"):
        calls = []
        be.prewarm_gemm, original = (lambda *shape: calls.append(shape[:3])), be.prewarm_gemm
        try:
            report = fg.prewarm(shapes=[(8, 4, 3), (2, 5, 7)])
        finally:
            be.prewarm_gemm = original
    assert report["warmed"]["torch:cpu"] == 2 and calls == [(8, 4, 3), (2, 5, 7)]  # the default backend too
    be.prewarm_gemm(8, 4, 3, np.float32)

    with pytest.raises(BackendError, match="unknown device 'tpu'"):
        TorchBackend("tpu")


def test_trainer_on_torch_cpu_tracks_numpy(tmp_path):
    from fusegrad.train.trainer import TrainConfig, Trainer

    def losses(**kw):
        cfg = TrainConfig(preset="tiny", max_steps=4, warmup_steps=1, batch_size=4, seq_len=16,
                          out_dir=str(tmp_path), progress=False, plot=False, sample_tokens=0, eval_interval=0,
                          quiet=True, **kw)
        trainer = Trainer(cfg)
        trainer.run()
        return trainer, np.array(trainer.history["loss"])

    _, want = losses()
    trainer, got = losses(backend="torch", device="cpu")
    assert get_backend().name == "numpy"  # the run's backend does not outlive it
    assert isinstance(trainer.model.params["norm"].data, torch.Tensor)
    assert isinstance(trainer.optimizer.exp_avg[0], torch.Tensor)  # optimizer state on the device too
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got[-1] < got[0]


class FlakyDevice:
    """torch-CPU as the "accelerator", raising on one GEMM shape."""

    def __init__(self, gemm, bad_m):
        self.gemm, self.bad_m, self.calls = gemm, bad_m, 0

    def __call__(self, a, b, trans_a, trans_b):
        self.calls += 1
        m = a.shape[-1] if trans_a else a.shape[-2]
        if m == self.bad_m:
            raise RuntimeError("CUDA error: out of memory (injected)")
        return self.gemm(a, b, trans_a, trans_b)


def test_offload_runs_gemms_on_the_device_and_falls_back_per_call():
    with gemm_offload("torch:cpu", min_flops=0) as entry:
        flaky = FlakyDevice(entry.gemm, bad_m=3)
        entry.gemm = flaky
        entry.max_failures = 10
        rng = np.random.default_rng(10)
        np_be = get_backend("numpy")
        TRACER.reset()
        for m in (4, 3, 5, 3):
            a, b = rand(rng, 6, m), rand(rng, 6, 7)
            with pytest.warns(RuntimeWarning) if m == 3 and entry.failures == 0 else _no_warning():
                out = np_be.gemm(a, b, trans_a=True)
            assert isinstance(out, np.ndarray)
            close(out, a.T @ b)
        assert flaky.calls == 4 and entry.failures == 2 and entry.calls == 2
        assert TRACER.counters["fallback:torch:cpu"] == 2 and TRACER.counters["dispatch:torch:cpu"] == 2
        # the injected fault fires before any copy: two operands in and one result out per good call
        assert TRACER.counters["transfer:h2d"] == 4 and TRACER.counters["transfer:d2h"] == 2
    assert get_backend("numpy").chain.offloads == []  # nothing stays after the block


def _no_warning():
    import contextlib
    return contextlib.nullcontext()


def test_offload_spec_errors():
    with pytest.raises(BackendError, match="not a torch device"):
        with gemm_offload("tpu:0"):
            pass
    with pytest.raises(BackendError, match="cuda"):
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        with gemm_offload("torch:cuda"):
            pass
