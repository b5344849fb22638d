"""The loop's guards: nothing non-finite or diverged is saved, Ctrl-C saves and stops, resume fields checked."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from fusegrad.core.errors import FormatError
from fusegrad.finetune.trainer import FinetuneConfig, FinetuneError, finetune
from fusegrad.models import Llama
from fusegrad.train.checkpoint import load_checkpoint
from fusegrad.train.trainer import TrainConfig, Trainer, TrainingError


def tiny(tmp_path, **kw):
    return TrainConfig(**dict(dict(preset="tiny", max_steps=4, warmup_steps=1, batch_size=2, seq_len=16, workers=1,
                                   out_dir=str(tmp_path), progress=False, plot=False, sample_tokens=0, eval_interval=0,
                                   quiet=True, ckpt_interval=2), **kw))


def test_a_nan_weight_stops_the_run_and_the_last_checkpoint_stays_good(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    step = trainer.optimizer.step

    def poisoned_step(grad_scale=1.0):
        step(grad_scale)
        if trainer.step == 3:  # the last optimizer step: no loss sees it before the final save
            trainer.model.params["norm"].data[0] = np.nan

    trainer.optimizer.step = poisoned_step
    with pytest.raises(TrainingError, match="step 4: weight norm holds NaN or inf: the run diverged"):
        trainer.run()
    state = load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert state["step"] == 2 and all(np.isfinite(a).all() for a in state["params"].values())


def test_finetuning_at_a_huge_lr_stops_as_diverged(tmp_path):
    Llama.from_preset("tiny", vocab_size=258, seed=0).save_pretrained(tmp_path / "base")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"prompt": "2+2=", "completion": "4"}) for _ in range(8)))
    cfg = FinetuneConfig(model=str(tmp_path / "base"), data=str(tmp_path / "d.jsonl"), tokenizer="byte", lr=1e8,
                         out=str(tmp_path / "out"), max_steps=6, ckpt_interval=3, batch_size=4, quiet=True)
    with pytest.raises(FinetuneError, match="step 3: weight .*lora.* in magnitude: the run diverged"):
        finetune(cfg)
    assert not (tmp_path / "out" / "finetune_state.safetensors").exists()


def test_restore_names_the_field_at_fault(tmp_path):
    trainer = Trainer(tiny(tmp_path, max_steps=1))
    trainer.run()
    path = str(tmp_path / "checkpoint.safetensors")
    good = load_checkpoint(path)
    name = trainer.optimizer.names[0]
    for change, match in [(lambda s: s.pop("step"), "'step' is missing"),
                          (lambda s: s.update(step=-1), "step = -1 is outside"),
                          (lambda s: s.update(history=[1]), "'history' is not a mapping"),
                          (lambda s: s["optimizer"]["exp_avg"].update({name: s["optimizer"]["exp_avg"][name]
                                                                      .astype(np.int32)}), f"exp_avg/{name} is int32"),
                          (lambda s: s["optimizer"]["steps"].update({name: "x"}), f"steps/{name} = 'x'")]:
        state = load_checkpoint(path)
        change(state)
        with pytest.raises(FormatError, match=match):
            trainer.restore(state, path)
    trainer.restore(good, path)
    assert trainer.step == 1


def start_training(tmp_path):
    args = ["train", "--preset", "tiny", "--max_steps", "100000", "--batch_size", "4", "--seq_len", "32",
            "--eval_interval", "0", "--ckpt_interval", "100000", "--progress", "false", "--plot", "false",
            "--workers", "2", "--out_dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "fusegrad.cli.main"] + args, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # a few steps done
        assert proc.poll() is None, proc.stderr.read()
    return proc


def test_ctrl_c_saves_a_checkpoint_at_the_current_step(tmp_path):
    proc = start_training(tmp_path)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert load_checkpoint(tmp_path / "checkpoint.safetensors")["step"] == last >= 3


def test_a_second_ctrl_c_exits_at_once_without_tracebacks(tmp_path):
    proc = start_training(tmp_path)
    proc.send_signal(signal.SIGINT)
    err = ""
    while "interrupted; saving" not in err:  # the first is seen: the second comes while that step runs or saves
        line = proc.stderr.readline()
        assert line, err  # the process ended without seeing the first Ctrl-C
        err += line
    proc.send_signal(signal.SIGINT)
    err += proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err and "Error" not in err and "Warning" not in err, err
    assert err.strip().endswith("fusegrad train: interrupted; the last checkpoint is intact")


def test_a_full_disk_at_checkpoint_time_is_one_line_and_the_old_checkpoint_stays(tmp_path, monkeypatch, capsys):
    import safetensors.numpy

    from fusegrad.cli.main import main

    args = ["train", "--preset", "tiny", "--max_steps", "2", "--batch_size", "2", "--seq_len", "16", "--workers", "1",
            "--eval_interval", "0", "--ckpt_interval", "1", "--progress", "false", "--plot", "false",
            "--sample_tokens", "0", "--out_dir", str(tmp_path)]
    assert main(args[:4] + ["1"] + args[5:]) == 0
    capsys.readouterr()

    def full_disk(arrays, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise Exception("No space left on device (os error 28)")  # how safetensors (Rust) reports it

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    assert main(args + ["--resume", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fusegrad train: error: ") and "the disk is full" in err[0], err
    assert "Errno" not in err[0]
    assert load_checkpoint(tmp_path / "checkpoint.safetensors")["step"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_an_unwritable_run_directory_is_one_storage_error(tmp_path):
    from fusegrad.core.errors import StorageError
    from fusegrad.train.loop import MetricsLog

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="metrics.jsonl: cannot write"):
        MetricsLog(str(tmp_path / "file" / "run"), append=False)
