"""Data-parallel training over torch.distributed: `torchrun --nproc_per_node 2 -m fusegrad train` on the
CPU (gloo) against one process on the same global batch; checkpoints resume under another process count;
a failing rank stops every rank with its reason."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("array_api_compat")

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
