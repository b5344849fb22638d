"""LoRA and QLoRA on the fused projections: float64 finite differences, frozen base (GEMM shapes in the
tracer), NF4 base equal to LoRA over the dequantized weights, merge, bad input."""
import math

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.backends.base import Backend
from fusegrad.backends.cpu_jit import JitBackend
from fusegrad.backends.numpy_backend import NumpyBackend
from fusegrad.core.errors import ConfigError
from fusegrad.finetune.lora import LoraConfig, attach_lora, lora_linear, parse_targets
from fusegrad.finetune.qlora import attach_qlora, quantize_projections
from fusegrad.models import Llama
from fusegrad.models.llama import LlamaConfig

CFG = dict(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=24, vocab_size=32, max_seq_len=16)


def make(dtype=np.float32, seed=0):
    return Llama(LlamaConfig(**CFG), seed=seed, dtype=dtype)


def randomize_b(lora, rng, scale=0.1):
    for proj in lora.projections.values():
        for t in proj.targets:
            proj.B[t].data = rng.normal(0, scale, proj.B[t].shape).astype(proj.B[t].dtype)


@pytest.fixture
def tokens(rng):
    return rng.integers(0, CFG["vocab_size"], (2, 7))


def test_step_zero_is_the_base_model(tokens):
    base = make().logits(tokens[:, :-1]).numpy()
    model = make()
    attach_lora(model, LoraConfig(targets="all", r=3, alpha=6))
    np.testing.assert_array_equal(model.logits(tokens[:, :-1]).numpy(), base)


@pytest.mark.parametrize("targets,rslora", [(("q", "k", "v", "o", "gate", "up", "down"), False), (("k", "up"), True)])
def test_lora_grads_match_float64_central_differences(tokens, rng, targets, rslora):
    model = make(np.float64)
    lora = attach_lora(model, LoraConfig(targets=targets, r=2, alpha=5, rslora=rslora))
    randomize_b(lora, rng)
    model.loss(tokens).backward()
    eps = 1e-6
    for name, t in lora.named_parameters():
        for idx in [tuple(rng.integers(0, s) for s in t.shape) for _ in range(3)]:
            old = t.data[idx]
            t.data[idx] = old + eps
            with fg.no_grad():
                up = model.loss(tokens).item()
            t.data[idx] = old - eps
            with fg.no_grad():
                down = model.loss(tokens).item()
            t.data[idx] = old
            assert t.grad[idx] == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9), (name, idx)


def test_lora_linear_against_unfused_reference_with_dropout(rng):
    """The fused op = per-part x A^T B^T s into the part's rows, dropout on the LoRA input only."""
    x = fg.tensor(rng.normal(size=(5, 6)), dtype="float64", requires_grad=True)
    W = fg.tensor(rng.normal(size=(9, 6)), dtype="float64")
    A = fg.tensor(rng.normal(size=(4, 6)), dtype="float64", requires_grad=True)  # two parts, r = 2
    Bs = [fg.tensor(rng.normal(size=(3, 2)), dtype="float64", requires_grad=True) for _ in range(2)]
    slices = [slice(0, 3), slice(6, 9)]
    mask = (rng.random((5, 6)) > 0.3) / 0.7
    y = lora_linear(x, W, A, Bs, slices, 1.5, mask)
    g = rng.normal(size=(5, 9))
    y.backward(g)
    import torch
    tx, tA = torch.tensor(x.numpy(), requires_grad=True), torch.tensor(A.numpy(), requires_grad=True)
    tBs = [torch.tensor(b.numpy(), requires_grad=True) for b in Bs]
    ty = tx @ torch.tensor(W.numpy()).T
    xd = tx * torch.tensor(mask)
    delta = torch.zeros_like(ty)
    delta[:, 0:3] = 1.5 * (xd @ tA[:2].T) @ tBs[0].T
    delta[:, 6:9] = 1.5 * (xd @ tA[2:].T) @ tBs[1].T
    (ty + delta).backward(torch.tensor(g))
    np.testing.assert_allclose(y.numpy(), (ty + delta).detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(A.grad, tA.grad.numpy(), rtol=1e-12)
    for b, tb in zip(Bs, tBs):
        np.testing.assert_allclose(b.grad, tb.grad.numpy(), rtol=1e-12)


def _gemms(tracer):
    """The projections' GEMMs: those inside a fused op (classifier, attention) carry its name as "op"."""
    return [(e[6]["m"], e[6]["k"], e[6]["n"]) for e in tracer.events if e[0] == "gemm" and "op" not in e[6]]


def test_frozen_base_runs_no_weight_gradient_gemm(tokens):
    """Every base dW GEMM would be (out, N tokens, in); with LoRA only dx GEMMs touch the base."""
    c = LlamaConfig(**CFG)
    N = tokens.shape[0] * (tokens.shape[1] - 1)
    base_dw = {(c.dim + 2 * c.kv_dim, N, c.dim), (c.dim, N, c.dim), (2 * c.hidden_dim, N, c.dim),
               (c.dim, N, c.hidden_dim)}
    full = make()
    with fg.trace() as t:
        full.loss(tokens).backward()
    assert base_dw <= set(_gemms(t))  # the oracle: full training does run them
    model = make()
    lora = attach_lora(model, LoraConfig(targets="all", r=2))
    with fg.trace() as t:
        model.loss(tokens).backward()
    shapes = _gemms(t)
    assert not base_dw & set(shapes)
    assert all(p.grad is None for p in model.params.values())
    assert all(p.grad is not None for p in lora.parameters())
    # per layer: 4 base forward, 4 LoRA-A forward, 7 LoRA-B forward; backward: 7 dB + 7 du + 4 dA, and the
    # dx pairs (base + LoRA) of the 4 projections except layer 0's wqkv, whose input (from the frozen
    # embedding) needs no grad
    L = c.n_layers
    assert len(shapes) == L * (4 + 4 + 7 + 7 + 7 + 4) + 2 * (4 * L - 1)


def test_qlora_equals_lora_over_dequantized_weights_and_traces_dequantize(tokens, rng):
    model = make()
    lora, report = attach_qlora(model, LoraConfig(targets=("q", "v", "down"), r=2))
    assert report["ratio"] <= 0.16 and report["nf4_bytes"] * 6 < report["fp32_bytes"]
    randomize_b(lora, rng)
    ref = make()
    for name, proj in lora.projections.items():
        ref.params[name].data = proj.base.dequantize()
    ref_lora = attach_lora(ref, LoraConfig(targets=("q", "v", "down"), r=2))
    ref_lora.load_state_dict(lora.state_dict())
    with fg.trace() as t:
        loss = model.loss(tokens)
        loss.backward()
    ref_loss = ref.loss(tokens)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for (n, p), (_, q) in zip(lora.named_parameters(), ref_lora.named_parameters()):
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7, err_msg=n)
    L = model.config.n_layers
    assert t.totals()["nf4_dequantize"]["count"] == 4 * L + (4 * L - 1)  # forward + dx (not layer 0's wqkv)
    assert not any(k.startswith("layers.") and k.endswith(("wqkv", "wo", "w13", "w2")) for k in model.params)


