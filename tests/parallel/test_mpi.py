"""Data-parallel training over MPI: two real ranks on this machine (mpirun from the `mpich` wheel)
against one process with the same global batch; resume under another rank count; one failing rank
stops both with a clear message."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI")

from fusegrad.core.errors import ConfigError  # noqa: E402
from fusegrad.parallel.mpi import DataParallel, ParallelError, buckets  # noqa: E402
from fusegrad.train.checkpoint import load_checkpoint  # noqa: E402
from fusegrad.train.trainer import TrainConfig, Trainer  # noqa: E402
from tests.parallel.conftest import STEPS, run_config  # noqa: E402

MPIRUN = shutil.which("mpirun") or shutil.which("mpiexec")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="no mpirun on PATH (pip install mpich)")


def test_buckets_cover_every_array_once_in_order():
    sizes = [5, 1, 300, 7, 7, 2]
    groups = buckets(sizes, itemsize=4, bucket_bytes=64)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    for g in groups:
        assert len(g) == 1 or sum(sizes[i] for i in g) * 4 <= 64


def test_single_rank_group_leaves_grads_and_shards_alone():
    import fusegrad as fg

    dp = DataParallel(MPI.COMM_SELF, bucket_bytes=8)
    ps = [fg.tensor(np.zeros(s, np.float32), requires_grad=True) for s in [(3,), (2, 2)]]
    want = [np.arange(3, dtype=np.float32), np.full((2, 2), 0.5, np.float32)]
    for p, w in zip(ps, want):
        p.grad = w.copy()
    dp.allreduce_grads(ps)
    for p, w in zip(ps, want):
        np.testing.assert_array_equal(p.grad, w)
    dp.check_consistency([("a", ps[0])], step=1)
    assert dp.average(2.5) == 2.5


def test_batch_that_does_not_split_names_the_rank_count():
    class TwoRanks:
        def Get_rank(self):
            return 1

        def Get_size(self):
            return 2

    dp = DataParallel(TwoRanks())
    np.testing.assert_array_equal(dp.shard(np.arange(8).reshape(4, 2)), [[4, 5], [6, 7]])
    with pytest.raises(ConfigError, match="batch_size 3 does not split evenly over 2 ranks"):
        dp.shard(np.zeros((3, 2)))


def test_drifted_parameter_is_named():
    import fusegrad as fg

    class Rank1Of2:  # rank 0 broadcasts other digests: the check must fail on this rank
        def Get_rank(self):
            return 1

        def Get_size(self):
            return 2

        def bcast(self, obj, root=0):
            return [b"x" * 8 for _ in obj]

        def allgather(self, obj):
            return [None, obj]

    dp = DataParallel(Rank1Of2())
    with pytest.raises(ParallelError, match=r"rank 1 \(w\)"):
        dp.check_consistency([("w", fg.tensor([1.0]))], step=7)


# -- real ranks --------------------------------------------------------------------------------------
config = run_config


def single_process_losses(data_dir, out_dir):
    trainer = Trainer(TrainConfig(**config(data_dir, out_dir)))
    trainer.run()
    return np.array(trainer.history["loss"])


def mpirun(n, args, tmp_path, timeout=50):
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", FUSEGRAD_JIT="0")
    return subprocess.run([MPIRUN, "-n", str(n), sys.executable, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def cli_args(cfg: dict) -> list:
    return ["-m", "fusegrad.cli.main", "train"] + [x for k, v in cfg.items() for x in (f"--{k}", str(v))]


@needs_mpirun
def test_two_ranks_follow_the_single_process_loss_curve(data_dir, tmp_path):
    want = single_process_losses(data_dir, tmp_path / "one")
    run = mpirun(2, cli_args(config(data_dir, tmp_path / "two", quiet=False)), tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("fusegrad: training tiny") == 1  # rank 0 alone logs: the ranks did split
    state = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    assert state["step"] == STEPS
    np.testing.assert_allclose(state["history"]["loss"], want, rtol=1e-5)
    assert not list((tmp_path / "two").glob("*.tmp-*"))  # rank 0 alone wrote it, atomically


@needs_mpirun
def test_resume_a_one_process_checkpoint_on_two_ranks(data_dir, tmp_path):
    want = single_process_losses(data_dir, tmp_path / "ref")
    half = Trainer(TrainConfig(**config(data_dir, tmp_path / "run")))
    half.train_step(), half.train_step()
    half.save()
    run = mpirun(2, cli_args(config(data_dir, tmp_path / "run", resume=True)), tmp_path)
    assert run.returncode == 0, run.stderr
    state = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")
    np.testing.assert_allclose(state["history"]["loss"], want, rtol=1e-5)


@needs_mpirun
def test_a_failing_rank_stops_every_rank_with_its_reason(data_dir, tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent(f"""
        from mpi4py import MPI
        from fusegrad.train.trainer import TrainConfig, Trainer
        trainer = Trainer(TrainConfig(**{config(data_dir, tmp_path / "fail", max_steps=50)!r}))
        if MPI.COMM_WORLD.Get_rank() == 1:
            def broken():
                raise OSError("disk on fire")
            trainer.train_step = broken
        trainer.run()
    """))
    run = mpirun(2, [str(script)], tmp_path, timeout=40)  # a hang would hit the timeout instead
    assert run.returncode != 0
    assert "rank 1 of 2 failed: OSError: disk on fire; stopping all ranks" in run.stderr
