"""fusegrad's Llama against an independent PyTorch Llama (llama2.c conventions, benchmarks/torch_llama.py) and
against transformers' LlamaForCausalLM: loss and every gradient, through llama2.c `.bin` v0/v1 files
written byte by byte here and through Hugging Face directories. Plus a convergence run on "tiny".
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fusegrad as fg
from benchmarks.torch_llama import TorchLlama
from fusegrad.models import Llama, LlamaConfig

torch.set_num_threads(1)

CFG = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=67, seq_len=16)


def assert_rel(got, ref, tol, name=""):
    """max |got - ref| <= tol * max |ref|: relative to the tensor's scale (tiny entries don't blow it up)."""
    err, scale = float(np.abs(got - ref).max()), float(np.abs(ref).max())
    assert scale > 0 and err <= tol * scale, f"{name}: max abs diff {err:.3e}, scale {scale:.3e}, tol {tol}"


def check_model(model, ref_loss, ref_grads, tokens, tol):
    loss = model.loss(tokens)
    loss.backward()
    assert abs(float(loss.numpy()) - ref_loss) <= tol * abs(ref_loss)
    grads = model.grad_dict()
    assert sorted(grads) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        assert grads[name].shape == ref.shape, name
        assert_rel(grads[name], ref, tol, name)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def torch_model(request):
    return TorchLlama(**CFG, tied=request.param, seed=1)


@pytest.fixture
def tokens():
    return np.random.default_rng(3).integers(0, CFG["vocab_size"], (2, 14))  # T = 13: not a power of 2


@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_bin_matches_torch_llama(torch_model, tokens, version, tmp_path):
    path = tmp_path / f"m{version}.bin"
    torch_model.write_llama2c(path, version)
    ref_loss, ref_grads = torch_model.loss_and_hf_grads(tokens)
    model = Llama.from_pretrained(path)
    assert model.config.tie_embeddings == torch_model.tied
    check_model(model, ref_loss, ref_grads, tokens, 1e-4)  # float32 vs a float64 oracle
    check_model(Llama.from_pretrained(path, dtype=np.float64), ref_loss, ref_grads, tokens, 1e-9)


def test_hf_dirs_match_torch_llama(torch_model, tokens, tmp_path):
    """A HF directory written here from the torch model, and one re-saved by fusegrad, give the same grads."""
    ref_loss, ref_grads = torch_model.loss_and_hf_grads(tokens)
    torch_model.write_hf_dir(tmp_path / "hf")
    model = Llama.from_pretrained(tmp_path / "hf")
    check_model(model, ref_loss, ref_grads, tokens, 1e-4)
    model.save_pretrained(tmp_path / "resaved")
    check_model(Llama.from_pretrained(tmp_path / "resaved"), ref_loss, ref_grads, tokens, 1e-4)


def test_heads_apart_from_dim_over_n_heads_match_torch_llama(tokens, tmp_path):
    """dim 30 does not split into 4 heads; head_dim 8 gives queries 32 wide and keys 16: float64 against the
    float64 torch oracle, so the fused Q/K/V rows, the o projection's (30, 32) and RoPE's width all count."""
    with pytest.raises(fg.ConfigError, match=r"dim 30 must split into n_heads 4 heads \(or head_dim be given\)"):
        LlamaConfig(dim=30, n_heads=4)
    torch_model = TorchLlama(**{**CFG, "dim": 30}, tied=False, seed=2, head_dim=8)
    ref_loss, ref_grads = torch_model.loss_and_hf_grads(tokens)
    torch_model.write_hf_dir(tmp_path / "hf")
    model = Llama.from_pretrained(tmp_path / "hf", dtype=np.float64)
    assert (model.config.q_dim, model.config.kv_dim, model.params["layers.1.wo"].shape) == (32, 16, (30, 32))
    check_model(model, ref_loss, ref_grads, tokens, 1e-9)


@pytest.mark.parametrize("scaling, match", [
    ({"type": "ntk", "factor": 2.0}, r"rope_scaling must be a mapping with a type of llama3"),
    ({"type": "yarn", "factor": 2.0}, r"rope_scaling 'yarn' needs a positive finite original_max_len, got None"),
    ({"factor": float("nan")}, r"'llama3' needs a positive finite factor, got nan"),  # no type: Llama 3.1's
])
def test_config_refuses_rope_scaling_it_cannot_compute(scaling, match):
    with pytest.raises(fg.ConfigError, match=match):
        LlamaConfig(rope_scaling=scaling)


def test_transformers_llama_loads_save_pretrained_and_agrees(torch_model, tokens, tmp_path):
    from transformers import LlamaForCausalLM

    torch_model.write_llama2c(tmp_path / "m.bin", 1)
    model = Llama.from_pretrained(tmp_path / "m.bin")
    model.save_pretrained(tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64, attn_implementation="eager")
    inp = torch.as_tensor(tokens)
    logits = hf(input_ids=inp[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inp[:, 1:].reshape(-1))
    loss.backward()
    loss = loss.detach()
    hf_grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    ref_loss, ref_grads = torch_model.loss_and_hf_grads(tokens)
    # the two oracles agree (HF builds its RoPE frequencies in float32, hence not 1e-12)
    assert abs(float(loss) - ref_loss) < 1e-6 * ref_loss
    check_model(model, float(loss), hf_grads, tokens, 1e-4)


def test_state_dict_matches_hf_layout_of_weights(torch_model, tmp_path):
    torch_model.write_llama2c(tmp_path / "m.bin", 0)
    state = Llama.from_pretrained(tmp_path / "m.bin").state_dict()
    ref = torch_model.hf_state()
    assert sorted(state) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(state[name], ref[name], err_msg=name)


# -- convergence ---------------------------------------------------------------------------------------
def rule_batch(rng, batch, length, vocab):
    """Each row walks t -> (5 t + 3) or t -> (13 t + 1) mod vocab (chosen per row) from a random start.

    Both rules are permutations, so the previous token alone leaves the rule a coin flip (loss >= ln 2 =
    0.69 for a model without context); reading earlier tokens through attention settles it.
    """
    mul = np.where(rng.random(batch) < 0.5, 5, 13)
    add = np.where(mul == 5, 3, 1)
    out = np.empty((batch, length), np.int64)
    out[:, 0] = rng.integers(0, vocab, batch)
    for t in range(1, length):
        out[:, t] = (mul * out[:, t - 1] + add) % vocab
    return out


def test_tiny_preset_learns_synthetic_sequences():
    """Adam written here, 60 steps of 8 x 32 tokens: validation loss from ln(64) = 4.16 to below 0.3
    (seeded run: ~0.13), under the ln 2 floor of any model that ignores context."""
    model = Llama.from_preset("tiny", seed=0)
    V, T = model.config.vocab_size, model.config.max_seq_len
    rng, val = np.random.default_rng(0), rule_batch(np.random.default_rng(99), 32, T + 1, V)
    params = model.parameters()
    m = [np.zeros_like(p.data) for p in params]
    v = [np.zeros_like(p.data) for p in params]
    lr, b1, b2 = 1e-2, 0.9, 0.99
    with fg.no_grad():
        first = float(model.loss(val).numpy())
    for step in range(1, 61):
        model.zero_grad()
        model.loss(rule_batch(rng, 8, T + 1, V)).backward()
        for p, mi, vi in zip(params, m, v):
            mi += (1 - b1) * (p.grad - mi)
            vi += (1 - b2) * (p.grad ** 2 - vi)
            p.data -= lr * (mi / (1 - b1 ** step)) / (np.sqrt(vi / (1 - b2 ** step)) + 1e-8)
    with fg.no_grad():
        last = float(model.loss(val).numpy())
    assert abs(first - np.log(V)) < 0.2 and last < 0.3, (first, last)


@pytest.mark.parametrize("overrides", [{}, {"head_dim": 16}], ids=["stories260K", "wide-heads"])
def test_flops_per_token_counts_every_gemm_weight_and_adapters(overrides):
    from fusegrad.finetune.lora import LoraConfig, attach_lora

    model = Llama.from_preset("stories260K", **overrides)  # head_dim 16: queries 128 wide on a 64-wide model
    assert model.num_params() == model.config.num_params()
    c, seq = model.config, 64
    norms = (2 * c.n_layers + 1) * c.dim  # every parameter but the norms is a GEMM weight (tied classifier)
    attention = 12.0 * c.n_layers * c.n_heads * c.head_dim * seq
    assert model.flops_per_token(seq) == 6.0 * (model.num_params() - norms) + attention
    lora = attach_lora(model, LoraConfig(targets=("q", "v", "down"), r=4))
    lora_params = sum(t.numel() for t in lora.parameters())
    assert model.flops_per_token(seq) == 4.0 * (model.num_params() - norms) + 6.0 * lora_params + attention


def test_gemm_shapes_follow_the_model_and_its_adapters():
    from fusegrad.finetune.lora import LoraConfig, attach_lora

    model = Llama.from_preset("tiny")
    c = model.config
    shapes = model.gemm_shapes(batch=2, seq=5)
    assert shapes == sorted(set(shapes))
    assert (10, c.dim, c.dim + 2 * c.kv_dim) in shapes and (c.vocab_size, 10, c.dim) in shapes
    attach_lora(model, LoraConfig(targets=("k",), r=3))
    extra = set(model.gemm_shapes(batch=2, seq=5)) - set(shapes)
    assert extra == {(10, c.dim, 3), (3, 10, c.dim), (10, 3, c.dim), (10, 3, c.kv_dim), (c.kv_dim, 10, 3),
                     (10, c.kv_dim, 3)}


# -- activation checkpointing -------------------------------------------------------------------------
def test_checkpointed_activations_match_torch_llama(torch_model, tokens, tmp_path):
    """Each block recomputed in the backward: the oracle's loss and every gradient, in float32 and float64."""
    ref_loss, ref_grads = torch_model.loss_and_hf_grads(tokens)
    torch_model.write_hf_dir(tmp_path / "hf")
    for dtype, tol in [(np.float32, 1e-4), (np.float64, 1e-9)]:
        model = Llama.from_pretrained(tmp_path / "hf", dtype=dtype)
        model.config.checkpoint_activations = True
        check_model(model, ref_loss, ref_grads, tokens, tol)


