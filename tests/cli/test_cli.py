import json
import subprocess
import sys

import numpy as np
import pytest

import fusegrad
from fusegrad.cli.main import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fusegrad.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_version_from_the_installed_command():
    out = subprocess.run(["fusegrad", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"fusegrad {fusegrad.__version__}"


@pytest.mark.parametrize("command", ["train", "sample", "prepare", "info", "doctor"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: fusegrad {command}" in capsys.readouterr().out


def test_prepare_then_info_then_bad_yaml(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("hello world, hello fusegrad.\n" * 50)
    assert main(["prepare", str(text), "--out", str(tmp_path / "data")]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["vocab_size"] == 258
    assert main(["prepare", str(text), "--out", str(tmp_path / "data")]) == 2  # no overwrite without asking
    assert "overwrite" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown setting(s) ['learning_rate']" in capsys.readouterr().err


def test_info_on_a_llama2c_file(tmp_path, capsys):
    from fusegrad.models import Llama

    Llama.from_preset("tiny").save_llama2c(tmp_path / "m.bin")
    assert main(["info", str(tmp_path / "m.bin")]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "dim=32" in out
    assert "float32 GEMMs:" in out  # names the BLAS kernels, which decide the speed
    line = next(line for line in out.splitlines() if line.startswith("backends usable here:"))
    usable = line.split(":", 1)[1].strip().split(", ")
    assert "numpy" in usable and "ane-sim" in usable
    if sys.platform != "darwin":  # only what starts here: no Neural Engine, no Metal
        assert "ane" not in usable and "torch:mps" not in usable


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nope.bin")]) == 2
    assert "nope.bin" in capsys.readouterr().err


def test_train_then_sample_from_the_run(tmp_path):
    run = tmp_path / "run"
    out = run_cli("train", "--preset", "tiny", "--max_steps", "4", "--warmup_steps", "1", "--batch_size", "2",
                  "--seq_len", "16", "--out_dir", str(run), "--eval_interval", "2", "--sample_tokens", "5")
    assert out.returncode == 0, out.stderr
    assert "val loss" in out.stderr and "--- sample ---" in out.stdout
    assert (run / "checkpoint.safetensors").is_file() and (run / "loss.png").stat().st_size > 1000
    out = run_cli("sample", "--checkpoint", str(run), "--prompt", "The", "--max_new_tokens", "8", "--seed", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The")
    again = run_cli("sample", "--checkpoint", str(run), "--prompt", "The", "--max_new_tokens", "8", "--seed", "1")
    assert again.stdout == out.stdout  # seeded


def test_a_run_dir_alone_is_enough_to_sample(tmp_path):
    import shutil

    run = tmp_path / "run"
    assert run_cli("train", "--preset", "tiny", "--max_steps", "2", "--warmup_steps", "1", "--batch_size", "2",
                   "--seq_len", "16", "--out_dir", str(run), "--sample_tokens", "0", "--plot", "false",
                   "--quiet").returncode == 0
    shutil.rmtree(run / "data")  # the prepared data is gone; the tokenizer was saved beside the checkpoint
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    out = run_cli("sample", "--checkpoint", str(moved), "--prompt", "A", "--max_new_tokens", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("A")


def test_sample_with_an_adapter_equals_sampling_the_merged_model(tmp_path):
    from fusegrad.finetune.lora import LoraConfig, attach_lora
    from fusegrad.finetune.peft_io import save_adapter
    from fusegrad.models import Llama

    base = Llama.from_preset("tiny", seed=2, vocab_size=258)
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "byte_tokenizer.json").write_text('{"kind": "byte"}')
    model = Llama.from_pretrained(tmp_path / "base")
    lora = attach_lora(model, LoraConfig(targets="q,v", r=4, alpha=8))
    for p in lora.parameters():  # a non-trivial adapter (B starts at zero)
        p.data[...] = np.random.default_rng(0).normal(0, 0.3, p.shape)
    save_adapter(tmp_path / "ad", lora, base_model=str(tmp_path / "base"))  # as `fusegrad finetune` records it
    lora.merge()
    model.save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "byte_tokenizer.json").write_text('{"kind": "byte"}')
    args = ["--prompt", "Hi", "--max_new_tokens", "12", "--temperature", "0"]
    with_adapter = run_cli("sample", "--checkpoint", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), *args)
    merged = run_cli("sample", "--checkpoint", str(tmp_path / "merged"), *args)
    plain = run_cli("sample", "--checkpoint", str(tmp_path / "base"), *args)
    alone = run_cli("sample", "--checkpoint", str(tmp_path / "ad"), *args)  # the adapter dir names its base
    assert with_adapter.returncode == 0 and alone.returncode == 0, with_adapter.stderr + alone.stderr
    assert with_adapter.stdout == merged.stdout == alone.stdout != plain.stdout


def test_doctor_reports_every_kernel_and_says_the_ane_is_absent(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "ANE      absent" in out and "10 of 10 kernels passed" in out
    for kernel in ("matmul_dynamic", "ffn_w13_backward_dx_dynamic", "qkv_backward_dx", "sdpa_backward"):
        assert f"\n{kernel} " in out


# -- a downloaded Hugging Face model: its tokenizer, its chat template, its eos ids ------------------------
@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from tests.data.test_chat import make_hf_model

    return make_hf_model(tmp_path_factory.mktemp("hf") / "model")


def greedy_text(model_dir, prompt_ids, n):
    """What greedy decoding of the model continues `prompt_ids` (token ids from transformers) with."""
    from fusegrad.data.tokenizer import load_tokenizer
    from fusegrad.models import Llama
    from fusegrad.models.generate import generate

    out = generate(Llama.from_pretrained(model_dir), list(prompt_ids), n, temperature=0.0)
    return load_tokenizer(model_dir).decode(out), load_tokenizer(model_dir).decode(out[len(prompt_ids):])


def test_sample_and_chat_use_the_models_own_tokenizer_and_template(hf_model, capsys):
    theirs = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(hf_model)
    args = ["sample", "--checkpoint", str(hf_model), "--temperature", "0", "--max_new_tokens", "6"]
    assert main(args + ["--prompt", "The list"]) == 0  # this tokenizer adds no BOS: the ids are transformers'
    assert capsys.readouterr().out == greedy_text(hf_model, theirs.encode("The list"), 6)[0] + "\n"
    assert main(args + ["--prompt", "What is a list?", "--chat"]) == 0
    conversation = theirs.apply_chat_template([{"role": "user", "content": "What is a list?"}], tokenize=True,
                                              add_generation_prompt=True, return_dict=True)["input_ids"]
    assert capsys.readouterr().out == greedy_text(hf_model, conversation, 6)[1] + "\n"  # the reply only


def test_generation_stops_at_every_eos_id_the_model_declares(tmp_path, monkeypatch):
    import fusegrad.cli.sample as cli
    from fusegrad.data.tokenizer import load_tokenizer
    from fusegrad.models.generate import stream
    from tests.data.test_chat import make_hf_model

    model = make_hf_model(tmp_path / "m", norm=0.0)  # every logit 0: greedy picks id 0, <|endoftext|>
    made = []
    def recorded(model, prompt, *a):  # the prompt, then each token as it is streamed
        made.append(prompt)
        return (made.append(t) or t for t in stream(model, prompt, *a))
    monkeypatch.setattr(cli, "stream", recorded)
    assert main(["sample", "--checkpoint", str(model), "--prompt", "Hi", "--temperature", "0",
                 "--max_new_tokens", "5"]) == 0
    assert made == [load_tokenizer(model).encode("Hi"), 0]  # 0 is an eos id of generation_config.json only


def test_a_tokenizer_that_does_not_fit_the_model_names_both_files(hf_model, tmp_path, capsys):
    from fusegrad.data import corpus
    from fusegrad.data.tokenizer import BPETokenizer

    assert main(["sample", "--checkpoint", str(hf_model), "--tokenizer", "byte"]) == 2
    err = capsys.readouterr().err
    assert "byte tokenizer" in err and str(hf_model) in err and "tokenizer.json" in err and "force_tokenizer" in err
    big = BPETokenizer.train(corpus.documents(), 2000)
    (tmp_path / "big").mkdir()
    big.save(tmp_path / "big")
    assert big.vocab_size > BPETokenizer.load(hf_model / "tokenizer.json").vocab_size
    assert main(["sample", "--checkpoint", str(hf_model), "--tokenizer", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "big" / "tokenizer.json") in err and str(hf_model) in err and "more than" in err


def test_info_on_a_hf_dir_shows_its_tokenizer(hf_model, capsys):
    assert main(["info", str(hf_model)]) == 0
    out = capsys.readouterr().out
    assert "'kind': 'bpe'" in out and "'eos_ids': [2, 0]" in out and "'add_bos': False" in out


# -- fusegrad export (merge is the same code with an adapter) ----------------------------------------------


def test_export_argument_errors_name_the_argument(hf_model, tmp_path, capsys):
    assert main(["export", str(hf_model), "--format", "hf", "--dtype", "q8_0", "--out", str(tmp_path / "o")]) == 2
    assert "--dtype is gguf's tensor type" in capsys.readouterr().err
    assert main(["export", str(hf_model), "--out", str(hf_model)]) == 2  # would overwrite the source
    assert "config.json: already exists; pass --force" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2")]) == 2
    assert "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(hf_model), "--format", "onnx", "--out", str(tmp_path / "o3")])


def lora_adapter(model_dir, out):
    """A non-trivial LoRA adapter (B starts at zero) on q, v and down, saved as peft saves it."""
    from fusegrad.finetune.lora import LoraConfig, attach_lora
    from fusegrad.finetune.peft_io import save_adapter
    from fusegrad.models import Llama

    model = Llama.from_pretrained(model_dir)
    lora = attach_lora(model, LoraConfig(targets="q,v,down", r=4, alpha=8))
    for p in lora.parameters():
        p.data[...] = np.random.default_rng(0).normal(0, 0.3, p.shape)
    save_adapter(out, lora)
    lora.merge()
    return model


def test_export_hf_with_an_adapter_loads_in_transformers_with_tokenizer_and_template(hf_model, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    merged = lora_adapter(hf_model, tmp_path / "ad")
    assert main(["export", str(hf_model), "--adapter", str(tmp_path / "ad"), "--format", "hf",
                 "--out", str(tmp_path / "out")]) == 0
    tokens = np.array([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
        logits = theirs(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits, merged.logits(tokens).numpy(), rtol=1e-4, atol=1e-5)
    tok, src = (transformers.AutoTokenizer.from_pretrained(d) for d in (tmp_path / "out", hf_model))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages, tokenize=False) == src.apply_chat_template(messages, tokenize=False)
    assert (tok.bos_token_id, tok.eos_token_id) == (src.bos_token_id, src.eos_token_id)
    assert main(["merge", "--model", str(hf_model), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "out"),
                 "--force"]) == 0  # merge: the same code


def test_export_of_an_adapter_dir_alone_merges_the_base_it_names(hf_model, tmp_path, capsys):
    """`fusegrad export runs/ft`: a fine-tune's adapter dir, its base taken from base_model_name_or_path."""
    import json

    from fusegrad.train.trainer import load_model

    merged = lora_adapter(hf_model, tmp_path / "ad")
    config = tmp_path / "ad" / "adapter_config.json"
    meta = json.loads(config.read_text())
    assert meta["base_model_name_or_path"] is None  # saved without a base: nothing to merge into
    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "o0")]) == 2
    assert "base_model_name_or_path is None, not a local model directory or file" in capsys.readouterr().err
    config.write_text(json.dumps(dict(meta, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")))  # a Hub id
    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json: base_model_name_or_path is 'HuggingFaceTB/SmolLM2-135M'" in err and "--adapter" in err
    config.write_text(json.dumps(dict(meta, base_model_name_or_path=str(hf_model))))
    assert main(["export", str(tmp_path / "ad"), "--out", str(tmp_path / "out")]) == 0
    tokens = np.array([[1, 5, 9, 40, 7]])
    exported, tokenizer = load_model(tmp_path / "out")
    np.testing.assert_allclose(exported.logits(tokens).numpy(), merged.logits(tokens).numpy(), rtol=1e-5, atol=1e-6)
    assert tokenizer is not None  # the base's tokenizer went along


def test_export_a_byte_level_run_to_llama2c_and_gguf(tmp_path):
    """`fusegrad train`'s default kind of run (byte tokenizer): run.c's .bin, and a GGUF llama.cpp tokenizes
    byte for byte and runs with fusegrad's next-token probabilities."""
    from fusegrad.models import Llama
    from fusegrad.train.trainer import load_model
    from tests.llamacpp import llamacpp

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max_steps", "2", "--warmup_steps", "1", "--batch_size", "2",
                 "--seq_len", "16", "--out_dir", str(run), "--sample_tokens", "0", "--plot", "false", "--quiet",
                 "--workers", "1", "--progress", "false"]) == 0
    model, _ = load_model(run)
    tokens = np.array([[256, 84, 104, 101, 32]])
    want = model.logits(tokens).numpy()
    assert main(["export", str(run), "--out", str(tmp_path / "m.bin")]) == 0  # format from the name
    np.testing.assert_array_equal(Llama.from_pretrained(tmp_path / "m.bin").logits(tokens).numpy(), want)
    assert (tmp_path / "m.bin").read_bytes()[:4] != b"24ka"  # run.c reads version 0: no "ak42" magic header
    assert main(["export", str(run), "--out", str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0
    out = llamacpp(tmp_path / "m.gguf", ids=tokens[0], texts=["The list"])
    assert out["tokens"] == [list(b"The list")]
    p = np.exp(want[0, -1] - want[0, -1].max())
    np.testing.assert_allclose([out["probs"][i] for i in range(len(p))], p / p.sum(), atol=1e-4)


def test_export_a_hf_model_to_gguf_loads_in_transformers(hf_model, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fusegrad.models import Llama

    assert main(["export", str(hf_model), "--format", "gguf", "--dtype", "f32", "--out", str(tmp_path / "m.gguf")]) == 0
    tokens = np.array([[1, 5, 9, 40, 7]])
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
        logits = theirs(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(logits, Llama.from_pretrained(hf_model).logits(tokens).numpy(), rtol=1e-4, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert tok.encode("The list") == transformers.AutoTokenizer.from_pretrained(hf_model).encode("The list")


def test_a_gguf_file_samples_chats_finetunes_and_exports_as_its_source_does(hf_model, tmp_path, capsys):
    """A Hugging Face model written to GGUF and used from there: the same greedy chat reply (its template and both
    eos ids ride inside the file), `info` shows the same tokenizer, a LoRA run starts from it, and exported back
    to a Hugging Face directory it is the model it came from."""
    from fusegrad.models import Llama

    gguf_path = str(tmp_path / "m.gguf")
    assert main(["export", str(hf_model), "--dtype", "f32", "--out", gguf_path]) == 0
    chat = ["sample", "--prompt", "What is a list?", "--chat", "--temperature", "0", "--max_new_tokens", "8"]
    outputs = []
    for source in (str(hf_model), gguf_path):
        capsys.readouterr()
        assert main(chat + ["--checkpoint", source]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()
    assert main(["info", gguf_path]) == 0
    out = capsys.readouterr().out
    assert "'kind': 'bpe'" in out and "'eos_ids': [2, 0]" in out and "'add_bos': False" in out
    (tmp_path / "qa.jsonl").write_text('{"prompt": "What is a list?", "completion": "A sequence."}\n' * 8)
    assert main(["finetune", "--model", gguf_path, "--data", str(tmp_path / "qa.jsonl"), "--out",
                 str(tmp_path / "ft"), "--max_steps", "2", "--batch_size", "2", "--quiet"]) == 0
    assert (tmp_path / "ft" / "adapter_model.safetensors").is_file()
    assert main(["export", gguf_path, "--out", str(tmp_path / "back")]) == 0
    tokens = np.array([[1, 5, 9, 40, 7]])
    np.testing.assert_allclose(Llama.from_pretrained(tmp_path / "back").logits(tokens).numpy(),
                               Llama.from_pretrained(hf_model).logits(tokens).numpy(), atol=1e-5)
    assert (tmp_path / "back" / "tokenizer.json").is_file()


def test_sample_on_the_torch_backend_equals_numpy(tmp_path, capsys):
    pytest.importorskip("torch")
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max_steps", "3", "--warmup_steps", "1", "--batch_size", "2",
                 "--seq_len", "16", "--out_dir", str(run), "--eval_interval", "0", "--sample_tokens", "0",
                 "--plot", "false", "--quiet", "true", "--workers", "1"]) == 0
    capsys.readouterr()
    outs = []
    for extra in ([], ["--backend", "torch", "--device", "cpu"]):
        assert main(["sample", "--checkpoint", str(run), "--prompt", "The", "--max_new_tokens", "12",
                     "--temperature", "0"] + extra) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("The")
    assert main(["sample", "--checkpoint", str(run), "--backend", "nope"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err


def test_an_unknown_option_names_the_one_probably_meant(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--max_stesp", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --max_stesp 3; --max_stesp (did you mean --max_steps?)" in capsys.readouterr().err
