"""export_model: GGUF read by the gguf package and by transformers' GGUF loader (same logits per dtype, same
token ids), Hugging Face directories loaded by transformers with their tokenizer, chat template and
generation config, llama2.c version 0 with tokenizer.bin read back."""
import json
import struct

import gguf
import numpy as np
import pytest

import fusegrad as fg
from fusegrad.data.tokenizer import Llama2cTokenizer, load_tokenizer, read_tokenizer_bin
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from tests.real_checkpoint import smollm2_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

TEXTS = ("Once upon a time, there was", "  def f(x):\n\treturn x ** 2  # é <|im_end|>")
MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(smollm2_dir())  # SmolLM2's byte-level BPE: 49152 tokens, ChatML, two eos ids


@pytest.fixture(scope="module")
def model():  # tiny, with SmolLM2's vocabulary; untied so output.weight is written too
    return Llama.from_preset("tiny", seed=4, vocab_size=49152, rope_theta=1e5, tie_embeddings=False)


def our_logits(model, tokens):
    with fg.no_grad():
        return model.logits(np.array([tokens])).numpy()[0]


def their_logits(path, tokens, **kw):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    with torch.no_grad():
        return hf(input_ids=torch.as_tensor([tokens])).logits.numpy()[0]


@pytest.mark.parametrize("dtype, atol", [("f32", 1e-5), ("f16", 2e-3), ("bf16", 3e-3), ("q8_0", 2e-2), ("q5_0", 5e-2),
                                         ("q4_0", 1e-1)])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_in_transformers_with_the_same_logits(dtype, atol, tied, tmp_path):
    model = Llama.from_preset("tiny", seed=4, rope_theta=1e5, tie_embeddings=tied)
    path = tmp_path / f"m-{dtype}.gguf"
    export_model(model, path, "gguf", None, dtype)  # no tokenizer: transformers reads its metadata slowly
    reader = gguf.GGUFReader(path)
    # "none": llama.cpp's type for a file without a vocabulary (without the key llama.cpp refuses the file)
    for key, value in (("general.architecture", "llama"), ("tokenizer.ggml.model", "none")):
        field = reader.fields[key]
        assert bytes(field.parts[field.data[0]]).decode() == value
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["blk.1.ffn_norm.weight"] == "F32"
    assert ("output.weight" in types) != tied and len(types) == 2 + (not tied) + 9 * model.config.n_layers
    ids = list(np.random.default_rng(0).integers(0, 64, 20))
    np.testing.assert_allclose(their_logits(tmp_path, ids, gguf_file=path.name), our_logits(model, ids), atol=atol)


def test_gguf_of_a_qwen2_model_is_qwen2_with_its_biases_and_loads_in_transformers(tmp_path):
    """q/k/v biases make the file llama.cpp's qwen2, whose RoPE rotates halves: q/k rows and biases go in
    Hugging Face's order, and transformers' qwen2 GGUF loader gives the same logits."""
    model = Llama.from_preset("tiny", seed=7, qkv_bias=True, rope_theta=1e6)
    path = tmp_path / "qwen.gguf"
    export_model(model, path, "gguf", None, "f32")
    reader = gguf.GGUFReader(path)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "qwen2"
    assert {t.name for t in reader.tensors} >= {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"}
    ids = list(np.random.default_rng(2).integers(0, 64, 20))
    np.testing.assert_allclose(their_logits(tmp_path, ids, gguf_file=path.name), our_logits(model, ids), atol=1e-5)


def test_gguf_of_heads_wider_than_the_embedding_says_their_size(tmp_path):
    """n_heads x head_dim (64) > dim (32): llama.cpp reads the head size from key_length / value_length,
    transformers from rope.dimension_count; both are written, and transformers gives the same logits."""
    model = Llama.from_preset("tiny", seed=5, rope_theta=1e5, head_dim=16)
    path = tmp_path / "wide.gguf"
    export_model(model, path, "gguf", None, "f32")
    fields = gguf.GGUFReader(path).fields
    sizes = {k: int(fields[f"llama.{k}"].parts[-1][0]) for k in ("attention.key_length", "attention.value_length",
                                                                  "rope.dimension_count", "embedding_length")}
    assert sizes == {"attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16,
                     "embedding_length": 32}
    ids = list(np.random.default_rng(1).integers(0, 64, 20))
    np.testing.assert_allclose(their_logits(tmp_path, ids, gguf_file=path.name), our_logits(model, ids), atol=1e-5)


def test_gguf_tokenizer_metadata_gives_transformers_the_same_tokenizer(model, tokenizer, tmp_path):
    export_model(model, tmp_path / "m.gguf", "gguf", tokenizer, "f32")
    ids = tokenizer.encode(TEXTS[0])
    np.testing.assert_allclose(their_logits(tmp_path, ids, gguf_file="m.gguf"), our_logits(model, ids), atol=1e-5)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS:
        assert theirs.encode(text) == tokenizer.encode(text)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (tokenizer.bos_id, tokenizer.eos_ids[0])
    assert theirs.chat_template == tokenizer.chat_template


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-5), ("bfloat16", 5e-2)])
def test_hf_export_loads_in_transformers_with_tokenizer_template_and_generation_config(model, tokenizer, dtype,
                                                                                       atol, tmp_path):
    export_model(model, tmp_path, "hf", tokenizer, dtype)
    ids = tokenizer.encode(TEXTS[0])
    np.testing.assert_allclose(their_logits(tmp_path, ids), our_logits(model, ids), atol=atol)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert theirs.encode(text) == tokenizer.encode(text)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False) == \
        transformers.AutoTokenizer.from_pretrained(smollm2_dir()).apply_chat_template(MESSAGES, tokenize=False)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert (gen.bos_token_id, eos) == (tokenizer.bos_id, list(tokenizer.eos_ids))
    assert json.loads((tmp_path / "config.json").read_text())["bos_token_id"] == tokenizer.bos_id


