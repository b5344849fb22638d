"""QLoRA on a quantized GGUF keeps the file's own blocks as the frozen base: every projection dequantizes to what
the float32 path (the gguf package's dequantize, q/k rows permuted) gives, bit for bit, for llama's and qwen2's row
orders and for fused projections whose parts differ in type; the QLoRA loss and adapter gradients equal LoRA's
on the same file widened to float32 (a Q4_K_M file fusegrad wrote as llama-quantize does, and SmolLM2-135M's Q4_1
file as published); `fusegrad finetune --qlora` on that file saves an adapter that transformers (reading the
same GGUF) and peft load with the same logits; bad blocks are FormatErrors naming the file and tensor."""
import json
import os

import gguf
import numpy as np
import pytest

from fusegrad.backends.cpu_jit import JitBackend
from fusegrad.cli.main import main
from fusegrad.core.errors import FormatError
from fusegrad.core.trace import trace
from fusegrad.data.tokenizer import ByteTokenizer
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.finetune.peft_io import load_adapter
from fusegrad.finetune.qlora import attach_qlora
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from fusegrad.models.llama import LlamaConfig
from fusegrad.quant.ggml import FusedGGML
from fusegrad.quant.nf4 import FusedNF4
from tests.gguf_edit import rewrite
from tests.real_checkpoint import smollm2_gguf

SMALL = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=258, max_seq_len=64)
Q = gguf.GGMLQuantizationType


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{name: GGUF path}: Q4_K_M as llama-quantize mixes it (layer 1's attn_v and ffn_down Q6_K, so its q/k/v
    mixes Q4_K and Q6_K), for llama (q/k rows as the file's) and qwen2 (Hugging Face's rows); and a llama file
    with a type per module: q/k/v Q8_0, F16, Q5_1 (a float beside quantized parts), o Q4_1, gate/up Q5_0, Q4_0,
    down BF16 (all float: NF4), layer 1's q Q2_K (no kernel: that projection NF4)."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, extra in (("llama", {}), ("qwen2", {"qkv_bias": True})):
        model = Llama(LlamaConfig(**SMALL, **extra), seed=1)
        export_model(model, d / f"{arch}.gguf", "gguf", ByteTokenizer(), "q4_k_m")
        out[f"{arch}-q4_k_m"] = d / f"{arch}.gguf"
    export_model(Llama(LlamaConfig(**SMALL), seed=2), d / "f32.gguf", "gguf", ByteTokenizer(), "f32")
    plain = gguf.GGUFReader(d / "f32.gguf")
    types = {"attn_q": Q.Q8_0, "attn_k": Q.F16, "attn_v": Q.Q5_1, "attn_output": Q.Q4_1, "ffn_gate": Q.Q5_0,
             "ffn_up": Q.Q4_0, "ffn_down": Q.BF16}
    tensors = {}
    for t in plain.tensors:
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else None
        if kind in types:
            tensors[t.name] = (gguf.quants.quantize(np.array(t.data), types[kind]), types[kind])
    q2k = np.random.default_rng(0).integers(0, 256, (256, 84), dtype=np.uint8)  # random Q2_K blocks
    q2k[:, 80:84] = np.float16([0.01, 0.002]).view(np.uint8)  # finite d, dmin
    tensors["blk.1.attn_q.weight"] = (q2k, Q.Q2_K)
    rewrite(d / "f32.gguf", d / "mixed.gguf", tensors)
    out["mixed"] = d / "mixed.gguf"
    return out


