"""Every path on a torch device without a GPU: torch's meta device (shapes, no data) fails on any tensor
made off the device and on any host read, so a whole step running there proves a step never leaves the
device; torch:cpu proves the numbers (fp32 within 1e-5 of the numpy backend)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("array_api_compat")

import fusegrad as fg  # noqa: E402
from fusegrad import ops  # noqa: E402
from fusegrad.backends import get_backend  # noqa: E402
from fusegrad.core.errors import BackendError  # noqa: E402
from fusegrad.finetune.lora import LoraConfig, attach_lora  # noqa: E402
from fusegrad.finetune.losses import lm_loss, pool  # noqa: E402
from fusegrad.finetune.qlora import quantize_projections  # noqa: E402
from fusegrad.models import Llama  # noqa: E402
from fusegrad.models.generate import generate  # noqa: E402
from fusegrad.train.optim import AdamW, clip_grad_norm  # noqa: E402

V = 64
TOKENS = np.random.default_rng(3).integers(0, V, (2, 9))
MASK = np.arange(8)[None, :] >= np.array([[2], [0]])  # (2, 8): the first row's prompt is not a target


def on(backend, host, quantized=None, lora=None):
    """A copy of the host model on `backend` (and LoRA/QLoRA adapters on it, the same init)."""
    model = Llama(host.config, params={n: fg.tensor(t.numpy(), backend=backend, requires_grad=True)
                                       for n, t in host.params.items()})
    adapters = attach_lora(model, lora, quantized=quantized) if lora else None
    return model, adapters


def step(model, adapters, kind):
    """One whole training step: loss, backward, clip, AdamW -> (loss tensor, {name: grad}) before the update."""
    named = adapters.named_parameters() if adapters else model.named_parameters()
    opt = AdamW(named, lr=1e-2)
    if kind == "classify":
        head = fg.tensor(np.random.default_rng(1).normal(0, 0.02, (3, model.config.dim)), dtype="float32",
                         requires_grad=True, backend=model.backend)
        opt = AdamW(named + [("score", head)], lr=1e-2)
        h = pool(model.hidden(TOKENS[:, :-1]), "last")
        loss = ops.cross_entropy(ops.matmul_nt(h, head), np.array([0, 2]))
    elif adapters:
        loss = lm_loss(model, TOKENS, MASK, int(MASK.sum()))
    else:
        loss = model.loss(TOKENS)
    (loss * 0.5).backward()
    grads = {n: t.grad for n, t in opt_named(opt)}
    if model.backend.name != "torch:meta":  # a host copy, before clipping scales the grads in place
        grads = {n: np.array(model.backend.to_numpy(g)) for n, g in grads.items()}
    clip_grad_norm(opt.params, 1.0)
    opt.step()
    return loss, grads


def opt_named(opt):
    return list(zip(opt.names, opt.params))


KINDS = {"pretrain": None, "lora": LoraConfig(targets="q,v,down", r=4), "qlora": LoraConfig(targets="q,v", r=4),
         "classify": LoraConfig(targets="q,v", r=4)}


@pytest.mark.parametrize("kind", KINDS)
def test_a_whole_training_step_runs_on_meta(kind):
    host = Llama.from_preset("tiny", vocab_size=V, seed=0)
    quantized = quantize_projections(host)[0] if kind == "qlora" else None  # quantized on the host, once
    model, adapters = on("torch:meta", host, quantized, KINDS[kind])
    loss, grads = step(model, adapters, kind)
    assert loss.data.device.type == "meta" and loss.shape == ()
    assert grads and all(g.device.type == "meta" for g in grads.values())
    for t in (adapters.parameters() if adapters else model.parameters()):
        assert t.data.device.type == "meta"


@pytest.mark.parametrize("kind", KINDS)
def test_torch_cpu_matches_numpy_in_fp32(kind):
    host = Llama.from_preset("tiny", vocab_size=V, seed=0)
    quantized = quantize_projections(host)[0] if kind == "qlora" else None
    results = [step(*on(name, host, quantized, KINDS[kind]), kind) for name in ("numpy", "torch:cpu")]
    (want_loss, want), (got_loss, got) = results
    assert abs(got_loss.item() - want_loss.item()) < 1e-5
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_meta_refuses_every_host_read():
    be = get_backend("torch:meta")
    x = fg.tensor(np.ones((2, 3), np.float32), backend=be)
    for read in (x.numpy, fg.tensor(np.float32(1.5), backend=be).item):
        with pytest.raises(BackendError, match="meta holds shapes"):
            read()
    with pytest.raises(RuntimeError):  # an array made off the device does not mix with the device's
        _ = x.data + torch.ones(2, 3)


def test_a_generation_step_on_meta():
    """On meta a generation step is the cached forward: prompt, then one new token, KV cache filled on the
    device; sampling a token needs data, so `generate` stops exactly there with BackendError."""
    host = Llama.from_preset("tiny", vocab_size=V, seed=0)
    model, _ = on("torch:meta", host)
    cache = model.new_cache(1, 8)
    with fg.no_grad():
        prompt = model.logits(np.array([[1, 5, 7]]), cache=cache)
        nxt = model.logits(np.array([[4]]), cache=cache)
    assert prompt.shape == (1, 3, V) and nxt.shape == (1, 1, V) and nxt.data.device.type == "meta"
    assert cache.k[0].device.type == "meta"
    with pytest.raises(BackendError, match="meta holds shapes"):
        generate(model, [1, 5, 7], max_new_tokens=2, seed=0)


def _trainer(tmp_path, **kw):
    from fusegrad.train.trainer import TrainConfig, Trainer

    cfg = dict(preset="tiny", max_steps=6, warmup_steps=1, batch_size=2, seq_len=16, out_dir=str(tmp_path),
               progress=False, plot=False, sample_tokens=0, eval_interval=0, quiet=True, workers=1)
    return Trainer(TrainConfig(**{**cfg, **kw}))


def test_the_loop_steps_on_meta_and_reads_device_losses_at_log_intervals(tmp_path):
    trainer = _trainer(tmp_path / "meta", backend="torch", device="meta")
    with pytest.raises(BackendError, match="meta holds shapes"):
        trainer.train_step()  # outside the loop a step hands back its loss as a float: a host read
    trainer.history["loss"].clear()
    trainer.deferred_reads = True  # as in the loop
    for _ in range(2):  # the loop's whole step: grad accumulation, clipping, AdamW; no host read
        trainer.train_step()
    assert [v.device.type for v in trainer.history["loss"]] == ["meta", "meta"]
    host = _trainer(tmp_path / "np", log_interval=4).run()
    dev = _trainer(tmp_path / "cpu", backend="torch", device="cpu", log_interval=4)
    assert abs(dev.run()["loss"] - host["loss"]) < 1e-5
    assert all(isinstance(v, float) for v in dev.history["loss"])  # every loss read by the end


def test_a_non_finite_device_loss_stops_the_run_naming_its_step(tmp_path):
    from fusegrad.train.loop import TrainingError

    trainer = _trainer(tmp_path, backend="torch", device="cpu", log_interval=4, ckpt_interval=0)
    trainer.model.params["norm"].data[:] = float("nan")
    with pytest.raises(TrainingError, match="step 1: loss is nan"):
        trainer.run()
    assert trainer.step == 4  # read at the logging interval, before any checkpoint


def test_bf16_and_fp16_loss_curves_stay_within_their_tolerance_of_fp32(tmp_path):
    """50 steps of a tiny model. bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 0.0039): GEMM
    operands and stored activations are rounded to it (relative error <= u/2 each), products accumulate in
    fp32, softmax, norm statistics and loss are fp32, so a step's loss moves by a small multiple of u
    relative; 50 AdamW steps (clipped, lr 3e-3) on fp32 master weights keep it there (seen: 4e-4). Tolerance:
    1e-2 relative (2.5 u) at every step; fp16 (u = 2^-11, with loss scaling) too.
    The curves must also differ from fp32, or the GEMMs did not run in the low precision."""
    def curve(dtype):
        trainer = _trainer(tmp_path / dtype, backend="torch", device="cpu", dtype=dtype, max_steps=50, warmup_steps=5,
                           log_interval=10)
        trainer.run()
        return np.array(trainer.history["loss"]), trainer

    fp32, _ = curve("fp32")
    for dtype in ("bf16", "fp16"):
        low, trainer = curve(dtype)
        rel = np.abs(low - fp32) / fp32
        assert rel.max() < 1e-2 and rel.max() > 1e-7, (dtype, rel.max())
        assert all(t.data.dtype == torch.float32 for t in trainer.model.parameters())  # fp32 master weights
        assert all(m.dtype == torch.float32 for m in trainer.optimizer.exp_avg_sq)
        assert (trainer.loss_scale is not None) == (dtype == "fp16")
    with pytest.raises(BackendError, match="fp32 only"):
        _trainer(tmp_path / "np", dtype="bf16").run()


def graph_tensors(root):
    """Every tensor of the graph that built `root` (activations, then the leaves: parameters)."""
    seen, stack = {}, [root]
    while stack:
        t = stack.pop()
        if id(t) not in seen:
            seen[id(t)] = t
            stack.extend(t.node.inputs if t.node is not None else ())
    return list(seen.values())


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("kind", ["pretrain", "lora", "qlora"])
def test_under_bf16_every_activation_is_bf16_and_weights_grads_and_loss_are_fp32(kind, device):
    """The mixed-precision policy: every tensor a step makes between the parameters and the loss (the
    residual stream, norm outputs, q/k/v with their Qwen2-style bias, attention and FFN outputs: what the
    backward keeps) is bf16; the loss, every parameter, every grad and AdamW's moments are fp32. On meta:
    no host sync either."""
    host = Llama.from_preset("tiny", vocab_size=V, seed=0, qkv_bias=kind == "pretrain")
    quantized = quantize_projections(host)[0] if kind == "qlora" else None
    model, adapters = on(f"torch:{device}", host, quantized, KINDS[kind])
    be = model.backend
    with be.precision("bf16"):
        assert model.hidden(TOKENS[:, :-1]).data.dtype == torch.bfloat16
        loss = lm_loss(model, TOKENS, MASK, int(MASK.sum())) if adapters else model.loss(TOKENS)
        made = [t for t in graph_tensors(loss) if t.node is not None and t is not loss]
        assert len(made) > 10 and {t.data.dtype for t in made} == {torch.bfloat16}
        assert loss.data.dtype == torch.float32 and loss.dtype == np.float32
        named = adapters.named_parameters() if adapters else model.named_parameters()
        opt = AdamW(named, lr=1e-2)
        loss.backward()
        clip_grad_norm(opt.params, 1.0)
        opt.step()
    assert all(t.data.dtype == torch.float32 and t.grad.dtype == torch.float32 for t in opt.params)
    assert all(m.dtype == torch.float32 for m in opt.exp_avg + opt.exp_avg_sq)
    assert {t.data.device.type for t in opt.params} == {device}


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_under_bf16_a_classification_heads_softmax_and_loss_are_fp32(device):
    """The head's logits come out of a bf16 GEMM; log_softmax widens them, so the loss and its softmax are
    fp32 (as under autocast) and the head's grad is fp32 like the head."""
    host = Llama.from_preset("tiny", vocab_size=V, seed=0)
    model, adapters = on(f"torch:{device}", host, None, KINDS["lora"])
    be = model.backend
    head = fg.tensor(np.random.default_rng(0).normal(0, 0.02, (3, host.config.dim)), dtype=np.float32,
                     requires_grad=True, backend=be)
    with be.precision("bf16"):
        logits = ops.matmul_nt(pool(model.hidden(TOKENS[:, :-1]), "last"), head)  # (B, 3)
        loss = fg.cross_entropy(logits, np.array([0, 2]))
        assert logits.data.dtype == torch.bfloat16
        assert loss.data.dtype == torch.float32 and loss.node.inputs[0].data.dtype == torch.float32
        loss.backward()
    assert head.grad.dtype == torch.float32 and head.grad.device.type == device
    if device == "cpu":
        assert np.isfinite(loss.item())


def test_generation_and_export_of_a_torch_model_match_numpy(tmp_path):
    host = Llama.from_preset("tiny", vocab_size=V, seed=0)
    dev, _ = on("torch:cpu", host)
    assert generate(dev, [1, 2, 3], 8, seed=0) == generate(host, [1, 2, 3], 8, seed=0)
    dev.save_pretrained(tmp_path / "hf")  # weights come to the host once, on export
    back = Llama.from_pretrained(tmp_path / "hf")
    for name, t in host.params.items():
        np.testing.assert_array_equal(back.params[name].numpy(), t.numpy())
