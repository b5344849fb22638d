"""Generation through the model's own forward with a KV cache: against the full forward, the merged
LoRA model, the numpy backend (from torch:cpu) and in float32."""
import numpy as np
import pytest

import fusegrad as fg
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.finetune.qlora import attach_qlora
from fusegrad.models import Llama
from fusegrad.models.generate import generate, sample_token


@pytest.fixture(scope="module")
def model():
    return Llama.from_preset("tiny", seed=3)


def test_kv_cache_logits_equal_the_full_forward(model):
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, 20))
    with fg.no_grad():
        full = model.logits(tokens).numpy()[0]  # (T, V)
    cache = model.new_cache(1, 20)
    np.testing.assert_allclose(model.logits(tokens[:, :12], cache=cache).numpy()[0, -1], full[11], atol=1e-5)
    for j in range(12, 20):
        np.testing.assert_allclose(model.logits(tokens[:, j:j + 1], cache=cache).numpy()[0, -1], full[j], atol=1e-5)
    assert cache.length == 20


def test_cached_forward_of_a_batch_in_pieces_equals_the_full_forward(model):
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 11))
    with fg.no_grad():
        full = model.logits(tokens).numpy()
    cache = model.new_cache(3, 11)
    pieces = [model.logits(tokens[:, lo:hi], cache=cache).numpy() for lo, hi in [(0, 4), (4, 5), (5, 11)]]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    assert pieces[0].dtype == np.float32 and cache.k[0].shape == (3, 2, 11, 8)  # sized as asked, not max_seq_len
    with pytest.raises(fg.ShapeError, match="sequence length 12 must be in .*cache's 11"):
        model.logits(tokens[:, :1], cache=cache)


def test_generation_computes_in_float32(model, monkeypatch):
    seen = []
    be = model.params["norm"].backend
    inner = be.attention_cached
    monkeypatch.setattr(be, "attention_cached", lambda *a: seen.append(inner(*a).dtype) or inner(*a), raising=False)
    generate(model, [1, 2], max_new_tokens=3, temperature=0.0)
    assert seen and set(seen) == {np.dtype(np.float32)}


def test_greedy_generation_follows_the_argmax_of_the_full_forward(model):
    out = generate(model, [1, 5], max_new_tokens=6, temperature=0.0)
    with fg.no_grad():
        logits = model.logits(np.array([out[:-1]])).numpy()[0]
    assert out[2:] == [int(i) for i in logits[1:].argmax(-1)]


def _trained_lora(seed=0):
    model = Llama.from_preset("tiny", seed=seed)
    lora = attach_lora(model, LoraConfig(targets="all", r=4, alpha=8, seed=1))
    rng = np.random.default_rng(2)
    for t in lora.parameters():  # B = 0 at init: give the adapters something to say
        t.data[...] = rng.normal(0.0, 0.3, t.shape)
    return model, lora


def test_unmerged_lora_generates_like_the_merged_model():
    model, lora = _trained_lora()
    prompt = [1, 9, 4]
    unmerged = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    plain = generate(Llama.from_preset("tiny", seed=0), prompt, max_new_tokens=12, temperature=0.0)
    lora.merge()
    assert not model.adapters
    assert unmerged == generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert unmerged != plain  # the adapters do change what the model says


def test_qlora_model_generates_like_its_own_forward():
    model = Llama.from_preset("tiny", seed=0)
    attach_qlora(model, LoraConfig(targets=("q", "v"), r=4))
    assert "layers.0.wqkv" not in model.params
    out = generate(model, [1, 5], max_new_tokens=6, temperature=0.0)
    with fg.no_grad():
        logits = model.logits(np.array([out[:-1]])).numpy()[0]
    assert len(out) == 8 and out[2:] == [int(i) for i in logits[1:].argmax(-1)]


