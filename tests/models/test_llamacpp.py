"""llama.cpp itself reads fusegrad's GGUF files (node-llama-cpp's prebuilt CPU build, `tests/llamacpp.py`): its
next-token probabilities equal fusegrad's for plain, grouped-query, wide-head, Llama 3.1-RoPE and Qwen2 models
and for the real SmolLM2-135M, and it tokenizes text into the ids fusegrad's tokenizers give."""
import gguf
import numpy as np
import pytest

import fusegrad as fg
from fusegrad.data.chat import chat_text
from fusegrad.data.tokenizer import ByteTokenizer, load_tokenizer
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from fusegrad.models.generate import generate
from tests.llamacpp import as_array, llamacpp, next_token_probs, sharpened
from tests.real_checkpoint import smollm2_dir
from tests.tokenizers_made import (LLAMA3_SPLIT, TEXT, sentencepiece_and_llama2c, sentencepiece_style_bpe,
                                   trained_bpe)


LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_len": 16}
YARN = {"type": "yarn", "factor": 4.0, "original_max_len": 8, "beta_fast": 32.0, "beta_slow": 1.0,
        "attention_factor": 0.1 * np.log(4.0) + 1}


@pytest.mark.parametrize("overrides, dtype, tol", [
    ({}, "f32", 1e-3), ({}, "f16", 5e-3), ({}, "q8_0", 3e-2),
    ({"n_kv_heads": 1}, "f32", 1e-3),
    ({"head_dim": 16}, "f32", 1e-3),  # queries 64 wide on a 32-wide model: key_length / value_length
    ({"rope_scaling": LLAMA31, "rope_theta": 5e5}, "f32", 1e-3),  # rope_freqs.weight (without it: 0.19 apart)
    ({"qkv_bias": True, "rope_theta": 1e6}, "f32", 1e-3),  # llama.cpp's qwen2: biases, rotate-half q/k rows
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "f32", 1e-3),
    ({"rope_scaling": YARN, "rope_theta": 5e4}, "f32", 1e-3),
    ({"rope_scaling": {**YARN, "attention_factor": 1.3}, "rope_theta": 5e4}, "f32", 1e-3),  # rope.scaling.attn_factor
    ({"rope_scaling": YARN, "qkv_bias": True, "rope_theta": 1e6}, "f32", 1e-3),  # Qwen2.5's long-context files
    ({"rope_scaling": {"type": "linear", "factor": 4.0}, "qkv_bias": True}, "f32", 1e-3),
], ids=["f32", "f16", "q8_0", "gqa", "wide-heads", "llama3.1-rope", "qwen2", "linear-rope", "yarn",
        "yarn-attention-factor", "qwen2-yarn", "qwen2-linear"])
def test_llamacpp_gives_fusegrads_next_token_probabilities(overrides, dtype, tol, tmp_path):
    model = sharpened(Llama.from_preset("tiny", seed=6, vocab_size=258, **overrides))
    path = tmp_path / "m.gguf"
    export_model(model, path, "gguf", ByteTokenizer(), dtype)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 256, 24)]  # past the 16 original positions
    theirs, ours = as_array(llamacpp(path, ids)["probs"], 258), next_token_probs(model, ids)
    assert ours.max() > 0.1 and theirs.argmax() == ours.argmax()
    assert np.abs(theirs - ours).max() < tol


