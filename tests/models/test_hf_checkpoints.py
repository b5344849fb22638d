"""Hugging Face Llama-family checkpoints as published, made by transformers itself with random weights and
saved in bf16 (fp16, sharded): fusegrad's logits equal transformers' on the same files; what fusegrad
cannot run is refused naming the field, tensor or file."""
import json
import struct

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.models import Llama
from fusegrad.models.hf_names import to_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=67, max_position_embeddings=64)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
KINDS = {  # name -> (config class, model class, extra config)
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(rms_norm_eps=1e-5)),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True,
                                                          rope_parameters={"rope_type": "default", "rope_theta": 1e5})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # pruned as Minitron / Nemotron-Nano: heads keep their width, so n_heads x head_dim (64) > hidden_size
    "wide-heads": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, rms_norm_eps=1e-5)),
    "linear-rope": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                             "rope_theta": 1e4})),
    "yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={  # past 16 positions: 4x, ramp, mscale
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 1e4})),
    "yarn-mscale": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "rope_theta": 5e5,
        "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.9, "mscale_all_dim": 0.5})),
    # rescaled only past max_position_embeddings, where neither library runs a 64-position model here
    "dynamic-ntk": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                                             "rope_theta": 1e4})),
}


def make_checkpoint(path, kind, dtype=torch.bfloat16, **save_kw):
    cfg_cls, model_cls, extra = KINDS[kind]
    config = getattr(transformers, cfg_cls)(**{**SIZES, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():  # biases are zero at init: give them values so they count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.to(dtype).save_pretrained(path, **save_kw)
    return path


def transformers_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("kind", list(KINDS))
def test_logits_equal_transformers_on_bf16_checkpoints(kind, tmp_path):
    path = make_checkpoint(tmp_path / kind, kind)
    tokens = np.random.default_rng(0).integers(0, 67, (2, 64))  # past llama3's original 16, up to the 64 of all
    model = Llama.from_pretrained(path)
    scaling = {"llama3.2": "llama3", "linear-rope": "linear", "yarn": "yarn", "yarn-mscale": "yarn",
               "dynamic-ntk": "dynamic"}.get(kind)
    assert model.config.qkv_bias == (kind == "qwen2") and (model.config.rope_scaling or {}).get("type") == scaling
    with fg.no_grad():
        got = model.logits(tokens).numpy()
    np.testing.assert_allclose(got, transformers_logits(path, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("parameters", [
    LLAMA3, {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16.0, "beta_slow": 2.0,
     "mscale": 0.9, "mscale_all_dim": 0.5, "truncate": False},
    {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
    {"rope_type": "dynamic", "factor": 4.0},
], ids=["llama3", "linear", "yarn", "yarn-mscale-untruncated", "yarn-attention-factor", "dynamic-ntk"])
def test_rope_frequencies_and_attention_factor_equal_transformers(parameters, tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(**{**SIZES, "head_dim": 32, "max_position_embeddings": 64},
                                      rope_parameters={"rope_theta": 5e4, **parameters})
    inv_freq, attention = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](config, "cpu")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    ours = Llama.from_pretrained(tmp_path).config
    np.testing.assert_allclose(ours.rope_frequencies(), inv_freq.double().numpy(), rtol=1e-6)
    cos, _ = ours.rope_tables(np.float64)
    assert cos[0, 0] == pytest.approx(attention, rel=1e-6)  # cos(0) = 1, times the attention factor


def test_sharded_and_fp16_checkpoints_load(tmp_path):
    sharded = make_checkpoint(tmp_path / "sharded", "llama2", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    half = make_checkpoint(tmp_path / "half", "llama2", dtype=torch.float16)
    tokens = np.random.default_rng(1).integers(0, 67, (1, 12))
    for path in (sharded, half):
        with fg.no_grad():
            got = Llama.from_pretrained(path).logits(tokens).numpy()
        np.testing.assert_allclose(got, transformers_logits(path, tokens), rtol=1e-4, atol=1e-4)
    bf16 = Llama.from_pretrained(sharded).state_dict()["model.layers.0.mlp.up_proj.weight"]
    raw = (bf16.view(np.uint32) & 0xFFFF)  # bf16 widened exactly: the low 16 bits are zero
    assert bf16.dtype == np.float32 and not raw.any()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    (sharded / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(fg.FormatError, match=r"index\.json: weight_map names shard 'model-0000\d-of"):
        Llama.from_pretrained(sharded)


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["GemmaForCausalLM"]}, r"architectures = \['GemmaForCausalLM'\] is not supported"),
    ({"model_type": "gpt2", "architectures": None}, r"model_type = 'gpt2' is not supported"),
    ({"sliding_window": 16}, r"sliding_window = 16 is not supported.*shorter than max_position_embeddings 64"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0}}, r"rope_parameters\.rope_type = 'longrope'"),
    ({"hidden_act": "gelu"}, r"hidden_act = 'gelu' is not supported"),
    ({"attention_bias": True}, r"attention_bias = True is not supported"),
])
def test_unsupported_configs_are_refused_naming_field_and_value(change, match, tmp_path):
    path = make_checkpoint(tmp_path / "m", "mistral")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"config\.json: " + match):
        Llama.from_pretrained(path)


