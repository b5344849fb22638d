"""The GEMM dispatch chain, tested by fault injection: fake accelerators that raise or that work."""
import warnings

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.backends.base import gemm_dims
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.models import Llama, LlamaConfig


class FakeAccelerator:
    """A GEMM 'device' that counts calls and raises `error` (if any) instead of computing."""

    def __init__(self, error=None):
        self.error, self.calls = error, 0

    def __call__(self, a, b, trans_a, trans_b):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return np.matmul(a.swapaxes(-1, -2) if trans_a else a, b.swapaxes(-1, -2) if trans_b else b)


def _operands(rng, m=64, k=64, n=64):
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    return a, b, fg.tensor(a, requires_grad=True), fg.tensor(b, requires_grad=True)


def test_failing_accelerator_falls_back_correctly_warns_once_and_is_dropped(chain, rng):
    fake = FakeAccelerator(RuntimeError("device lost"))
    entry = chain.add_offload("fake", fake, min_flops=0, max_failures=3)
    a, b, ta, tb = _operands(rng)
    with fg.trace() as t:
        with pytest.warns(RuntimeWarning, match=r"fake failed \(RuntimeError: device lost\)"):
            y = ta @ tb
        np.testing.assert_allclose(y.numpy(), a @ b, rtol=1e-5, atol=1e-5)  # the CPU answered
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second warning for the same backend would raise here
            y.sum().backward()  # dA and dB: failures 2 and 3
            for _ in range(3):
                np.testing.assert_allclose((ta @ tb).numpy(), a @ b, rtol=1e-5, atol=1e-5)
    assert fake.calls == 3 and entry.failures == 3 and entry.disabled  # not tried after max_failures
    assert t.counters["fallback:fake"] == 3 and t.counters["dispatch:fallback"] == 3
    events = [e for e in t.events if e[0] == "fallback"]
    assert len(events) == 3 and events[0][6]["backend"] == "fake" and "device lost" in events[0][6]["reason"]
    assert t.counters["dispatch:numpy"] == 6
    np.testing.assert_allclose(ta.grad, np.ones((64, 64)) @ b.T, rtol=1e-4)