def test_torch_cpu_generation_equals_numpy():
    torch = pytest.importorskip("torch")
    pytest.importorskip("array_api_compat")
    host = Llama.from_preset("tiny", seed=5)
    dev = Llama.from_preset("tiny", seed=5, backend="torch:cpu")  # the same weights, made on the device
    assert isinstance(dev.params["norm"].data, torch.Tensor)
    prompt = [3, 1, 4, 1, 5]
    out = generate(dev, prompt, max_new_tokens=15, temperature=0.0)
    assert isinstance(dev.new_cache(1, 4).k[0], torch.Tensor)
    assert out == generate(host, prompt, max_new_tokens=15, temperature=0.0)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    draws = {sample_token(logits, np.random.default_rng(s), 1.0, top_p=0.7) for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never drawn
    a = generate(Llama.from_preset("tiny", seed=1), [1], 10, temperature=1.0, seed=7)
    b = generate(Llama.from_preset("tiny", seed=1), [1], 10, temperature=1.0, seed=7)
    assert a == b


def test_generation_stops_at_the_context_limit_and_checks_ids(model):
    out = generate(model, [1] * 30, max_new_tokens=50, temperature=0.0)
    assert len(out) == model.config.max_seq_len
    with pytest.raises(fg.ShapeError, match="token id 99"):
        generate(model, [1, 99], 3)
    with pytest.raises(fg.ShapeError, match="at least one token"):
        generate(model, [], 3)


def test_generation_stops_at_any_stop_id(model):
    free = generate(model, [1, 5], max_new_tokens=10, temperature=0.0)

    def cut(stops):  # up to and including the first new token that is a stop id
        j = next(j for j in range(2, len(free)) if free[j] in stops)
        return free[:j + 1]
    stops = [free[-1], free[4]]
    assert generate(model, [1, 5], max_new_tokens=10, temperature=0.0, stop_ids=stops) == cut(stops)
    assert generate(model, [1, 5], max_new_tokens=10, temperature=0.0, stop_id=free[-1]) == cut([free[-1]])
    assert len(cut(stops)) < len(free)


def test_generation_on_the_decode_kernels_equals_the_reference_backend():
    """The JitBackend's cached attention (its serial twin at a decode step, the parallel kernel for the prompt)
    in a whole model: the same logits and tokens as the reference kernels of the plain NumpyBackend."""
    pytest.importorskip("numba")
    from fusegrad.backends.numpy_backend import NumpyBackend

    config = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=512, max_seq_len=200)
    ours = Llama.from_preset("tiny", seed=4, **config)
    reference = Llama.from_preset("tiny", seed=4, backend=NumpyBackend(), **config)
    assert type(ours.backend).__name__ == "JitBackend"
    prompt = [int(t) for t in np.random.default_rng(4).integers(0, 512, 150)]  # 4 x 150 x 150 x 32 > 2^16
    out = generate(ours, prompt, max_new_tokens=12, temperature=0.0)
    assert out == generate(reference, prompt, max_new_tokens=12, temperature=0.0)
    cache, ref_cache = ours.new_cache(1, 160), reference.new_cache(1, 160)
    for lo, hi in [(0, 150), (150, 151), (151, 152)]:
        tokens = np.array([out[lo:hi]])
        np.testing.assert_allclose(ours.logits(tokens, cache).numpy(), reference.logits(tokens, ref_cache).numpy(),
                                   rtol=1e-4, atol=1e-5)


