"""fusegrad's K-quant GGUF exports are llama.cpp's own: `--dtype q4_k_m` (and every other MIXES) writes every
tensor in the type and with the bytes llama-quantize gives the same model's F32 export (libllama's
llama_model_quantize through ctypes), for small models that reach each of llama.cpp's rules and for the real
SmolLM2-135M; and llama.cpp runs such files with the probabilities fusegrad reads back from them."""
import gguf
import numpy as np
import pytest

from fusegrad.data.tokenizer import ByteTokenizer
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from fusegrad.models.gguf_types import MIXES, use_more_bits
from tests.llamacpp import as_array, llamacpp, next_token_probs, sharpened
from tests.llamacpp_lib import llama_quantize
from tests.real_checkpoint import smollm2_dir


def contents(path) -> tuple:
    """({name: (GGML type name, bytes)} of a GGUF file's tensors, (file type, quantization version))."""
    reader = gguf.GGUFReader(path)  # seconds for a real vocabulary: read once
    versions = tuple(reader.fields[k].parts[-1].tolist() for k in ("general.file_type", "general.quantization_version"))
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in reader.tensors}, versions


def assert_llama_quantize_writes_it(model, tokenizer, mix, tmp_path) -> dict:
    """fusegrad's `mix` export of `model` equals llama-quantize's of its F32 export -> {tensor: type}."""
    export_model(model, tmp_path / "f32.gguf", "gguf", tokenizer, "f32")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", mix)
    export_model(model, tmp_path / "ours.gguf", "gguf", tokenizer, mix)
    (theirs, their_versions), (ours, our_versions) = (contents(tmp_path / f"{who}.gguf") for who in ("theirs", "ours"))
    assert our_versions == their_versions
    assert sorted(ours) == sorted(theirs)
    assert {n: t for n, (t, _) in ours.items()} == {n: t for n, (t, _) in theirs.items()}
    assert [n for n in ours if ours[n][1] != theirs[n][1]] == []
    return {n: t for n, (t, _) in ours.items()}


MODELS = {  # overrides of the tiny preset
    "gqa-untied": dict(dim=256, n_layers=10, n_heads=4, n_kv_heads=2, hidden_dim=512, tie_embeddings=False),
    "tied-fallbacks": dict(dim=256, n_layers=9, n_heads=8, n_kv_heads=2, hidden_dim=320),  # ffn_down rows of 320
    "80-layers": dict(dim=32, n_layers=80, n_heads=4, n_kv_heads=2, hidden_dim=200),  # "70B": attn_v Q5_K; F16
    "80-layers-qwen2": dict(dim=32, n_layers=80, n_heads=4, n_kv_heads=4, hidden_dim=64, qkv_bias=True),
    "80-layers-mha": dict(dim=32, n_layers=80, n_heads=4, n_kv_heads=4, hidden_dim=64),  # no 70B in llama's MHA
}
CASES = [(m, mix) for m in ("gqa-untied", "tied-fallbacks") for mix in MIXES] + [
    ("80-layers", "q4_k_m"), ("80-layers", "q4_k_s"), ("80-layers", "q2_k"), ("80-layers", "q3_k_s"),
    ("80-layers-qwen2", "q4_k_m"), ("80-layers-mha", "q4_k_m"), ("80-layers-mha", "q3_k_m")]