@pytest.mark.parametrize("dtype", ["bf16", "q5_0", "q4_0"])
def test_llamacpp_and_transformers_read_the_same_quantized_weights(dtype, tmp_path):
    """4- and 5-bit files are far from the float32 model by design: llama.cpp's probabilities are checked against
    transformers' GGUF loader on the same file (each dequantizes it on its own) instead."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = sharpened(Llama.from_preset("tiny", seed=6, vocab_size=258))
    export_model(model, tmp_path / "m.gguf", "gguf", ByteTokenizer(), dtype)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 256, 24)]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()
    p = np.exp(logits - logits.max())
    theirs = as_array(llamacpp(tmp_path / "m.gguf", ids)["probs"], 258)
    assert theirs.argmax() == p.argmax() and np.abs(theirs - p / p.sum()).max() < 3e-2


def test_rows_that_are_no_whole_number_of_blocks_stay_f16(tmp_path):
    """stories260K's hidden size 172 is no multiple of Q8_0's 32-value blocks: those tensors are written F16, as
    llama.cpp's converter falls back, and llama.cpp runs the file."""
    model = sharpened(Llama.from_preset("stories260K", seed=6, vocab_size=258), 10)
    export_model(model, tmp_path / "m.gguf", "gguf", ByteTokenizer(), "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 256, 24)]
    theirs, ours = as_array(llamacpp(tmp_path / "m.gguf", ids)["probs"], 258), next_token_probs(model, ids)
    assert theirs.argmax() == ours.argmax() and np.abs(theirs - ours).max() < 3e-2


def test_llamacpp_tokenizes_bytes_as_fusegrads_byte_tokenizer(tmp_path):
    """Every fusegrad run's default tokenizer, written as sentencepiece byte pieces: the same ids."""
    path = tmp_path / "byte.gguf"
    export_model(Llama.from_preset("tiny", seed=0, vocab_size=258), path, "gguf", ByteTokenizer(), "f32")
    assert llamacpp(path, texts=[TEXT])["tokens"] == [list(TEXT.encode("utf-8"))]


def test_llamacpp_tokenizes_as_sentencepiece_and_llama2c_tokenizers(sp_model_proto, sample_texts, tmp_path):
    """Llama 2's kind of tokenizer.model (sentencepiece BPE, byte fallback) and the llama2.c tokenizer.bin
    made from it: llama.cpp's ids are fusegrad's (which equal sentencepiece's, tests/data)."""
    for tokenizer in sentencepiece_and_llama2c(tmp_path, sp_model_proto):
        path = tmp_path / f"{tokenizer.kind}.gguf"
        model = Llama.from_preset("tiny", seed=0, vocab_size=tokenizer.vocab_size)
        export_model(model, path, "gguf", tokenizer, "f32")
        texts = sample_texts[:5]
        assert llamacpp(path, texts=texts)["tokens"] == [tokenizer.encode(t, bos=False, eos=False) for t in texts]


@pytest.mark.parametrize("steps", [
    None,  # the real SmolLM2 tokenizer as the test checkpoint carries it
    [("bytes", True)],  # GPT-2
    [("digits", None), ("bytes", True)],  # SmolLM, StarCoder
    [("split", LLAMA3_SPLIT), ("bytes", False)],  # Llama 3
    [("split", LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")), ("bytes", False)],  # Qwen2
], ids=["smollm2", "gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_llamacpp_splits_and_merges_text_as_the_tokenizer_json_does(steps, tmp_path):
    tokenizer = load_tokenizer(smollm2_dir() if steps is None else trained_bpe(tmp_path, steps))
    path = tmp_path / "bpe.gguf"
    export_model(Llama.from_preset("tiny", seed=0, vocab_size=tokenizer.vocab_size), path, "gguf", tokenizer, "f32")
    texts = [TEXT, "I'll say it's 12345 o'clock;  they're\n\n here. ÀÉÎ 你好 3.14"]
    assert llamacpp(path, texts=texts)["tokens"] == [tokenizer.encode(t, bos=False, eos=False) for t in texts]


@pytest.mark.parametrize("prepend", [True, False], ids=["prepend", "metaspace-never"])
def test_llamacpp_tokenizes_as_a_sentencepiece_style_tokenizer_json(prepend, tmp_path):
    """No tokenizer.model beside it: the pieces go to GGUF as sentencepiece ones, each scored by the rank of the
    merge that makes it, so llama.cpp's highest-score joins are the BPE merges; unknown characters fall back
    to bytes in both."""
    tokenizer = load_tokenizer(sentencepiece_style_bpe(tmp_path, prepend))
    path = tmp_path / "spm.gguf"
    export_model(Llama.from_preset("tiny", seed=0, vocab_size=tokenizer.vocab_size), path, "gguf", tokenizer, "f32")
    texts = [TEXT, "I'll say it's 12345 o'clock;  they're\n\n here. ÀÉÎ 你好 3.14", " the theta  thé"]
    assert llamacpp(path, texts=texts)["tokens"] == [tokenizer.encode(t, bos=False, eos=False) for t in texts]


def test_a_tokenizer_json_llamacpp_would_split_otherwise_is_refused(tmp_path):
    tokenizer = load_tokenizer(trained_bpe(tmp_path, [("split", r"\p{L}+|\s+"), ("bytes", False)]))
    with pytest.raises(fg.FormatError, match=r"pre-tokenizer .*Split.* has no llama\.cpp name here"):
        export_model(Llama.from_preset("tiny", vocab_size=tokenizer.vocab_size), tmp_path / "m.gguf", "gguf",
                     tokenizer, "f32")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize("dtype, tol", [("f16", 2e-3), ("q8_0", 6e-2)])
def test_the_real_smollm2_runs_in_llamacpp_as_in_fusegrad(dtype, tol, tmp_path):
    """SmolLM2-135M-Instruct exported with its tokenizer and chat template: llama.cpp's next token after a chat
    prompt is fusegrad's, with probabilities within 4e-4 in F16 (as in F32) and 0.03 in Q8_0 (measured); in F16
    its greedy reply, token by token through its KV cache, is fusegrad's `generate` at temperature 0."""
    model = Llama.from_pretrained(smollm2_dir())
    tokenizer = load_tokenizer(smollm2_dir())
    path = tmp_path / "smollm2.gguf"
    export_model(model, path, "gguf", tokenizer, dtype)
    ids = tokenizer.encode(chat_text(tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True))
    theirs, ours = as_array(llamacpp(path, ids)["probs"], 49152), next_token_probs(model, ids)
    assert theirs.argmax() == ours.argmax() and ours.max() > 0.1
    assert np.abs(theirs - ours).max() < tol
    if dtype == "f16":  # both stop at the end-of-turn id, which llama.cpp does not hand out
        reply = generate(model, ids, max_new_tokens=24, temperature=0.0, stop_ids=tokenizer.eos_ids)[len(ids):]
        assert reply[-1] in tokenizer.eos_ids and tokenizer.decode(reply[:-1]) == "The capital of France is Paris."
        assert llamacpp(path, ids, generate=24)["generated"] == reply[:-1]
