"""A real pretrained checkpoint as published (SmolLM2-135M-Instruct, bf16; tests/real_checkpoint.py), against
transformers and peft on the same files: tokenizer, logits, greedy generation, a LoRA fine-tune whose adapter
peft loads, merge, and every export format read back by its own reader."""
import numpy as np
import pytest

import fusegrad as fg
from fusegrad.data.chat import chat_example, chat_text
from fusegrad.data.tokenizer import BPETokenizer, load_tokenizer
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.finetune.peft_io import merge_adapter, save_adapter
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from fusegrad.models.generate import generate
from fusegrad.train.optim import AdamW
from tests.real_checkpoint import smollm2_dir

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"}]


@pytest.fixture(scope="module")
def model_dir():
    return smollm2_dir()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    return Llama.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def logits_of(model, ids):
    with fg.no_grad():
        return model.logits(np.array([ids])).numpy()[0]


def torch_logits(hf, ids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits.numpy()[0]


def test_its_tokenizer_loads_with_its_own_special_tokens_and_chat_template(model_dir):
    ours, theirs = load_tokenizer(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(ours, BPETokenizer) and ours.vocab_size == 49152
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (theirs.bos_token_id, theirs.eos_token_id, False)
    for text in ("Once upon a time", "  def f(x):\n\treturn x ** 2  # é"):
        assert ours.encode(text) == theirs.encode(text)
    ids, mask = chat_example(ours, MESSAGES[:3])
    assert ids == list(theirs.apply_chat_template(MESSAGES[:3], tokenize=True, return_dict=True)["input_ids"])
    assert ours.decode([i for i, m in zip(ids, mask) if m]).startswith("Paris.")
    assert chat_text(ours, MESSAGES, add_generation_prompt=True) == \
        theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def test_logits_and_greedy_generation_equal_transformers(model, reference, tokenizer):
    c = model.config
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.rope_theta) == (576, 30, 9, 3, 49152, 1e5)
    ids = tokenizer.encode(chat_text(tokenizer, MESSAGES, add_generation_prompt=True))
    np.testing.assert_allclose(logits_of(model, ids), torch_logits(reference, ids), atol=2e-3)
    ours = generate(model, ids, max_new_tokens=16, temperature=0.0, stop_ids=tokenizer.eos_ids)
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0].tolist()
    assert ours == theirs  # transformers stops at the generation config's eos ids too
    assert "Rome" in tokenizer.decode(ours[len(ids):])


@pytest.fixture(scope="module")
def fine_tuned(model_dir, tokenizer, tmp_path_factory):
    """A LoRA fine-tune of a few steps through the library: attach_lora, the model's loss, AdamW."""
    model = Llama.from_pretrained(model_dir)
    lora = attach_lora(model, LoraConfig(targets=("q", "v", "down"), r=4, alpha=8, seed=0))
    ids, _ = chat_example(tokenizer, MESSAGES[:3])
    batch = np.array([ids])
    opt = AdamW(lora.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(3):
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.numpy()))
    assert losses[-1] < losses[0]
    adapter = tmp_path_factory.mktemp("adapter")
    save_adapter(adapter, lora, base_model=model_dir)
    return model, adapter, ids


def test_fine_tuned_adapter_loads_in_peft_with_the_same_logits(fine_tuned, model_dir):
    from peft import PeftModel

    model, adapter, ids = fine_tuned
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    ours = logits_of(model, ids)
    np.testing.assert_allclose(ours, torch_logits(peft_model, ids), atol=2e-3)
    assert np.abs(ours - logits_of(Llama.from_pretrained(model_dir), ids)).max() > 0.1  # it did learn


def test_merge_and_every_export_read_back_by_its_own_reader(fine_tuned, model_dir, tokenizer, tmp_path):
    adapted, adapter, ids = fine_tuned
    merged = merge_adapter(model_dir, adapter)
    want = logits_of(adapted, ids)
    np.testing.assert_allclose(logits_of(merged, ids), want, atol=1e-3)
    export_model(merged, tmp_path / "hf", "hf", tokenizer)  # Hugging Face -> transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(hf, ids), want, atol=2e-3)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").encode("Bonjour") == tokenizer.encode("Bonjour")
    del hf
    export_model(merged, tmp_path / "m.gguf", "gguf", None, "f16")  # GGUF -> transformers' GGUF loader
    gg = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(gg, ids), want, atol=0.25)  # f16 weights through 30 layers
    assert (torch_logits(gg, ids).argmax(-1) == want.argmax(-1)).mean() > 0.9
    del gg
    # llama2.c: the .bin has no field for rope_theta (run.c hard-codes 10000); this model's is 1e5
    with pytest.raises(fg.FormatError, match=r"implies rope_theta 10000 .*100000"):
        export_model(merged, tmp_path / "m.bin", "llama2c", tokenizer)
    merged.config.rope_theta, merged.config.norm_eps = 10000.0, 1e-5  # a llama2.c-shaped copy: v0 read back
    export_model(merged, tmp_path / "m.bin", "llama2c", tokenizer)
    back = Llama.from_pretrained(tmp_path / "m.bin")
    assert back.config.vocab_size == 49152 and back.config.n_kv_heads == 3
    np.testing.assert_array_equal(back.params["layers.29.wqkv"].numpy(), merged.params["layers.29.wqkv"].numpy())


PEAK_RSS = """
import sys
import numpy as np
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.finetune.qlora import attach_qlora
from fusegrad.models import Llama
from fusegrad.train.optim import AdamW
qlora = sys.argv[2] == "qlora"
model = Llama.from_pretrained(sys.argv[1], quantize="nf4" if qlora else None)
cfg = LoraConfig(targets="all", r=8)
lora = attach_qlora(model, cfg)[0] if qlora else attach_lora(model, cfg)
opt = AdamW(lora.parameters(), lr=1e-4)
tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 65))
for _ in range(2):
    model.loss(tokens).backward()
    opt.step()
    opt.zero_grad()
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def test_qlora_peak_memory_is_at_most_0_6_of_lora(model_dir):
    """Each fine-tune in its own process: QLoRA quantizes module by module while loading, so the fp32
    projections never exist; peak RSS of two steps, all seven targets, r 8. Read as VmHWM: a child's
    ru_maxrss starts from its parent's (this test process) on Linux."""
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    peak = {kind: int(subprocess.run([sys.executable, "-c", PEAK_RSS, model_dir, kind], env=env, check=True,
                                     capture_output=True, text=True).stdout.split()[-1])
            for kind in ("lora", "qlora")}
    assert peak["qlora"] <= 0.6 * peak["lora"], peak
