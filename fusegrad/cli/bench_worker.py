"""The processes of `fusegrad bench`: a Worker times one side's steps; `ProcessWorker` runs it in a child
(so its peak RSS is its own), or as N MPI ranks under mpirun (`ranks=N`, one BLAS/Numba thread each).

The parent sends one command per line on the child's stdin (step | trace | finish) and reads one JSON
line back. Under mpirun only rank 0 gets stdin (mpiexec forwards it there), so rank 0 passes each
command on to the other ranks and alone answers; a step's time on rank 0 includes the gradient Allreduce,
which waits for the slowest rank.

    python -m fusegrad.cli.bench_worker fusegrad '{"config": ..., "weights": "w.npz", ...}'
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from fusegrad.cli.bench_sides import SIDES

ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def batch_tokens(seed: int, step: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    """The global batch (B, T+1) of a step: the same on every side and every rank."""
    return np.random.default_rng((seed, step)).integers(0, vocab, (batch, seq + 1))


def dispatch_counts() -> dict:
    from fusegrad.core.trace import TRACER

    return {k.split(":", 1)[1]: n for k, n in TRACER.counters.items() if k.startswith("dispatch:")}


class Worker:
    """One side, in this process; `ProcessWorker` runs the same protocol in a child process."""

    def __init__(self, side: str, spec: dict):
        t0 = time.perf_counter()
        self.spec = spec
        self.side = SIDES[side](spec)
        self.dp = getattr(self.side, "dp", None)
        self.info = getattr(self.side, "info", {})
        self.steps = 0
        self.init_s = time.perf_counter() - t0

    @property
    def is_main(self) -> bool:
        return self.dp is None or self.dp.is_main

    def step(self) -> dict:
        from fusegrad.core.trace import TRACER

        s = self.spec
        tokens = batch_tokens(s["seed"], self.steps, s["batch"], s["seq"], s["config"]["vocab_size"])
        before = dispatch_counts()
        t0 = time.perf_counter()
        loss = self.side.step(tokens)
        dt = time.perf_counter() - t0
        self.steps += 1
        if TRACER.enabled:
            TRACER.mark_step(self.steps)
        after = dispatch_counts()
        return {"step_s": dt, "loss": loss, "dispatches": {k: n - before.get(k, 0) for k, n in after.items()}}

    def start_trace(self) -> None:
        from fusegrad.core.trace import TRACER

        TRACER.reset()
        TRACER.enabled = True

    def finish(self) -> dict:
        from fusegrad.core.trace import TRACER

        if self.spec.get("trace") and TRACER.enabled:
            if self.is_main:
                TRACER.save_chrome(self.spec["trace"])
            TRACER.enabled = False
        own = peak_rss_mb() + getattr(self.side, "helpers_peak_rss_mb", lambda: 0.0)()  # with its worker processes
        rss = own if self.dp is None else self.dp.comm.allreduce(own)  # all ranks' sum
        return {"peak_rss_mb": rss, "init_s": self.init_s, "ranks": 1 if self.dp is None else self.dp.size}


class ProcessWorker:
    def __init__(self, side: str, spec: dict, ranks: int = 0):
        cmd = [sys.executable, "-m", "fusegrad.cli.bench_worker", side, json.dumps(spec)]
        env = None
        if side != "fusegrad" and os.environ.get("FUSEGRAD_MALLOC", "") != "default":
            from fusegrad.backends.numpy_backend import KEEP_FREED_MEMORY_ENV

            env = dict(os.environ, **KEEP_FREED_MEMORY_ENV)  # a fair peer: the same malloc policy as fusegrad
        if ranks:
            mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
            if mpirun is None:
                from fusegrad.core.errors import BackendError

                raise BackendError("bench --ranks needs mpirun on PATH (pip install 'fusegrad[mpi]')")
            cmd, env = [mpirun, "-n", str(ranks)] + cmd, dict(os.environ, **ONE_THREAD)
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = self._read()
        self.init_s, self.info = hello["init_s"], hello["info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            from fusegrad.core.errors import BackendError

            raise BackendError(f"bench worker {self.side!r} exited with code {self.proc.wait()}")
        return json.loads(line)

    def _ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def step(self) -> dict:
        return self._ask("step")

    def start_trace(self) -> None:
        self._ask("trace")

    def finish(self) -> dict:
        out = self._ask("finish")
        self.proc.wait()
        return out


COMMAND_TAG = 7  # MPI tag of the commands rank 0 passes on
IDLE_POLL_S = 0.0005


def commands(worker: Worker):
    """stdin's commands; under MPI rank 0 reads them and sends each to the other ranks ('' = stdin closed).

    The other ranks wait for a command asleep, polling: MPI's blocking receive spins, and a spinning idle
    rank would steal a core from the peer timed in between (torch ran 9.3 s steps instead of 1.2 s).
    """
    dp = worker.dp
    while True:
        if dp is None or dp.is_main:
            command = sys.stdin.readline().strip()
            for rank in range(1, dp.size if dp is not None else 1):
                dp.comm.send(command, dest=rank, tag=COMMAND_TAG)
        else:
            request = dp.comm.irecv(source=0, tag=COMMAND_TAG)
            done, command = request.test()
            while not done:
                time.sleep(IDLE_POLL_S)
                done, command = request.test()
        if not command:
            return
        yield command


def worker_main(side: str, spec_json: str) -> int:
    """The child's loop: one JSON line answers each command read from stdin (rank 0 alone answers)."""
    worker = Worker(side, json.loads(spec_json))

    def answer(obj) -> None:
        if worker.is_main:
            print(json.dumps(obj), flush=True)
    answer({"init_s": worker.init_s, "info": worker.info})
    # a failing rank must stop the others, which would otherwise wait in the next Allreduce forever
    with worker.dp.abort_on_error() if worker.dp is not None else contextlib.nullcontext():
        for command in commands(worker):
            if command == "step":
                answer(worker.step())
            elif command == "trace":
                worker.start_trace()
                answer({})
            elif command == "finish":
                answer(worker.finish())
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], sys.argv[2]))