@pytest.mark.parametrize("name, mix", CASES, ids=[f"{m}-{x}" for m, x in CASES])
def test_every_tensor_is_what_llama_quantize_writes(name, mix, tmp_path):
    model = Llama.from_preset("tiny", seed=3, vocab_size=258, **MODELS[name])
    types = assert_llama_quantize_writes_it(model, ByteTokenizer(), mix, tmp_path)
    assert types["blk.0.attn_norm.weight"] == "F32"
    if name == "gqa-untied" and mix == "q4_k_m":  # the rules at work, as llama-quant.cpp states them
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(10)] == [
            "Q6_K" if use_more_bits(i, 10) else "Q4_K" for i in range(10)]
        assert types["blk.3.ffn_down.weight"] == "Q6_K" and types["blk.2.ffn_down.weight"] == "Q4_K"
    if name == "tied-fallbacks" and mix == "q5_k_m":
        assert types["token_embd.weight"] == "Q6_K" and types["blk.0.ffn_down.weight"] == "Q8_0"  # Q6_K's fallback
        assert types["blk.1.ffn_down.weight"] == "Q5_1" and types["blk.1.attn_q.weight"] == "Q5_K"
    if name == "80-layers" and mix == "q4_k_m":
        assert types["blk.11.attn_v.weight"] == "Q5_1" and types["blk.0.ffn_down.weight"] == "F16"  # Q5_K -> Q5_1
    if name == "gqa-untied" and mix == "q2_k":  # 2 heads a kv head: attn_v Q3_K
        assert types["blk.4.attn_v.weight"] == types["blk.4.ffn_down.weight"] == "Q3_K"
        assert types["blk.4.attn_output.weight"] == "Q3_K" and types["blk.4.attn_q.weight"] == "Q2_K"
        assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q2_K"
    if name == "tied-fallbacks" and mix == "q2_k":  # 4 heads a kv head: attn_v Q4_K; rows of 320: Q3_K -> Q4_0
        assert types["blk.4.attn_v.weight"] == "Q4_K" and types["blk.4.ffn_down.weight"] == "Q4_0"
    if name == "gqa-untied" and mix == "q3_k_m":
        assert [types[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
        assert types["blk.0.ffn_down.weight"] == types["blk.9.attn_output.weight"] == "Q4_K"
        assert types["blk.9.ffn_up.weight"] == "Q3_K"
    if name == "80-layers-mha" and mix == "q3_k_m":  # the first 80 / 16 ffn_down Q5_K (rows of 64: Q5_1)
        assert [types[f"blk.{i}.ffn_down.weight"] for i in (4, 5)] == ["Q5_1", "Q5_0"]  # Q4_K after
    if name == "80-layers" and mix == "q3_k_s":  # 70B: attn_v Q3_K -> Q5_K (rows of 32: Q5_1)
        assert types["blk.0.attn_v.weight"] == "Q5_1" and types["blk.0.attn_q.weight"] == "Q4_0"


@pytest.mark.parametrize("mix", ["q4_k_m", "q2_k"])
def test_smollm2_is_what_llama_quantize_writes(mix, tmp_path):
    """The real SmolLM2-135M (rows of 576: most tensors fall back to Q5_0 in q4_k_m, Q4_0 in q2_k, the tied
    token_embd and the Q6_K attn_v to Q8_0; ffn_down's rows of 1536 take Q4_K / Q6_K, or Q3_K): the whole file as
    llama-quantize writes it."""
    model = Llama.from_pretrained(smollm2_dir())
    types = assert_llama_quantize_writes_it(model, None, mix, tmp_path)  # its 49152 tokens: seconds to read
    down = {types[f"blk.{i}.ffn_down.weight"] for i in range(30)}
    assert down == ({"Q4_K", "Q6_K"} if mix == "q4_k_m" else {"Q3_K"}) and types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == ("Q5_0" if mix == "q4_k_m" else "Q4_0")


@pytest.mark.parametrize("mix", ["q2_k", "q3_k_m", "q4_k_m", "q5_k_s", "q6_k"])
def test_llamacpp_gives_the_probabilities_fusegrad_reads_from_the_file(mix, tmp_path):
    """llama.cpp multiplies K-quant weights with activations quantized to 8 bits in blocks of 256 (Q8_K): 0.01 to
    0.02 from fusegrad's float32 product on these weights (measured), 0.08 to 0.27 on weights sharpened 20 times."""
    model = sharpened(Llama.from_preset("tiny", seed=6, vocab_size=258, dim=256, n_heads=4, n_kv_heads=2,
                                        hidden_dim=512, n_layers=3), 8)
    export_model(model, tmp_path / "m.gguf", "gguf", ByteTokenizer(), mix)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 256, 20)]
    theirs, ours = as_array(llamacpp(tmp_path / "m.gguf", ids)["probs"], 258), next_token_probs(
        Llama.from_pretrained(tmp_path / "m.gguf"), ids)
    assert ours.max() > 0.1 and theirs.argmax() == ours.argmax()
    assert np.abs(theirs - ours).max() < 3e-2