# -- sampling settings, against transformers' logits processors -------------------------------------------
SETTINGS = [dict(temperature=0.7), dict(temperature=1.3, top_k=5), dict(temperature=1.0, top_p=0.8),
            dict(temperature=0.6, top_p=0.9, top_k=20), dict(temperature=1.0, min_p=0.1),
            dict(temperature=0.9, top_k=8, top_p=0.95, min_p=0.05, repetition_penalty=1.3),
            dict(temperature=1.0, repetition_penalty=0.8)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_sampling_distribution_equals_transformers_logits_processors(settings):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fusegrad.models.generate import Sampling

    rng = np.random.default_rng(len(str(settings)))
    full = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0) | settings
    t = transformers  # the processors generate() chains when sampling, in its order (GenerationMixin._get_logits_processor)
    processors = t.LogitsProcessorList(
        ([t.RepetitionPenaltyLogitsProcessor(full["repetition_penalty"])] if full["repetition_penalty"] != 1 else [])
        + [t.TemperatureLogitsWarper(full["temperature"])]
        + ([t.TopKLogitsWarper(full["top_k"])] if full["top_k"] else [])
        + ([t.TopPLogitsWarper(full["top_p"])] if full["top_p"] < 1 else [])
        + ([t.MinPLogitsWarper(full["min_p"])] if full["min_p"] else []))
    for trial in range(20):
        logits = (rng.standard_normal(300) * rng.uniform(0.5, 4)).astype(np.float32)
        context = rng.integers(0, 300, rng.integers(1, 40))
        theirs = processors(torch.tensor(context)[None], torch.tensor(logits)[None].clone())
        theirs = torch.softmax(theirs.double(), -1)[0].numpy()
        ours = Sampling(**full).probabilities(logits, context)
        assert ((ours > 0) == (theirs > 0)).all(), (settings, trial)  # the same tokens kept
        np.testing.assert_allclose(ours, theirs, atol=1e-6, err_msg=str((settings, trial)))


def test_greedy_generation_with_a_repetition_penalty_equals_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    from fusegrad.models.generate import Sampling
    from tests.data.test_chat import make_hf_model

    path = make_hf_model(tmp_path / "m")
    theirs = pytest.importorskip("transformers").LlamaForCausalLM.from_pretrained(path)
    prompt = [5, 9, 5, 17, 30, 9]
    for penalty in (1.0, 1.5, 3.0):  # transformers penalizes every id of the context, the prompt's too
        want = theirs.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, repetition_penalty=penalty,
                               eos_token_id=None, pad_token_id=0)[0].tolist()
        got = generate(Llama.from_pretrained(path), prompt, 20,
                       sampling=Sampling(temperature=0.0, repetition_penalty=penalty))
        assert got == want, penalty
    plain = generate(Llama.from_pretrained(path), prompt, 20, temperature=0.0)
    assert got != plain  # the penalty changed what was generated


def test_sampling_settings_the_model_declares_and_the_command_line_overrides(tmp_path, capsys):
    import json

    from fusegrad.cli.main import main
    from fusegrad.models.generate import Sampling, declared_sampling
    from tests.data.test_chat import make_hf_model

    path = make_hf_model(tmp_path / "m")
    config = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(config | {"do_sample": True, "temperature": 0.6,
                                                                      "top_p": 0.9, "top_k": 20}))
    assert declared_sampling(path) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert main(["sample", "--checkpoint", str(path), "--prompt", "Hi", "--max_new_tokens", "3", "--top_k", "5"]) == 0
    assert "sampling: temperature 0.6, top_p 0.9, top_k 5, min_p 0.0, repetition_penalty 1.0, repeat_last_n -1 (the " \
           "model's temperature, top_p as" in capsys.readouterr().err
    (path / "generation_config.json").write_text(json.dumps(config | {"do_sample": False, "temperature": 0.6}))
    assert declared_sampling(path) == {"temperature": 0.0}  # transformers decodes greedily: so does fusegrad
    (path / "generation_config.json").write_text(json.dumps(config | {"top_p": 1.5}))
    with pytest.raises(fg.FormatError, match=r"generation_config.json: sampling: top_p must be in \(0, 1\], got 1.5"):
        declared_sampling(path)
    for bad, match in [(dict(temperature=-1), "temperature must be >= 0"), (dict(top_k=2.5), "top_k must be an "),
                       (dict(min_p=float("nan")), "min_p must be in"), (dict(repetition_penalty=0), "> 0, got 0"),
                       (dict(repeat_last_n=-2), "repeat_last_n must be an integer >= -1, got -2")]:
        with pytest.raises(fg.ConfigError, match=match):
            Sampling(**bad)
    (path / "generation_config.json").write_text(json.dumps(config))
    assert main(["sample", "--checkpoint", str(path), "--top_p", "0"]) == 2
    assert "top_p must be in (0, 1], got 0.0" in capsys.readouterr().err