@pytest.mark.parametrize("name", ["llama-q4_k_m", "qwen2-q4_k_m", "mixed"])
def test_every_base_equals_the_float32_path_bit_for_bit(files, name):
    kept, plain = Llama.from_pretrained(files[name], quantize="auto"), Llama.from_pretrained(files[name])
    assert set(kept.quantized) == {f"layers.{i}.{k}" for i in range(2) for k in ("wqkv", "wo", "w13", "w2")}
    be = JitBackend()
    for proj, base in kept.quantized.items():
        if isinstance(base, FusedGGML):
            want = plain.params[proj].numpy()
            out = np.full(base.shape, np.nan, np.float32)
            np.testing.assert_array_equal(bits(base.dequantize_on(be, out)), bits(want), err_msg=proj)
            np.testing.assert_array_equal(bits(base.dequantize()), bits(want), err_msg=proj)  # the reference
    formats = {p: [q.format for q, _ in b.parts] for p, b in kept.quantized.items()}
    if name != "mixed":
        assert all(isinstance(b, FusedGGML) for b in kept.quantized.values())
        assert formats["layers.1.wqkv"] == ["Q4_K", "Q4_K", "Q6_K"] and formats["layers.0.wqkv"] == ["Q4_K"] * 3
        assert formats["layers.1.w2"] == ["Q6_K"]
        permuted = [f is not None for b in kept.quantized.values() for _, f in b.parts]
        assert sum(permuted) == (0 if name.startswith("llama") else 4)  # qwen2's q and k of both layers
    else:
        assert formats["layers.0.wqkv"] == ["Q8_0", "F16", "Q5_1"] and formats["layers.0.w13"] == ["Q5_0", "Q4_0"]
        assert formats["layers.0.wo"] == ["Q4_1"]
        assert isinstance(kept.quantized["layers.0.w2"], FusedNF4)  # BF16: NF4, as for a float file
        assert isinstance(kept.quantized["layers.1.wqkv"], FusedNF4)  # Q2_K: no kernel, NF4


def adapted(path, quantize):
    """The model of `path` with LoRA on all seven projections (QLoRA on its base when `quantize`), B random."""
    model = Llama.from_pretrained(path, quantize=quantize)
    cfg = LoraConfig(targets="all", r=4, seed=0)
    lora, report = attach_qlora(model, cfg) if quantize else (attach_lora(model, cfg), None)
    rng = np.random.default_rng(1)
    for proj in lora.projections.values():
        for t in proj.targets:
            proj.B[t].data = rng.normal(0, 0.02, proj.B[t].shape).astype(np.float32)
    return model, lora, report


def loss_and_grads(model, lora, tokens):
    loss = model.loss(tokens)
    loss.backward()
    return float(loss.numpy()), {n: t.grad for n, t in lora.named_parameters()}


def assert_qlora_equals_lora(path, tokens):
    (q_model, q_lora, report), (model, lora, _) = adapted(path, "auto"), adapted(path, None)
    with trace() as t:
        q_loss, q_grads = loss_and_grads(q_model, q_lora, tokens)
    loss, grads = loss_and_grads(model, lora, tokens)
    assert abs(q_loss - loss) <= 1e-6 * abs(loss), (q_loss, loss)
    for name, g in grads.items():
        np.testing.assert_allclose(q_grads[name], g, rtol=1e-4, atol=1e-6 * np.abs(g).max(), err_msg=name)
    assert np.abs(grads["layers.0.wqkv.lora_A"]).max() > 0
    L = q_model.config.n_layers
    assert t.totals()["ggml_dequantize"]["count"] == 4 * L + (4 * L - 1)  # forward + dx (not layer 0's wqkv)
    return report


def test_qlora_on_a_q4_k_m_file_equals_lora_on_it_widened(files):
    tokens = np.random.default_rng(0).integers(0, 258, (2, 17))
    report = assert_qlora_equals_lora(files["llama-q4_k_m"], tokens)
    assert set(report["formats"]) == {"Q4_K", "Q6_K"}
    assert report["base_bytes"] == sum(report["formats"].values()) < 0.18 * report["fp32_bytes"]


def test_qlora_on_smollm2s_q4_1_file_equals_lora_on_it_widened():
    path = smollm2_gguf()
    tokens = np.random.default_rng(0).integers(0, 49152, (1, 17))
    report = assert_qlora_equals_lora(path, tokens)
    assert set(report["formats"]) == {"Q4_1"}
    assert report["base_bytes"] == round(report["fp32_bytes"] / 4 * 20 / 32)  # 20 bytes per 32 values
    assert report["nf4_bytes"] < report["base_bytes"]