class HostDequant(JitBackend):
    """The NF4 path before the numba kernel: the reference body (numpy on the host), a new array per GEMM."""

    def dequantize_nf4(self, q, code, out=None):
        return Backend.dequantize_nf4(self, q, code)


class RecordsBuffers(JitBackend):
    """The JIT backend, noting the `out` of every dequantize_nf4 call."""

    def __init__(self):
        super().__init__()
        self.outs = []

    def dequantize_nf4(self, q, code, out=None):
        self.outs.append(out)
        return super().dequantize_nf4(q, code, out)


def qlora_loss_and_grads(backend, tokens):
    model = Llama(LlamaConfig(**CFG), seed=0, backend=backend)
    lora, _ = attach_qlora(model, LoraConfig(targets="all", r=2))
    randomize_b(lora, np.random.default_rng(1))
    with fg.use_backend(backend):
        loss = model.loss(tokens)
        loss.backward()
    return loss.item(), {n: backend.to_numpy(p.grad) for n, p in lora.named_parameters()}, lora


def test_qlora_loss_and_grads_unchanged_by_the_kernel_and_buffers(tokens):
    loss, grads, _ = qlora_loss_and_grads(JitBackend(), tokens)
    host_loss, host_grads, _ = qlora_loss_and_grads(HostDequant(), tokens)  # as before: same kernels otherwise
    assert loss == host_loss
    for n, g in grads.items():
        np.testing.assert_array_equal(g, host_grads[n], err_msg=n)
    ref_loss, ref_grads, _ = qlora_loss_and_grads(NumpyBackend(), tokens)  # every kernel the reference
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[n], rtol=1e-5, atol=1e-7, err_msg=n)


def test_qlora_dequantizes_every_weight_into_one_buffer(tokens):
    be = RecordsBuffers()
    _, _, lora = qlora_loss_and_grads(be, tokens)
    largest = max(math.prod(p.base.shape) for p in lora.projections.values())
    (buffer,) = lora.weight_buffers.values()
    assert buffer.shape == (largest,)  # grown to the largest weight (w13 here), not one per shape
    be.outs.clear()
    lora.model.loss(tokens).backward()  # a second step: no buffer grows any more
    L = CFG["n_layers"]
    assert len(be.outs) == 4 * L + (4 * L - 1)  # forward + dx (not layer 0's wqkv)
    assert all(out is not None and out.base is buffer for out in be.outs)  # no GEMM allocated a weight
    assert lora.weight_buffers[("numpy", "cpu")] is buffer


def test_a_quantized_base_without_adapters_trains_the_rest(tokens):
    model, ref = make(), make()
    quantize_projections(model)  # no LoRA: Llama.project dequantizes each base for its GEMM
    for name, q in model.quantized.items():
        ref.params[name].data = q.dequantize()
        ref.params[name].requires_grad = False
    loss, ref_loss = model.loss(tokens), ref.loss(tokens)
    loss.backward()
    ref_loss.backward()
    assert loss.item() == ref_loss.item()
    assert set(n for n, _ in model.named_parameters()) == set(n for n, _ in ref.named_parameters())
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad, ref.params[n].grad, err_msg=n)


def test_merge_folds_adapters_into_the_base(tokens, rng):
    model = make()
    lora = attach_lora(model, LoraConfig(targets=("q", "k", "gate", "o"), r=2, alpha=3))
    randomize_b(lora, rng)
    want = model.logits(tokens).numpy()
    lora.merge()
    assert model.adapters == {}
    np.testing.assert_allclose(model.logits(tokens).numpy(), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(make().logits(tokens).numpy(), want, atol=1e-4)


def test_bad_targets_and_ranks_raise_clear_errors():
    with pytest.raises(ConfigError, match="unknown target module 'qq'"):
        parse_targets("q,qq")
    assert parse_targets("v_proj,q_proj,w2") == ("q", "v", "down")
    with pytest.raises(ConfigError, match="rank 9 is larger than k"):
        attach_lora(make(), LoraConfig(targets=("k",), r=9))  # k has kv_dim 8 rows
    with pytest.raises(ConfigError, match="rank r must be >= 1"):
        LoraConfig(r=0)