def test_llama2c_export_is_version_0_with_tokenizer_bin(tmp_path):
    model = Llama.from_preset("tiny", seed=6)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [bytes([97 + i % 26]) * (1 + i // 26) for i in range(61)]
    tok = Llama2cTokenizer(pieces, [-float(i) for i in range(64)])
    written = export_model(model, tmp_path / "model.bin", "llama2c", tok)
    assert written == [str(tmp_path / "model.bin"), str(tmp_path / "tokenizer.bin")]
    c = model.config
    assert struct.unpack_from("<7i", (tmp_path / "model.bin").read_bytes()) == \
        (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.max_seq_len)
    back = Llama.from_pretrained(tmp_path / "model.bin")
    for name, a in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name], a, err_msg=name)
    assert read_tokenizer_bin(tmp_path / "tokenizer.bin") == (tok.pieces, [np.float32(s) for s in tok.scores])


def test_llama2c_export_writes_no_tokenizer_bin_for_byte_level_bpe(model, tokenizer, tmp_path):
    model = Llama.from_preset("tiny", seed=6, vocab_size=49152)
    assert export_model(model, tmp_path / "m.bin", "llama2c", tokenizer) == [str(tmp_path / "m.bin")]
    assert not (tmp_path / "tokenizer.bin").exists()


def test_export_refuses_what_it_cannot_write(model, tmp_path):
    with pytest.raises(fg.ConfigError, match="format must be one of hf, llama2c, gguf, got 'onnx'"):
        export_model(model, tmp_path / "m", "onnx")
    with pytest.raises(fg.ConfigError, match="GGUF dtype must be one of f32, f16, bf16, q8_0, q5_0, q4_0, q2_k, "
                                            "q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, got 'q4_k'"):
        export_model(model, tmp_path / "m.gguf", "gguf", dtype="q4_k")
    with pytest.raises(fg.ConfigError, match="llama2.c files hold float32 only"):
        export_model(model, tmp_path / "m.bin", "llama2c", dtype="f16")
    for qwen in (Llama.from_preset("tiny", seed=0, qkv_bias=True, head_dim=16),
                 Llama.from_preset("tiny", seed=0, qkv_bias=True, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0,
                                                                                "high_freq_factor": 4.0,
                                                                                "original_max_len": 16})):
        with pytest.raises(fg.FormatError, match=r"q\.gguf: llama\.cpp's qwen2 is written here .*head_dim = dim / "
                                                 r"n_heads and without Llama 3\.1 RoPE scaling only"):
            export_model(qwen, tmp_path / "q.gguf", "gguf")
    yarn = Llama.from_preset("tiny", seed=0, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_len": 8,
                                                           "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.3,
                                                           "truncate": False})
    with pytest.raises(fg.FormatError, match=r"y\.gguf: llama\.cpp's YaRN takes its range truncated"):
        export_model(yarn, tmp_path / "y.gguf", "gguf")
    broken = Llama.from_preset("tiny", seed=0)
    broken.params["layers.1.w13"].data[3, 5] = np.nan
    with pytest.raises(fg.FormatError, match=r"b\.gguf: blk\.1\.ffn_gate\.weight holds NaN or inf"):
        export_model(broken, tmp_path / "b.gguf", "gguf")  # and no file, nor its temporary, is left
    adapted = Llama.from_preset("tiny", seed=0)
    attach_lora(adapted, LoraConfig(targets=("q",), r=2))
    with pytest.raises(fg.ConfigError, match="unmerged adapters"):
        export_model(adapted, tmp_path / "a", "hf")
    assert not list(tmp_path.iterdir())
