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
    save_adapter(tmp_path / "ad", lora)
    lora.merge()
    model.save_pretrained(tmp_path / "merged")
    (tmp_path / "merged" / "byte_tokenizer.json").write_text('{"kind": "byte"}')
    args = ["--prompt", "Hi", "--max_new_tokens", "12", "--temperature", "0"]
    with_adapter = run_cli("sample", "--checkpoint", str(tmp_path / "base"), "--adapter", str(tmp_path / "ad"), *args)
    merged = run_cli("sample", "--checkpoint", str(tmp_path / "merged"), *args)
    plain = run_cli("sample", "--checkpoint", str(tmp_path / "base"), *args)
    assert with_adapter.returncode == 0, with_adapter.stderr
    assert with_adapter.stdout == merged.stdout != plain.stdout


def test_doctor_reports_every_kernel_and_says_the_ane_is_absent(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "ANE      absent" in out and "10 of 10 kernels passed" in out
    for kernel in ("matmul_dynamic", "ffn_w13_backward_dx_dynamic", "qkv_backward_dx", "sdpa_backward"):
        assert f"\n{kernel} " in out
