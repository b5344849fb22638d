"""Data-parallel training over torch.distributed: `torchrun --nproc_per_node 2 -m fusegrad train` (and
`finetune`, LoRA and QLoRA) on the CPU (gloo) against one process on the same global batch; checkpoints
resume under another process count; a failing rank stops every rank with its reason."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("array_api_compat")

from fusegrad.finetune.trainer import FinetuneConfig, Finetuner  # noqa: E402
from fusegrad.models import Llama  # noqa: E402
from fusegrad.models.llama import LlamaConfig  # noqa: E402
from fusegrad.train.checkpoint import load_checkpoint  # noqa: E402
from fusegrad.train.trainer import TrainConfig, Trainer  # noqa: E402
from tests.parallel.conftest import STEPS, run_config  # noqa: E402


def config(data_dir, out_dir, **kw):
    return run_config(data_dir, out_dir, **{**dict(workers=1, backend="torch", device="cpu"), **kw})


def one_process_losses(data_dir, out_dir):
    trainer = Trainer(TrainConfig(**config(data_dir, out_dir)))
    trainer.run()
    return np.array(trainer.history["loss"])


def torchrun(n, args, tmp_path, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", FUSEGRAD_JIT="0",
               PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def cli_args(cfg: dict) -> list:
    return ["-m", "fusegrad", "train"] + [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


def test_two_processes_follow_the_one_process_loss_curve_and_resume_on_one(data_dir, tmp_path):
    want = one_process_losses(data_dir, tmp_path / "one")
    run = torchrun(2, cli_args(config(data_dir, tmp_path / "two", max_steps=2, quiet=False)), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("fusegrad: training tiny") == 1  # rank 0 alone logs: the processes did split
    state = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    np.testing.assert_allclose(state["history"]["loss"], want[:2], rtol=1e-5)
    resumed = Trainer(TrainConfig(**config(data_dir, tmp_path / "two", resume=True)))  # 2 processes -> 1
    resumed.run()
    np.testing.assert_allclose(resumed.history["loss"], want, rtol=1e-5)


def test_a_failing_rank_stops_every_rank_with_its_reason(data_dir, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from fusegrad.train.trainer import TrainConfig, Trainer
        trainer = Trainer(TrainConfig(**{config(data_dir, tmp_path / "fail", max_steps=50)!r}))
        if os.environ["RANK"] == "1":
            def broken():
                raise OSError("disk on fire")
            trainer.train_step = broken
        trainer.run()
    """))
    run = torchrun(2, [str(script)], tmp_path, timeout=90)  # a hang would hit the timeout instead
    assert run.returncode != 0
    assert "rank 1 of 2 failed: OSError: disk on fire; stopping all ranks" in run.stderr


# -- fine-tuning ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ft_base(tmp_path_factory):
    """A small HF base model and prompt/completion data (the prompt is masked: loss on the completion)."""
    d = tmp_path_factory.mktemp("ft")
    Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=258, max_seq_len=64),
          seed=1).save_pretrained(d / "base")
    rng = np.random.default_rng(0)
    with open(d / "qa.jsonl", "w") as f:
        for _ in range(40):
            a, b = rng.integers(0, 9, 2)
            f.write(json.dumps({"prompt": f"{a}+{b}=" + "?" * int(rng.integers(0, 3)), "completion": str(a + b)}) + "\n")
    return d


def ft_config(base, out, **kw) -> dict:
    return {**dict(model=str(base / "base"), data=str(base / "qa.jsonl"), tokenizer="byte", out=str(out), batch_size=4,
                   max_steps=STEPS, warmup_steps=1, lr=3e-2, rank=4, lora_targets="q,v,down", eval_interval=0,
                   ckpt_interval=2, quiet=True, backend="torch", device="cpu"), **kw}


def ft_losses(out_dir):
    return load_checkpoint(out_dir / "finetune_state.safetensors")["history"]["loss"]


def ft_cli(cfg: dict) -> list:
    return ["-m", "fusegrad", "finetune"] + [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_torchrun_finetune_follows_the_one_process_curve_and_resumes_under_another_process_count(ft_base, tmp_path,
                                                                                                 qlora):
    """LoRA: 2 processes for 2 steps, then 1 process resumes; QLoRA: 1 process for 2 steps, then 2 resume.
    Every step's loss equals one process's on the same global batch (1e-5)."""
    one = Finetuner(FinetuneConfig(**ft_config(ft_base, tmp_path / "one", qlora=qlora)))
    one.run()
    want = np.array(one.history["loss"])
    assert len(want) == STEPS and want[-1] < want[0]  # it trains
    out = tmp_path / "split"
    first, then = (2, 1) if not qlora else (1, 2)
    for n, kw in ((first, dict(max_steps=2)), (then, dict(resume=True))):
        cfg = ft_config(ft_base, out, qlora=qlora, **kw)
        if n == 1:
            Finetuner(FinetuneConfig(**cfg)).run()
            continue
        run = torchrun(2, ft_cli({k: v for k, v in cfg.items() if k != "quiet"}), tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stderr.count("fusegrad finetune: lm on") == 1  # rank 0 alone logs: the processes did split
    np.testing.assert_allclose(ft_losses(out), want, rtol=1e-5)


def test_a_failing_finetune_rank_stops_every_rank_with_its_reason(ft_base, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        import os
        from fusegrad.finetune.trainer import FinetuneConfig, Finetuner
        tuner = Finetuner(FinetuneConfig(**{ft_config(ft_base, tmp_path / "fail", max_steps=50)!r}))
        if os.environ["RANK"] == "1":
            def broken(*args):
                raise MemoryError("adapter too big")
            tuner.micro_batch = broken
        tuner.run()
    """))
    run = torchrun(2, [str(script)], tmp_path, timeout=90)
    assert run.returncode != 0
    assert "rank 1 of 2 failed: MemoryError: adapter too big; stopping all ranks" in run.stderr
    assert not (tmp_path / "fail" / "finetune_state.safetensors").exists()  # rank 0 saved nothing after it