def _rewrite_tensor(path, name, dtype_tag=None, data=None):
    """Edit one tensor of a safetensors file in place: its header dtype tag or its bytes."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    lo, hi = header[name]["data_offsets"]
    if dtype_tag:
        header[name]["dtype"] = dtype_tag
        blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(blob) == n
        raw[8:8 + n] = blob
    if data is not None:
        raw[8 + n + lo:8 + n + lo + len(data)] = data
    path.write_bytes(bytes(raw))


def test_bad_tensors_are_refused_naming_the_tensor(tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama2")
    st = path / "model.safetensors"
    good = st.read_bytes()
    _rewrite_tensor(st, "model.norm.weight", data=b"\x80\x7f")  # bf16 +inf as its first value
    with pytest.raises(fg.FormatError, match=r"model\.safetensors: tensor 'model\.norm\.weight' holds NaN or inf"):
        Llama.from_pretrained(path)
    st.write_bytes(good)
    _rewrite_tensor(st, "model.norm.weight", dtype_tag="I16")  # same size, not a float: never cast
    with pytest.raises(fg.FormatError, match=r"tensor 'model\.norm\.weight' has dtype I16"):
        Llama.from_pretrained(path)
    st.write_bytes(good)
    _rewrite_tensor(st, "model.norm.weight", dtype_tag="F32")  # the byte range no longer fits the shape
    with pytest.raises(fg.FormatError, match=r"corrupt safetensors file: tensor 'model\.norm\.weight' F32 \(32,\)"):
        Llama.from_pretrained(path)
    st.write_bytes(good[:-10])  # truncated: caught from the header, before anything is read
    with pytest.raises(fg.FormatError, match=r"model\.safetensors: corrupt safetensors file"):
        Llama.from_pretrained(path)
    st.write_bytes(struct.pack("<Q", 1 << 40) + good[8:])
    with pytest.raises(fg.FormatError, match=r"header length 1099511627776 for a \d+-byte file"):
        Llama.from_pretrained(path)


def test_saved_bf16_directory_loads_in_transformers(tmp_path):
    model = Llama.from_pretrained(make_checkpoint(tmp_path / "src", "llama3.2"))
    model.save_pretrained(tmp_path / "out", dtype="bfloat16")
    tokens = np.random.default_rng(2).integers(0, 67, (1, 30))
    with fg.no_grad():
        ours = model.logits(tokens).numpy()  # the source was bf16: its values survive bf16 exactly
    np.testing.assert_allclose(transformers_logits(tmp_path / "out", tokens), ours, rtol=1e-4, atol=1e-4)


def test_dynamic_ntk_saves_as_transformers_reads_it_and_never_runs_past_its_length(tmp_path):
    """Saved again, transformers reads the same dynamic scaling with the same threshold (max_position_embeddings);
    a fusegrad model may not be longer than the length past which the base would change; GGUF refuses it."""
    model = Llama.from_pretrained(make_checkpoint(tmp_path / "in", "dynamic-ntk"))
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0} and saved["max_position_embeddings"] == 64
    tokens = np.random.default_rng(2).integers(0, 67, (1, 64))
    with fg.no_grad():
        np.testing.assert_allclose(model.logits(tokens).numpy(), transformers_logits(tmp_path / "out", tokens),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(fg.ConfigError, match=r"dynamic NTK RoPE rescales its base past original_max_len 64 "
                                             r"positions.*max_seq_len 128 must not exceed it"):
        fg.models.LlamaConfig(**{**model.config.to_dict(), "max_seq_len": 128})
    from fusegrad.models.export import export_model
    with pytest.raises(fg.FormatError, match=r"llama\.cpp has no dynamic NTK RoPE"):
        export_model(model, tmp_path / "m.gguf", "gguf", None, "f32")


def test_heads_wider_than_hidden_size_train_save_and_quantize_as_transformers_does(tmp_path):
    """q_proj (64, 32) and o_proj (32, 64) at hidden_size 32: the loss's grads equal torch autograd's through
    transformers, the saved directory loads in transformers, NF4 keeps each module's rows in place, and a
    llama2.c file, which cannot say head_dim, is refused."""
    path = make_checkpoint(tmp_path / "wide", "wide-heads", dtype=torch.float32)
    tokens = np.random.default_rng(3).integers(0, 67, (2, 17))
    model = Llama.from_pretrained(path)
    assert (model.config.head_dim, model.config.q_dim, model.params["layers.0.wqkv"].shape) == (16, 64, (128, 32))
    loss = model.loss(tokens)
    loss.backward()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.as_tensor(tokens)
    ref = torch.nn.functional.cross_entropy(hf(input_ids=ids[:, :-1]).logits.reshape(-1, 67), ids[:, 1:].reshape(-1))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    ours = to_hf({n: t.grad for n, t in model.params.items()}, model.config)
    theirs = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    assert set(ours) == set(theirs) and ours["model.layers.1.self_attn.o_proj.weight"].shape == (32, 64)
    for name, g in theirs.items():
        np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-6, err_msg=name)

    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 16
    with fg.no_grad():
        logits = model.logits(tokens).numpy()
    np.testing.assert_allclose(transformers_logits(tmp_path / "out", tokens), logits, rtol=1e-4, atol=1e-4)
    nf4 = Llama.from_pretrained(path, quantize="nf4").state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        w = hf.state_dict()[name].detach().numpy()  # within NF4's rounding of each row block (rows unpermuted)
        assert nf4[name].shape == w.shape and np.abs(nf4[name] - w).max() < 0.15 * np.abs(w).max()
    with pytest.raises(fg.FormatError, match=r"m\.bin: a llama2\.c file implies head_dim = dim / n_heads "
                                             r"\(32 / 4\), this model has head_dim 16"):
        model.save_llama2c(tmp_path / "m.bin")


def test_damaged_headers_and_configs_raise_only_format_errors(tmp_path):
    """Every byte of the safetensors header and of config.json changed in turn (a sample): a FormatError
    or a model that still loads, never another exception."""
    path = make_checkpoint(tmp_path / "m", "qwen2")
    st, cfg = path / "model.safetensors", path / "config.json"
    good_st, good_cfg = st.read_bytes(), cfg.read_bytes()
    n = struct.unpack_from("<Q", good_st)[0]
    rng = np.random.default_rng(0)
    for target, good, hi in [(st, good_st, 8 + n), (cfg, good_cfg, len(good_cfg))]:
        for pos in rng.choice(hi, size=60, replace=False):
            for byte in (b"0", b"]", b"\xff"):
                target.write_bytes(good[:pos] + byte + good[pos + 1:])
                try:
                    Llama.from_pretrained(path)
                except fg.FormatError:
                    pass
        target.write_bytes(good)
    index = path / "model.safetensors.index.json"
    for weight_map in ({"model.norm.weight": 3}, {"model.norm.weight": "../model.safetensors"}, []):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(fg.FormatError, match=r"index\.json: (weight_map names|cannot read)"):
            Llama.from_pretrained(path)
