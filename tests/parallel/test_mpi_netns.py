"""MPI across hosts, for real: two network namespaces joined by a veth pair are two hosts with their own
network stacks (addresses 10.203.x.1 and .2 exist inside those namespaces only). mpiexec (the mpich
wheel's hydra) runs in the first and starts the second rank through a launcher that plays ssh with
`ip netns exec`; the ranks talk over TCP across the veth. A 2-rank training follows the one-process loss
curve; a rank killed mid-run stops the job with a clear error in bounded time. Needs root and `ip netns`
(CI runs as root); skipped with the reason otherwise."""
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("mpi4py.MPI")

from fusegrad.train.checkpoint import load_checkpoint  # noqa: E402
from fusegrad.train.trainer import TrainConfig, Trainer  # noqa: E402
from tests.parallel.conftest import STEPS, run_config  # noqa: E402

MPIEXEC = shutil.which("mpiexec")
IP = shutil.which("ip")
LAUNCHER = """#!/bin/sh
# hydra's ssh: [options] HOST COMMAND... -> COMMAND inside HOST's network namespace
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case $host in {a_ip}) ns={a};; {b_ip}) ns={b};; *) echo "unknown host $host" >&2; exit 1;; esac
exec ip netns exec $ns sh -c "$*"
"""


def _ip(*args):
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def hosts(tmp_path):
    """Two namespaces joined by a veth pair -> (namespace of host A, launcher script, "ipA,ipB")."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make network namespaces (ip netns add)")
    if IP is None or MPIEXEC is None:
        pytest.skip("needs `ip` (iproute2) and mpiexec (pip install mpich)")
    tag = f"fg{os.getpid() % 100000}"
    a, b, sub = f"{tag}a", f"{tag}b", f"10.203.{os.getpid() % 250}"
    made = []
    try:
        for ns in (a, b):
            if _ip("netns", "add", ns).returncode:
                pytest.skip(f"`ip netns add` does not work here: {_ip('netns', 'add', ns).stderr.strip()}")
            made.append(ns)
        steps = [("link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y"),
                 ("link", "set", f"{tag}x", "netns", a), ("link", "set", f"{tag}y", "netns", b),
                 ("-n", a, "addr", "add", f"{sub}.1/24", "dev", f"{tag}x"),
                 ("-n", b, "addr", "add", f"{sub}.2/24", "dev", f"{tag}y")]
        steps += [("-n", ns, "link", "set", dev, "up") for ns, dev in ((a, f"{tag}x"), (b, f"{tag}y"), (a, "lo"), (b, "lo"))]
        for step in steps:
            out = _ip(*step)
            assert out.returncode == 0, f"ip {' '.join(step)}: {out.stderr}"
        launcher = tmp_path / "nsexec.sh"
        launcher.write_text(LAUNCHER.format(a=a, b=b, a_ip=f"{sub}.1", b_ip=f"{sub}.2"))
        launcher.chmod(0o755)
        yield a, str(launcher), f"{sub}.1,{sub}.2"
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "del", ns)


def config(data_dir, out_dir, **kw):
    return run_config(data_dir, out_dir, **{**dict(workers=1), **kw})


def across(hosts, args, tmp_path, timeout):
    ns, launcher, ips = hosts
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", FUSEGRAD_JIT="0",
               PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [IP, "netns", "exec", ns, MPIEXEC, "-hosts", ips, "-launcher", "ssh", "-launcher-exec", launcher,
           "-n", "2", "-ppn", "1", sys.executable, *args]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


def test_two_hosts_follow_the_one_process_loss_curve(hosts, data_dir, tmp_path):
    one = Trainer(TrainConfig(**config(data_dir, tmp_path / "one")))
    one.run()
    cfg = config(data_dir, tmp_path / "two")
    probe = tmp_path / "probe.py"  # each rank names its namespace's address: they really are two hosts
    probe.write_text("import subprocess, runpy, sys\nfrom mpi4py import MPI\n"  # a file each: stdout interleaves
                     "open(f'rank{MPI.COMM_WORLD.Get_rank()}.txt', 'w').write(subprocess.run(['ip', '-br', '-4', "
                     "'addr'], capture_output=True, text=True).stdout.split()[-1])\n"
                     "sys.argv = ['fusegrad'] + sys.argv[1:]\nrunpy.run_module('fusegrad', run_name='__main__')\n")
    run = across(hosts, [str(probe), "train"] + [x for k, v in cfg.items() for x in (f"--{k}", str(v))], tmp_path, 120)
    assert run.returncode == 0, run.stderr[-3000:]
    ips = hosts[2].split(",")
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == [f"{ips[0]}/24", f"{ips[1]}/24"]
    state = load_checkpoint(tmp_path / "two" / "checkpoint.safetensors")
    np.testing.assert_allclose(state["history"]["loss"], one.history["loss"], rtol=1e-5)


def test_a_rank_killed_mid_run_stops_the_other_in_bounded_time(hosts, data_dir, tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal
        from mpi4py import MPI
        from fusegrad.train.trainer import TrainConfig, Trainer
        trainer = Trainer(TrainConfig(**{config(data_dir, tmp_path / "kill", max_steps=200)!r}))
        if MPI.COMM_WORLD.Get_rank() == 1:
            step = trainer.train_step
            def dies():
                if trainer.step == 3:
                    os.kill(os.getpid(), signal.SIGKILL)  # no Python cleanup, no MPI_Abort: a host gone
                return step()
            trainer.train_step = dies
        trainer.run()
    """))
    run = across(hosts, [str(script)], tmp_path, timeout=90)  # a hang would raise TimeoutExpired instead
    assert run.returncode != 0
    out = run.stdout + run.stderr
    ip_b = hosts[2].split(",")[1]
    assert "BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES" in out and f"RUNNING AT {ip_b}" in out, out[-3000:]
    assert load_checkpoint(tmp_path / "kill" / "checkpoint.safetensors")["step"] == 2  # it died mid-run, after step 2
