"""Model files: llama2.c v0/v1 and HF round trips, state dicts, presets, transformers-saved directories,
and bad input (corrupt files, configs, tokens) raising errors that name what is at fault."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import fusegrad as fg
from fusegrad.models import PRESETS, Llama, preset

torch.set_num_threads(1)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request):
    return Llama.from_preset("tiny", seed=1, tie_embeddings=request.param)


def assert_same_model(a, b):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=name)
    assert sorted(a.params) == sorted(b.params)


# -- round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, 1])
def test_llama2c_round_trip(model, version, tmp_path):
    path = tmp_path / "m.bin"
    model.save_llama2c(path, version=version)
    c = model.config
    n_floats = c.num_params() + (2 * c.max_seq_len * c.head_dim // 2 if version == 0 else 0)  # v0: freq_cis
    assert path.stat().st_size == (28 if version == 0 else 256) + 4 * n_floats
    head = path.read_bytes()[:40]
    if version == 1:
        assert struct.unpack_from("<Ii", head) == (0x616B3432, 1) and head[36] == int(c.tie_embeddings)
    else:
        assert struct.unpack_from("<i", head, 20)[0] == (c.vocab_size if c.tie_embeddings else -c.vocab_size)
    assert_same_model(model, Llama.from_pretrained(path))


def test_hf_round_trip_keeps_config(tmp_path):
    model = Llama.from_preset("tiny", seed=2, rope_theta=5000.0, norm_eps=1e-6, n_kv_heads=1)
    model.save_pretrained(tmp_path / "hf")
    loaded = Llama.from_pretrained(tmp_path / "hf")
    assert_same_model(model, loaded)
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9))
    assert float(model.loss(tokens).numpy()) == float(loaded.loss(tokens).numpy())


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_loaded_weights_share_one_aligned_block(model, quantize, tmp_path):
    # one allocation of 2 MiB pages for generation's weight stream; QLoRA's 4-bit bases stay outside it
    model.save_pretrained(tmp_path / "hf")
    loaded = Llama.from_pretrained(tmp_path / "hf", quantize=quantize)
    arrays = [t.data for t in loaded.params.values()]
    block = arrays[0].base
    assert block is not None and all(a.base is block for a in arrays)
    assert block.size < sum(a.size for a in arrays) + 16 * (len(arrays) + 1)  # only alignment padding
    assert all(a.ctypes.data % 64 == 0 and a.flags.c_contiguous for a in arrays)
    assert (set(loaded.quantized) == {n for n in model.params if n.rsplit(".", 1)[-1] in ("wqkv", "wo", "w13", "w2")}
            if quantize else loaded.quantized == {})
    if not quantize:
        assert_same_model(model, loaded)
    ends = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ends, ends[1:]))  # no two weights overlap


def test_state_dict_load_state_dict_round_trip(model):
    other = Llama.from_preset("tiny", seed=7, tie_embeddings=model.config.tie_embeddings)
    other.load_state_dict(model.state_dict())
    assert_same_model(model, other)
    assert all(t.dtype == np.float32 and t.data.flags.c_contiguous for t in other.params.values())


def test_state_dict_is_a_snapshot(model):
    """In-place training updates (p.data -= ...) must not reach a state dict taken earlier, nor a model
    loaded from it."""
    state = model.state_dict()
    other = Llama.from_preset("tiny", seed=7, tie_embeddings=model.config.tie_embeddings)
    other.load_state_dict(state)
    for t in model.parameters():
        t.data -= 1.0
    for name, arr in other.state_dict().items():
        np.testing.assert_array_equal(arr, state[name], err_msg=name)
        assert not np.shares_memory(arr, model.state_dict()[name])
    grads = {"norm": np.ones(model.config.dim, np.float32)}
    model.params["norm"].grad = grads["norm"]
    assert not np.shares_memory(model.grad_dict()["model.norm.weight"], grads["norm"])


def test_state_dict_splits_fused_weights_under_hf_names(model):
    c, state = model.config, model.state_dict()
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (c.kv_dim, c.dim)
    assert state["model.layers.1.mlp.up_proj.weight"].shape == (c.hidden_dim, c.dim)
    assert ("lm_head.weight" in state) != c.tie_embeddings
    # v and up are unpermuted slices of the fused weights
    np.testing.assert_array_equal(state["model.layers.0.self_attn.v_proj.weight"],
                                  model.params["layers.0.wqkv"].numpy()[c.dim + c.kv_dim:])
    np.testing.assert_array_equal(state["model.layers.1.mlp.up_proj.weight"],
                                  model.params["layers.1.w13"].numpy()[c.hidden_dim:])


@pytest.mark.parametrize("tied", [True, False])
def test_reads_a_directory_saved_by_transformers(tied, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=67, max_position_embeddings=16, rope_theta=5000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=tied)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).double()
    hf.float().save_pretrained(tmp_path)
    hf.double()
    model = Llama.from_pretrained(tmp_path, dtype=np.float64)
    assert (model.config.rope_theta, model.config.norm_eps, model.config.tie_embeddings) == (5000.0, 1e-6, tied)
    tokens = np.random.default_rng(0).integers(0, 67, (2, 12))
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(tokens)).logits.numpy()
    with fg.no_grad():
        got = model.logits(tokens).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)  # HF's RoPE tables are float32


def test_presets_have_the_llama2c_sizes():
    want = {  # FORMATS.md (llama2.c README): dim, layers, heads, kv heads, context; parameter count
        "stories260K": (64, 5, 8, 4, 512, 260e3), "stories15M": (288, 6, 6, 6, 256, 15e6),
        "stories42M": (512, 8, 8, 8, 1024, 42e6), "stories110M": (768, 12, 12, 12, 1024, 110e6)}
    for name, (dim, layers, heads, kv, ctx, n) in want.items():
        c = preset(name)
        assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.max_seq_len) == (dim, layers, heads, kv, ctx), name
        assert abs(c.num_params() - n) < 0.02 * n, (name, c.num_params())
    assert preset("stories15M").hidden_dim == 768 and preset("stories110M").hidden_dim == 2048
    assert {preset(n).vocab_size for n in ("stories15M", "stories42M", "stories110M")} == {32000}
    for name in ("tiny", "stories260K"):
        assert Llama.from_preset(name).num_params() == preset(name).num_params()
    assert "tiny" in PRESETS
    with pytest.raises(fg.ConfigError, match="unknown preset 'stories1B'"):
        preset("stories1B")


# -- bad files -----------------------------------------------------------------------------------------
@pytest.fixture
def bin_path(tmp_path):
    path = tmp_path / "model.bin"
    Llama.from_preset("tiny", seed=0).save_llama2c(path, version=0)
    return path


@pytest.mark.parametrize("delta", [-4, -1, 8])
def test_llama2c_wrong_size_names_file_and_sizes(bin_path, delta):
    raw = bin_path.read_bytes()
    bin_path.write_bytes(raw[:delta] if delta < 0 else raw + bytes(delta))
    with pytest.raises(fg.FormatError, match=rf"model\.bin: size {len(raw) + delta} bytes.*needs {len(raw)}"):
        Llama.from_pretrained(bin_path)


def test_llama2c_bad_headers(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(fg.FormatError, match=r"bad\.bin: too short \(10 bytes\)"):
        Llama.from_pretrained(path)
    path.write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, 32, 64, 1, 4, 4, 64, 8, 1).ljust(256, b"\0"))
    with pytest.raises(fg.FormatError, match=r"bad\.bin: llama2\.c export version 2 is not supported"):
        Llama.from_pretrained(path)
    path.write_bytes(b"GGUF" + bytes(range(200)))  # GGUF's magic: read as GGUF, whatever the file's name
    with pytest.raises(fg.FormatError, match=r"bad\.bin: GGUF version 50462976 is not supported"):
        Llama.from_pretrained(path)
    path.write_bytes(b"PK\x03\x04" + bytes(range(200)))  # some other format: read as v0, the header is nonsense
    with pytest.raises(fg.FormatError, match=r"bad\.bin: (implausible llama2\.c header|size)"):
        Llama.from_pretrained(path)
    path.write_bytes(struct.pack("<7i", 30, 64, 1, 4, 4, 64, 8) + bytes(100))  # dim 30 not divisible by 4 heads
    with pytest.raises(fg.FormatError, match=r"implausible llama2\.c header \(30, 64"):
        Llama.from_pretrained(path)
    path.write_bytes(struct.pack("<7i", 12, 64, 1, 4, 4, 64, 8) + bytes(100))  # head size 3 is odd
    with pytest.raises(fg.FormatError, match=r"bad\.bin: header \(12, 64.*not a valid Llama.*even size"):
        Llama.from_pretrained(path)
    with pytest.raises(fg.FormatError, match=r"nothing\.bin: no such model file"):
        Llama.from_pretrained(tmp_path / "nothing.bin")


@pytest.fixture
def hf_dir(tmp_path):
    Llama.from_preset("tiny", seed=0, tie_embeddings=False).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_hf_missing_config_key(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg["intermediate_size"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"config\.json: missing key 'intermediate_size'"):
        Llama.from_pretrained(hf_dir)


def test_hf_unreadable_or_unsupported_config(hf_dir):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(fg.FormatError, match=r"config\.json: cannot read the model config"):
        Llama.from_pretrained(hf_dir)
    (hf_dir / "config.json").unlink()
    with pytest.raises(fg.FormatError, match=r"config\.json"):
        Llama.from_pretrained(hf_dir)


def test_hf_invalid_llama_config(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(num_attention_heads=3, head_dim=None)  # 32 does not split into 3 heads
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"config\.json: not a valid Llama config.*n_heads 3"):
        Llama.from_pretrained(hf_dir)
    cfg.update(num_attention_heads=4, head_dim=7)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"config\.json: not a valid Llama config.*head_dim 7 is not an even"):
        Llama.from_pretrained(hf_dir)
    cfg.update(head_dim=16)  # a valid config (heads wider than hidden_size / heads), but not these tensors
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape "
                                             r"\(32, 32\), the config needs \(64, 32\)"):
        Llama.from_pretrained(hf_dir)


def test_llama2c_refuses_what_it_cannot_store(tmp_path):
    model = Llama.from_preset("tiny", rope_theta=5000.0)
    with pytest.raises(fg.FormatError, match=r"m\.bin: a llama2\.c file implies rope_theta 10000.*5000"):
        model.save_llama2c(tmp_path / "m.bin")
    assert not (tmp_path / "m.bin").exists()
    with pytest.raises(fg.FormatError, match="version must be 0 or 1, got 2"):
        Llama.from_preset("tiny").save_llama2c(tmp_path / "m.bin", version=2)


def test_hf_rope_scaling_fusegrad_cannot_run_is_refused(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "longrope", "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"config\.json: rope_scaling\.rope_type = 'longrope' is not supported"):
        Llama.from_pretrained(hf_dir)
    cfg["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0}  # llama3 runs, but needs all its fields
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"config\.json: rope_scaling of rope_type 'llama3' lacks.*low_freq"):
        Llama.from_pretrained(hf_dir)


def test_hf_missing_or_misshapen_tensor(hf_dir):
    st_path = hf_dir / "model.safetensors"
    state = load_file(st_path)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, st_path)
    with pytest.raises(fg.FormatError, match=r"hf \(\*\.safetensors\): no tensor 'model\.layers\.1\.mlp\.up_proj"):
        Llama.from_pretrained(hf_dir)
    save_file({k: v for k, v in state.items() if k != "lm_head.weight"}, st_path)  # config says untied
    with pytest.raises(fg.FormatError, match=r"no tensor 'lm_head\.weight'"):
        Llama.from_pretrained(hf_dir)
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:7].copy()
    save_file(bad, st_path)
    with pytest.raises(fg.FormatError, match=r"k_proj\.weight' has shape \(7, 32\), the config needs \(16, 32\)"):
        Llama.from_pretrained(hf_dir)


def test_hf_corrupt_or_absent_safetensors(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(fg.FormatError, match=r"model\.safetensors: corrupt safetensors file"):
        Llama.from_pretrained(hf_dir)
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(fg.FormatError, match=r"hf: no weights \(\*\.safetensors, or pytorch_model\*\.bin\)"):
        Llama.from_pretrained(hf_dir)


def test_load_state_dict_rejects_missing_and_misshapen(model):
    state = model.state_dict()
    del state["model.norm.weight"]
    with pytest.raises(fg.FormatError, match="model.norm.weight"):
        model.load_state_dict(state)
    state = model.state_dict()
    state["model.norm.weight"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match=r"model\.norm\.weight.*\(5,\)"):
        model.load_state_dict(state)


# -- bad tokens ----------------------------------------------------------------------------------------
def test_bad_tokens_raise_shape_errors():
    model = Llama.from_preset("tiny", seed=0)  # vocab 64, max_seq_len 32
    ok = np.zeros((2, 9), np.int64)
    with pytest.raises(fg.ShapeError, match="token id 64 is outside the vocabulary"):
        model.loss(np.where(np.arange(9) == 3, 64, ok))
    with pytest.raises(fg.ShapeError, match="token id 99 is outside the vocabulary"):
        model.loss(np.where(np.arange(9) == 8, 99, ok))  # only a target, never an input
    with pytest.raises(fg.ShapeError, match="token id -3"):
        model.loss(np.where(np.arange(9) == 0, -3, ok))
    with pytest.raises(fg.ShapeError, match=r"sequence length 33 must be in \[1, max_seq_len 32\]"):
        model.loss(np.zeros((1, 34), np.int64))
    model.loss(np.zeros((1, 33), np.int64))  # exactly max_seq_len inputs is fine
    with pytest.raises(fg.ShapeError, match=r"integer array .*float64"):
        model.loss(ok.astype(np.float64))
    with pytest.raises(fg.ShapeError, match=r"integer array .*\(9,\)"):
        model.loss(ok[0])
    with pytest.raises(fg.ShapeError, match="sequence length 0"):
        model.loss(np.zeros((2, 1), np.int64))


def test_llama2c_huge_seq_len_or_non_finite_weight_is_refused(tmp_path):
    path = tmp_path / "m.bin"
    Llama.from_preset("tiny").save_llama2c(path, version=1)
    raw = bytearray(path.read_bytes())
    raw[32:36] = struct.pack("<i", 2_000_000_000)  # seq_len: no RoPE table of 60 GiB is allocated
    path.write_bytes(bytes(raw))
    with pytest.raises(fg.FormatError, match=r"m\.bin: .*max_seq_len = 2000000000 is outside"):
        Llama.from_pretrained(path)
    model = Llama.from_preset("tiny")
    model.params["norm"].data[0] = np.nan
    model.save_llama2c(path)
    with pytest.raises(fg.FormatError, match=r"m\.bin: tensor 'norm' holds NaN or inf"):
        Llama.from_pretrained(path)


@pytest.mark.parametrize("key,value,message", [
    ("max_position_embeddings", 10 ** 12, "max_position_embeddings = 1000000000000 is outside"),
    ("num_attention_heads", 0, "num_attention_heads = 0 is outside"),
    ("vocab_size", [1], r"vocab_size = \[1\]: expected an integer"),
    ("rope_theta", float("nan"), "rope_theta = nan: expected a finite number"),
    ("rms_norm_eps", "x", "rms_norm_eps = 'x': expected a number"),
    ("num_hidden_layers", True, "num_hidden_layers = True: expected an integer")])
def test_hf_config_fields_are_checked_by_name(hf_dir, key, value, message):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg[key] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fg.FormatError, match=r"config\.json: " + message):
        Llama.from_pretrained(hf_dir)


def test_hf_non_utf8_config_or_bad_tensors_are_refused(hf_dir):
    st = hf_dir / "model.safetensors"
    s = load_file(st)
    s["model.norm.weight"] = s["model.norm.weight"].astype(np.int32)
    save_file(s, st)
    with pytest.raises(fg.FormatError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I32"):
        Llama.from_pretrained(hf_dir)
    s["model.norm.weight"] = np.full(32, np.inf, np.float32)
    save_file(s, st)
    with pytest.raises(fg.FormatError, match=r"model\.safetensors: tensor 'model\.norm\.weight' holds NaN or inf"):
        Llama.from_pretrained(hf_dir)
    with open(hf_dir / "config.json", "ab") as f:
        f.write(b"\xff")
    with pytest.raises(fg.FormatError, match=r"config\.json: cannot read the model config: 'utf-8' codec"):
        Llama.from_pretrained(hf_dir)