def test_each_failing_backend_warns_once_and_the_next_one_answers(chain, rng):
    first = FakeAccelerator(MemoryError("out of device memory"))
    second = FakeAccelerator(ValueError("bad layout"))
    working = FakeAccelerator()
    for name, fake in [("first", first), ("second", second), ("working", working)]:
        chain.add_offload(name, fake, min_flops=0, max_failures=10)
    a, b, ta, tb = _operands(rng, 8, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            np.testing.assert_allclose((ta @ tb).numpy(), a @ b, rtol=1e-5, atol=1e-5)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2
    assert "first failed (MemoryError: out of device memory)" in messages[0]
    assert "second failed (ValueError: bad layout)" in messages[1]
    assert (first.calls, second.calls, working.calls) == (4, 4, 4)


def test_size_threshold_keeps_small_gemms_on_the_cpu(chain, rng):
    fake = FakeAccelerator()
    entry = chain.add_offload("fast", fake, min_flops=2 * 32 ** 3)
    a, b, ta, tb = _operands(rng, 8, 8, 8)
    with fg.trace() as t:
        np.testing.assert_allclose((ta @ tb).numpy(), a @ b, rtol=1e-5)
    assert fake.calls == 0 and entry.calls == 0 and t.counters["dispatch:numpy"] == 1
    a, b, ta, tb = _operands(rng, 32, 32, 32)  # exactly at the threshold: offloaded
    with fg.trace() as t:
        np.testing.assert_allclose((ta @ tb).numpy(), a @ b, rtol=1e-5, atol=1e-5)
    assert fake.calls == 1 and entry.calls == 1
    assert t.counters["dispatch:fast"] == 1 and t.counters["dispatch:numpy"] == 0


def test_batched_gemm_threshold_counts_broadcast_batch():
    assert gemm_dims((3, 1, 4, 5), (2, 5, 6), False, False) == (4, 5, 6, 6)
    assert gemm_dims((4, 5), (7, 6, 5), False, True) == (4, 5, 6, 7)
    assert gemm_dims((5, 4), (5, 6), True, False) == (4, 5, 6, 1)
    with pytest.raises(fg.ShapeError, match="gemm: inner dimensions differ"):
        gemm_dims((4, 5), (4, 6), False, False)


CONFIG = {"dim": 8, "hidden_dim": 16, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 40}


def model_shapes(batch, seq, lora_rank=0, num_classes=0):
    """Llama.gemm_shapes of a one-layer model of CONFIG, LoRA on q when lora_rank."""
    model = Llama(LlamaConfig(n_layers=1, max_seq_len=16, **CONFIG))
    if lora_rank:
        attach_lora(model, LoraConfig(targets=("q",), r=lora_rank))
    return model.gemm_shapes(batch, seq, num_classes=num_classes)


def _expected_shapes(cfg, batch, seq, rank, classes):
    tokens, head = batch * seq, cfg["dim"] // cfg["n_heads"]
    kv = head * cfg["n_kv_heads"]
    dim, hidden = cfg["dim"], cfg["hidden_dim"]
    linears = {"qkv": (dim, dim + 2 * kv), "o": (dim, dim), "w13": (dim, 2 * hidden), "w2": (hidden, dim),
               "head": (dim, cfg["vocab_size"]), "classifier": (dim, classes)}
    out = {}
    for name, (d_in, d_out) in linears.items():  # y = x W^T, dx = dy W, dW = dy^T x
        out[name] = {(tokens, d_in, d_out), (tokens, d_out, d_in), (d_out, tokens, d_in)}
    d_in, d_out = dim, dim  # LoRA on q: h = x A^T, y = h B^T; dB = dy^T h, dh = dy B, dA = dh^T x, dx = dh A
    out["lora_q"] = {(tokens, d_in, rank), (tokens, rank, d_out), (d_out, tokens, rank),
                     (tokens, d_out, rank), (rank, tokens, d_in), (tokens, rank, d_in)}
    out["attention"] = {(seq, head, seq), (seq, seq, head)}
    return out


def test_prewarm_reports_every_training_gemm_per_backend(chain):
    good, bad = FakeAccelerator(), FakeAccelerator(RuntimeError("compile failed"))
    chain.add_offload("good", good, min_flops=0)
    chain.add_offload("bad", bad, min_flops=0, max_failures=2)
    with pytest.warns(RuntimeWarning, match="compile failed"):
        report = fg.prewarm(model_shapes(batch=2, seq=3, lora_rank=2, num_classes=4))
    shapes = set(report["shapes"])
    for name, expected in _expected_shapes(CONFIG, 2, 3, 2, 4).items():
        assert expected <= shapes, f"{name}: missing {expected - shapes}"
    assert len(shapes) == len(report["shapes"])  # deduplicated
    n = len(shapes)
    assert report["warmed"] == {"good": n, "bad": 0, "numpy": n}
    assert good.calls == n and bad.calls == 2  # the bad one is not tried after max_failures
    assert len(report["failed"]["bad"]) == n and report["failed"]["good"] == report["failed"]["numpy"] == []
    shape, reason = report["failed"]["bad"][0]
    assert shape in shapes and "RuntimeError: compile failed" in reason


def test_prewarm_explicit_shapes_and_bad_arguments(chain):
    report = fg.prewarm(shapes=[(4, 8, 16), (16, 4, 8)])
    assert report["shapes"] == [(4, 8, 16), (16, 4, 8)] and report["warmed"] == {"numpy": 2}
    with pytest.raises(fg.ConfigError, match="prewarm: give shapes"):
        fg.prewarm()


def test_gemm_shapes_without_lora_or_classifier_has_no_rank_shapes():
    shapes = model_shapes(batch=1, seq=4)
    assert min(min(s) for s in shapes) == 4  # tokens = seq = head = 4; no rank or class dims
    assert (4, 8, 40) in shapes and (40, 4, 8) in shapes