def test_bad_blocks_are_format_errors_naming_the_file_and_tensor(files, tmp_path):
    src = files["llama-q4_k_m"].read_bytes()
    info = gguf.GGUFReader(files["llama-q4_k_m"]).get_tensor(9)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(src[:int(info.data_offset) + 100])  # inside the 10th tensor's first blocks
    with pytest.raises(FormatError, match=rf"cut.gguf: tensor '{info.name}' at offset .* lies outside"):
        Llama.from_pretrained(cut, quantize="auto")
    at = src.index(b"blk.0.attn_q.weight") + len(b"blk.0.attn_q.weight")  # then n_dims, 2 dims, the type
    unknown = tmp_path / "unknown.gguf"
    unknown.write_bytes(src[:at + 20] + np.uint32(99).tobytes() + src[at + 24:])
    with pytest.raises(FormatError, match=r"unknown.gguf: tensor 'blk.0.attn_q.weight' has unknown ggml type 99"):
        Llama.from_pretrained(unknown, quantize="auto")
    plain = gguf.GGUFReader(files["llama-q4_k_m"])
    q = next(t for t in plain.tensors if t.name == "blk.1.ffn_up.weight")
    blocks = np.array(q.data).reshape(-1, 144)
    blocks[3, 0:2] = np.float16([np.nan]).view(np.uint8)  # one super-block's d
    rewrite(files["llama-q4_k_m"], tmp_path / "nan.gguf", {q.name: (blocks.reshape(q.data.shape), Q.Q4_K)})
    with pytest.raises(FormatError, match=r"nan.gguf: tensor 'blk.1.ffn_up.weight': Q4_K data holds NaN or inf"):
        Llama.from_pretrained(tmp_path / "nan.gguf", quantize="auto")


def test_finetune_qlora_on_the_q4_1_file_saves_an_adapter_peft_loads(tmp_path, capsys):
    """End to end on the published file: the log names the base kept, and transformers reading the same GGUF
    (its own dequantization) with peft's adapter gives fusegrad's logits with it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel

    path = smollm2_gguf()
    (tmp_path / "qa.jsonl").write_text('{"prompt": "What is 2+2?", "completion": " Four."}\n' * 6)
    out = tmp_path / "ft"
    assert main(["finetune", "--model", path, "--data", str(tmp_path / "qa.jsonl"), "--out", str(out), "--qlora",
                 "--max_steps", "3", "--batch_size", "2", "--lr", "0.01", "--lora_targets", "q,v",
                 "--progress", "false"]) == 0
    assert "frozen base projections: Q4_1 " in capsys.readouterr().err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    ids = [1, 504, 3100, 42, 7, 2]
    model = Llama.from_pretrained(path)
    before = model.logits(np.array([ids])).numpy()[0]
    load_adapter(out, model)
    ours = model.logits(np.array([ids])).numpy()[0]
    folder, name = os.path.split(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base, out).eval()(input_ids=torch.tensor([ids])).logits.numpy()[0]
    np.testing.assert_allclose(ours, theirs, atol=2e-3)
    assert np.abs(ours - before).max() > 1e-2  # the adapter changes what the base gives


def test_a_resumed_run_keeps_the_base_it_trained_on(files, tmp_path):
    """--quantize nf4 makes NF4 of a GGUF's blocks too; a checkpoint records its base's formats, and a resume on
    another base (or an older checkpoint, whose GGUF bases were NF4, on the file's blocks) is refused by name."""
    from fusegrad.core.errors import ConfigError
    from fusegrad.finetune.trainer import FinetuneConfig, FinetuneError, Finetuner
    from fusegrad.train.checkpoint import load_checkpoint, save_checkpoint

    (tmp_path / "qa.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n' * 8)

    def run(**kw):
        return Finetuner(FinetuneConfig(**{
            "model": str(files["llama-q4_k_m"]), "data": str(tmp_path / "qa.jsonl"), "tokenizer": "byte",
            "out": str(tmp_path / "ft"), "qlora": True, "batch_size": 4, "max_steps": 2, "rank": 2, "workers": 1,
            "quiet": True, **kw}))

    first = run()
    assert first.base_formats() == ["Q4_K", "Q6_K"]
    first.train_step()
    first.save()
    with pytest.raises(FinetuneError, match=r"ft/finetune_state.safetensors: the checkpoint's frozen base was "
                                            r"Q4_K\+Q6_K, this run's is NF4: .* \(pass --quantize auto\)"):
        run(resume=True, quantize="nf4")
    assert run(resume=True).step == 1
    state = load_checkpoint(first.state_path)
    del state["base_formats"]  # as saved before the record was kept
    save_checkpoint(first.state_path, state)
    with pytest.raises(FinetuneError, match=r"frozen base was NF4, this run's is Q4_K\+Q6_K: .* \(pass --quantize "
                                            r"nf4\)"):
        run(resume=True)
    resumed = run(resume=True, quantize="nf4")
    assert resumed.step == 1 and resumed.base_formats() == ["NF4"]
    with pytest.raises(ConfigError, match="quantize = 'nf4' chooses --qlora's base format; add --qlora"):
        run(qlora=False, quantize="nf4", out=str(tmp_path / "other"))