def test_a_gguf_files_sampling_keys_are_its_defaults(tmp_path):
    gguf = pytest.importorskip("gguf")
    from fusegrad.models.export import export_model
    from fusegrad.models.generate import declared_sampling
    from tests.gguf_edit import rewrite

    export_model(Llama.from_preset("tiny", seed=0), tmp_path / "m.gguf", "gguf", dtype="f32")
    assert declared_sampling(tmp_path / "m.gguf") == {}
    rewrite(tmp_path / "m.gguf", tmp_path / "s.gguf", metadata={
        gguf.Keys.General.SAMPLING_TEMP: (0.5, gguf.GGUFValueType.FLOAT32),
        gguf.Keys.General.SAMPLING_TOP_K: (40, gguf.GGUFValueType.INT32)})
    assert declared_sampling(tmp_path / "s.gguf") == {"temperature": 0.5, "top_k": 40}
    rewrite(tmp_path / "m.gguf", tmp_path / "r.gguf", metadata={
        gguf.Keys.General.SAMPLING_PENALTY_REPEAT: (1.1, gguf.GGUFValueType.FLOAT32)})
    assert declared_sampling(tmp_path / "r.gguf") == {"repetition_penalty": pytest.approx(1.1), "repeat_last_n": 64}


def test_a_repetition_window_penalizes_as_llama_cpps_penalties_sampler():
    from fusegrad.models.generate import Sampling
    from tests.llamacpp_lib import llamacpp_penalized

    rng = np.random.default_rng(0)
    for last_n in (-1, 0, 1, 5, 64, 500):
        for penalty in (1.3, 0.7):
            logits = (rng.standard_normal(100) * 3).astype(np.float32)
            context = rng.integers(0, 100, 150)  # ids repeat; the window's ends cut through runs of them
            want = llamacpp_penalized(logits, context, len(context) if last_n == -1 else last_n, penalty)
            got = Sampling(temperature=0.0, repetition_penalty=penalty, repeat_last_n=float(last_n)).penalized(
                logits, context)  # a whole float, as JSON may give it, counts as the integer
            assert (got != logits).any() == (last_n != 0)
            np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str((last_n, penalty)))


def test_the_sample_command_prints_tokens_as_they_come_whole_characters_only(capsys):
    from fusegrad.cli.sample import Shown
    from fusegrad.data.tokenizer import ByteTokenizer

    tokenizer, pieces = ByteTokenizer(), []
    shown = Shown(tokenizer, list("Hé ".encode()))
    pieces.append(capsys.readouterr().out)
    for b in "日本".encode():  # three bytes a character: nothing is shown until one is whole
        shown.add(b)
        pieces.append(capsys.readouterr().out)
    shown.end()
    pieces.append(capsys.readouterr().out)
    assert pieces == ["Hé ", "", "", "日", "", "", "本", "\n"]


def test_export_carries_the_sampling_settings_the_model_declares(tmp_path):
    import json

    transformers = pytest.importorskip("transformers")
    from fusegrad.cli.main import main
    from fusegrad.models.generate import declared_sampling
    from tests.data.test_chat import make_hf_model

    path = make_hf_model(tmp_path / "m")
    config = json.loads((path / "generation_config.json").read_text())
    declared = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1}
    (path / "generation_config.json").write_text(json.dumps(config | {"do_sample": True} | declared))
    assert main(["export", str(path), "--out", str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    # GGUF's general.sampling.* (float32); transformers' penalty covers the whole context: llama.cpp's window is
    # the context length (its -1 would turn the penalty off)
    assert declared_sampling(tmp_path / "m.gguf") == pytest.approx(declared | {"repeat_last_n": 128})
    assert main(["export", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "back")]) == 0  # and back to HF
    theirs = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert theirs.do_sample and theirs.eos_token_id == config["eos_token_id"]
    assert {k: getattr(theirs, k) for k in declared} == pytest.approx(declared)
    assert "repeat_last_n" not in json.loads((tmp_path / "back" / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps(config | {"do_sample": False}))
    assert main(["export", str(path), "--out", str(tmp_path / "greedy")]) == 0
    assert not transformers.GenerationConfig.from_pretrained(tmp_path / "greedy").do_sample