def grads_of(model, tokens, make_lora=None):
    lora = make_lora(model) if make_lora else None
    model.loss(tokens).backward()
    params = lora.named_parameters() if lora else model.named_parameters()
    return {n: t.grad.copy() for n, t in params}, lora


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_checkpointed_grads_equal_the_stored_ones(lora, monkeypatch):
    """At a length past the attention's probability budget as well; LoRA dropout draws the same masks in the
    recompute (its generator ends where the forward left it)."""
    from fusegrad.backends import base
    from fusegrad.finetune.lora import LoraConfig, attach_lora

    monkeypatch.setattr(base, "ATTENTION_PROBS_BUDGET", 0)
    def make_lora(model):
        adapters = attach_lora(model, LoraConfig(targets="all", r=2, dropout=0.3, seed=5))
        for n, t in adapters.named_parameters():  # B starts at zero (PEFT): nonzero, so A gets a gradient
            t.data = t.data + np.random.default_rng(len(n)).normal(0, 0.1, t.shape).astype(t.dtype)
        return adapters
    tokens = np.random.default_rng(0).integers(0, 64, (2, 31))
    make = make_lora if lora else None
    want, want_lora = grads_of(Llama.from_preset("tiny", seed=1), tokens, make)
    got, got_lora = grads_of(Llama.from_preset("tiny", seed=1, checkpoint_activations=True), tokens, make)
    assert sorted(got) == sorted(want) and len(got) > 0
    for name in want:
        assert_rel(got[name], want[name], 1e-6, name)
    if lora:
        assert got_lora.rng.bit_generator.state == want_lora.rng.bit_generator.state


def test_checkpointing_travels_with_the_config_to_worker_processes():
    """Helpers build their model from config.to_dict(): the setting goes along; the grads equal one process's.
    It says how to train, not what the model is: configs that differ only in it are equal (resume)."""
    from fusegrad.parallel.workers import ProcessDataParallel

    model = Llama.from_preset("tiny", seed=1, checkpoint_activations=True)
    assert LlamaConfig.from_dict(model.config.to_dict()).checkpoint_activations
    assert model.config == Llama.from_preset("tiny").config
    oracle = Llama.from_preset("tiny", seed=1)
    tokens = np.random.default_rng(0).integers(0, 64, (4, 17))
    oracle.loss(tokens).backward()
    with ProcessDataParallel(model, 2) as dp:
        dp.loss_backward(tokens)
    for name, p in model.params.items():
        assert_rel(p.grad, oracle.params[name].grad, 1e-5, name)
