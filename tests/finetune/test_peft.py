"""The peer: transformers + peft on the same base weights (saved with Llama.save_pretrained).

Our adapter files load with PeftModel.from_pretrained and give our logits; peft's files load into
fusegrad likewise; LoRA gradients equal peft's (q/k rows of B permuted to HF layout)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fusegrad.finetune.lora import LoraConfig, attach_lora  # noqa: E402
from fusegrad.finetune.peft_io import adapter_tensors, load_adapter, save_adapter  # noqa: E402
from fusegrad.models import Llama  # noqa: E402
from fusegrad.models.llama import LlamaConfig  # noqa: E402

CFG = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=64, max_seq_len=32)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    Llama(LlamaConfig(**CFG), seed=3).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def wide_base_dir(tmp_path_factory):  # heads wider than dim / n_heads (Minitron): q_proj (64, 32), o_proj (32, 64)
    d = tmp_path_factory.mktemp("wide")
    Llama(LlamaConfig(**CFG, head_dim=16), seed=3).save_pretrained(d)
    return d


def hf_peft(base_dir, **lora_kwargs):
    from peft import LoraConfig as PeftConfig, get_peft_model
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    return get_peft_model(hf, PeftConfig(**lora_kwargs))


def ours(base_dir, rng, **kw):
    model = Llama.from_pretrained(base_dir)
    lora = attach_lora(model, LoraConfig(**kw))
    for proj in lora.projections.values():
        for t in proj.targets:
            proj.B[t].data = rng.normal(0, 0.2, proj.B[t].shape).astype(np.float32)
            if t in proj.M:  # DoRA: magnitudes away from the base's row norms
                proj.M[t].data = (proj.M[t].data * rng.uniform(0.5, 1.5, proj.M[t].shape)).astype(np.float32)
    return model, lora


def peft_state(tensors):
    """Our PEFT file keys -> the keys of a live peft model (adapter name 'default')."""
    return {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            .replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight"): v for k, v in tensors.items()}


@pytest.mark.parametrize("base, dora", [("base_dir", False), ("wide_base_dir", False), ("base_dir", True),
                                        ("wide_base_dir", True)])
def test_lora_logits_and_grads_equal_peft(base, dora, rng, request):
    base_dir = request.getfixturevalue(base)
    tokens = rng.integers(0, CFG["vocab_size"], (2, 9))
    model, lora = ours(base_dir, rng, targets="all", r=4, alpha=8, rslora=True, dora=dora)
    pm = hf_peft(base_dir, r=4, lora_alpha=8, use_rslora=True, target_modules=ALL, lora_dropout=0.0, use_dora=dora)
    missing = pm.load_state_dict({k: torch.tensor(v) for k, v in peft_state(adapter_tensors(lora)).items()},
                                 strict=False)
    assert not missing.unexpected_keys
    logits = pm(torch.tensor(tokens[:, :-1])).logits
    loss_ref = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG["vocab_size"]),
                                                 torch.tensor(tokens[:, 1:]).reshape(-1))
    loss_ref.backward()
    loss = model.loss(tokens)
    loss.backward()
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    grads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    assert len(grads) == (3 if dora else 2) * 7 * CFG["n_layers"]  # DoRA: A, B and the magnitude
    # our grads in PEFT layout: temporarily swap .data for .grad and reuse the exporter
    saved = [(t, t.data) for t in lora.parameters()]
    for t, _ in saved:
        t.data = t.grad
    ours_as_peft = peft_state(adapter_tensors(lora))
    for t, data in saved:
        t.data = data
    for key, g in ours_as_peft.items():
        np.testing.assert_allclose(g, grads[key], rtol=2e-4, atol=2e-6, err_msg=key)


def test_saved_adapter_loads_in_peft_with_same_logits(base_dir, rng, tmp_path):
    from peft import PeftModel
    tokens = rng.integers(0, CFG["vocab_size"], (1, 8))
    model, lora = ours(base_dir, rng, targets=("q", "v", "down"), r=2, alpha=4)
    save_adapter(tmp_path, lora, base_model=str(base_dir))
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    pm = PeftModel.from_pretrained(hf, tmp_path)
    with torch.no_grad():
        ref = pm(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(model.logits(tokens).numpy(), ref, rtol=1e-4, atol=1e-5)


def test_peft_made_adapter_loads_into_fusegrad(base_dir, rng, tmp_path):
    tokens = rng.integers(0, CFG["vocab_size"], (1, 8))
    pm = hf_peft(base_dir, r=3, lora_alpha=5, target_modules=["k_proj", "o_proj", "up_proj"], lora_dropout=0.1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval()
    pm.save_pretrained(tmp_path)
    with torch.no_grad():
        ref = pm(torch.tensor(tokens)).logits.numpy()
    model = Llama.from_pretrained(base_dir)
    lora = load_adapter(tmp_path, model)
    assert lora.config.targets == ("k", "o", "up") and lora.config.dropout == pytest.approx(0.1)
    lora.train(False)
    np.testing.assert_allclose(model.logits(tokens).numpy(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("lora_alpha", None, "lora_alpha = null"), ("lora_alpha", float("nan"), "lora_alpha = nan: expected a finite"),
    ("target_modules", 5, "target_modules = 5; expected a list"), ("r", 2.5, "r = 2.5: expected an integer")])
def test_bad_adapter_config_fields_are_refused_by_name(tmp_path, key, value, message):
    import json

    from fusegrad.core.errors import FormatError

    save_adapter(tmp_path, attach_lora(Llama.from_preset("tiny"), LoraConfig(targets="q,v", r=4, alpha=8.0)))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[key] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"adapter_config\.json: " + message):
        load_adapter(tmp_path, Llama.from_preset("tiny"))
    with open(tmp_path / "adapter_config.json", "ab") as f:
        f.write(b"\xff")
    with pytest.raises(FormatError, match=r"adapter_config\.json: cannot read the adapter config: 'utf-8'"):
        load_adapter(tmp_path, Llama.from_preset("tiny"))


@pytest.mark.parametrize("bad", ["int32", "nan"])
def test_int_or_non_finite_adapter_tensors_are_refused(tmp_path, bad):
    from safetensors.numpy import load_file, save_file

    from fusegrad.core.errors import FormatError

    save_adapter(tmp_path, attach_lora(Llama.from_preset("tiny"), LoraConfig(targets="q,v", r=4, alpha=8.0)))
    s = load_file(tmp_path / "adapter_model.safetensors")
    k = sorted(s)[0]
    if bad == "nan":
        s[k][0, 0] = np.nan
    else:
        s[k] = s[k].astype(np.int32)
    save_file(s, tmp_path / "adapter_model.safetensors")
    message = "holds NaN or inf" if bad == "nan" else "has dtype int32"
    with pytest.raises(FormatError, match=rf"adapter_model\.safetensors: tensor '{k}' {message}"):
        load_adapter(tmp_path, Llama.from_preset("tiny"))


def test_dora_adapters_load_both_ways_and_merge_as_peft_merges(base_dir, rng, tmp_path):
    from peft import PeftModel

    from fusegrad.finetune.peft_io import merge_adapter

    tokens = rng.integers(0, CFG["vocab_size"], (1, 8))
    model, lora = ours(base_dir, rng, targets=("q", "k", "down"), r=2, alpha=4, dora=True)
    save_adapter(tmp_path / "ours", lora, base_model=str(base_dir))
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    pm = PeftModel.from_pretrained(hf, tmp_path / "ours")
    with torch.no_grad():
        np.testing.assert_allclose(model.logits(tokens).numpy(), pm(torch.tensor(tokens)).logits.numpy(),
                                   rtol=1e-4, atol=1e-5)
    theirs = hf_peft(base_dir, r=3, lora_alpha=5, target_modules=["v_proj", "o_proj", "up_proj"], use_dora=True)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.copy_(p * 0.7 + torch.randn_like(p) * 0.2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        ref = theirs(torch.tensor(tokens)).logits.numpy()
    loaded = load_adapter(tmp_path / "theirs", Llama.from_pretrained(base_dir))
    assert loaded.config.dora
    np.testing.assert_allclose(loaded.model.logits(tokens).numpy(), ref, rtol=1e-4, atol=1e-5)
    merged = merge_adapter(base_dir, tmp_path / "theirs")  # W' = m (W + s B A) / ||W + s B A||, as peft merges
    assert not merged.adapters
    unloaded = theirs.merge_and_unload()
    with torch.no_grad():
        np.testing.assert_allclose(merged.logits(tokens).numpy(), unloaded(torch.tensor(tokens)).logits.numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_dora_as_a_llama_cpp_adapter_is_refused_by_name(base_dir, tmp_path):
    import fusegrad as fg
    from fusegrad.finetune.gguf_adapter import write_gguf_adapter

    lora = attach_lora(Llama.from_pretrained(base_dir), LoraConfig(targets=("q",), r=2, dora=True))
    with pytest.raises(fg.FormatError, match=r"DoRA's magnitudes have no place in a llama.cpp adapter"):
        write_gguf_adapter(lora, tmp_path / "a.gguf")


def test_finetune_dora_on_an_nf4_base_writes_an_adapter_peft_reads(rng, tmp_path):
    import json

    from peft import PeftModel

    from fusegrad.cli.main import main as run_cli

    base_dir = tmp_path / "base"  # bytes for a vocabulary
    Llama(LlamaConfig(**{**CFG, "vocab_size": 258}), seed=3).save_pretrained(base_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}) + "\n" for i in range(12)))
    assert run_cli(["finetune", "--model", str(base_dir), "--tokenizer", "byte", "--data",
                    str(data), "--out", str(tmp_path / "run"), "--dora", "--qlora", "--lora_targets", "q,v,gate",
                    "--max_steps", "3", "--batch_size", "4", "--quiet"]) == 0
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["use_dora"] is True
    tokens = rng.integers(0, 258, (1, 8))
    lora = load_adapter(tmp_path / "run", Llama.from_pretrained(base_dir))
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        ref = PeftModel.from_pretrained(hf, tmp_path / "run")(torch.tensor(tokens)).logits.numpy()
    assert sorted(t for proj in lora.projections.values() for t in proj.M) == ["gate", "gate", "q", "q", "v", "v"]
    assert all(np.abs(proj.B[t].data).max() > 0 for proj in lora.projections.values() for t in proj.targets)
    np.testing.assert_allclose(lora.model.logits(tokens).numpy(), ref, rtol=1e-4, atol=1e-5)


def test_dora_with_dropout_gives_peft_loss_and_grads_under_the_same_masks(base_dir, rng):
    tokens = rng.integers(0, CFG["vocab_size"], (2, 9))
    model, lora = ours(base_dir, rng, targets="all", r=4, alpha=8, dora=True, dropout=0.3)
    draws, real = [], lora.rng

    class Recorded:  # the uniform draws of each fused projection's mask, in call order: wqkv, wo, w13, w2 a layer
        def random(self, shape):
            draws.append(real.random(shape))
            return draws[-1]
    lora.rng = Recorded()
    loss = model.loss(tokens)
    loss.backward()
    pm = hf_peft(base_dir, r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.3, use_dora=True)
    pm.load_state_dict({k: torch.tensor(v) for k, v in peft_state(adapter_tensors(lora)).items()}, strict=False)

    class Fixed(torch.nn.Module):  # peft's dropout, with our mask
        def __init__(self, keep):
            super().__init__()
            self.mask = torch.tensor((keep >= 0.3) / 0.7, dtype=torch.float32)

        def forward(self, x):
            return x * self.mask
    fused = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
    for name, module in pm.named_modules():
        if name.split(".")[-1] in fused and hasattr(module, "lora_dropout"):
            i = int(name.split("layers.")[1].split(".")[0])
            module.lora_dropout["default"] = Fixed(draws[4 * i + fused[name.split(".")[-1]]])
    pm.train()
    logits = pm(torch.tensor(tokens[:, :-1])).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG["vocab_size"]), torch.tensor(tokens[:, 1:]).reshape(-1))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    grads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    for t in lora.parameters():
        t.data, t.grad = t.grad, t.data
    ours_as_peft = peft_state(adapter_tensors(lora))
    for key, g in ours_as_peft.items():
        np.testing.assert_allclose(g, grads[key], rtol=2e-4, atol=2e-6, err_msg=key)
