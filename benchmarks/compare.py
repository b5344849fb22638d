"""fusegrad's training step side by side with a peer, or as MPI ranks: each side in its own process (so its
peak RSS is its own), all from the same weights on the same batches: what `fusegrad bench --vs torch|peft`
and `fusegrad bench --ranks N` run, with the same options:

    python -m benchmarks.compare --preset stories15M --batch 8 --seq 256 --steps 5 --json --vs torch
    python -m benchmarks.compare --preset stories15M --lora --targets q,k,v,o --rank 8 --alpha 16 --vs peft
    python -m benchmarks.compare --preset stories260K --ranks 2

The parent alternates the sides step by step (fusegrad first on even steps, the peer first on odd ones) and
measures the sgemm peak itself between steps, so each step's MFU is against the mean of the peaks measured just
before and just after it; `speedup_vs_<peer>` is the median of the per-pair ratios peer_step_s / fusegrad_step_s.
The first step on each side is a warm-up whose loss is compared (`losses_agree`): both sides do the same work
from the same state (LoRA's B starts at 0, so step 0 is the base model on both).

`--ranks N` runs fusegrad's side under `mpirun -n N` with one thread per rank; each rank takes B/N rows of the
global batch, tokens/s counts the global batch, and peak_rss_mb is the sum over ranks.

A side process reads one command per line on stdin (step | trace | finish) and answers one JSON line. Under
mpirun only rank 0 gets stdin, so rank 0 passes each command on to the other ranks and alone answers; a step's
time on rank 0 includes the gradient Allreduce, which waits for the slowest rank.

    python -m benchmarks.compare --side fusegrad '{"config": ..., "batch": 8, ...}'
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from fusegrad.backends.numpy_backend import KEEP_FREED_MEMORY_ENV
from fusegrad.cli import bench
from fusegrad.core.errors import BackendError

ONE_THREAD = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: `benchmarks` imports from here


def side_class(name: str):
    if name == "fusegrad":
        return bench.FusegradSide
    from benchmarks import peers  # torch, transformers and peft: only in a peer's process (its RSS is its own)

    return {"torch": peers.TorchSide, "peft": peers.PeftSide}[name]


class ProcessWorker:
    """One side in a child process (or N MPI ranks under mpirun), driven over its stdin/stdout."""

    def __init__(self, side: str, spec: dict, ranks: int = 0):
        cmd = [sys.executable, "-m", "benchmarks.compare", "--side", side, json.dumps(spec)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        if side != "fusegrad" and os.environ.get("FUSEGRAD_MALLOC", "") != "default":
            env.update(KEEP_FREED_MEMORY_ENV)  # a fair peer: the same malloc policy as fusegrad
        if ranks:
            mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
            if mpirun is None:
                raise BackendError("bench --ranks needs mpirun on PATH (pip install 'fusegrad[mpi]')")
            cmd = [mpirun, "-n", str(ranks)] + cmd
            env.update(ONE_THREAD)
        self.side = side
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        hello = self._read()
        self.init_s, self.info = hello["init_s"], hello["info"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
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


def run(args) -> int:
    bench.check_args(args)
    bench.emit(compare(args) if args.vs or args.ranks else bench.measure(args), args.json, args.vs)
    return 0


def compare(args) -> dict:
    """The report of `fusegrad bench` with a peer (args.vs) and/or MPI ranks (args.ranks)."""
    load_before, spec = os.getloadavg()[0], bench.spec_of(args)
    workers = {"fusegrad": ProcessWorker("fusegrad", spec, ranks=args.ranks)}
    if args.vs == "peft":  # the peer needs peft's target names from fusegrad's LoRA
        spec = dict(spec, lora=dict(spec["lora"], peft_target_modules=workers["fusegrad"].info["peft_target_modules"]))
    if args.vs:
        workers[args.vs] = ProcessWorker(args.vs, spec)
    names = list(workers)
    firsts = {side: [w.step() for _ in range(args.warmup)][0] for side, w in workers.items()}
    if args.trace:
        workers["fusegrad"].start_trace()
    # who goes first alternates: fusegrad on even steps, the peer on odd ones
    order = [side for i in range(args.steps) for side in (names if i % 2 == 0 else names[::-1])]
    results = {side: [] for side in names}
    for side, result in zip(order, bench.timed_steps([workers[side] for side in order], args.gemm_size)):
        results[side].append(result)
    ends = {side: w.finish() for side, w in workers.items()}
    info = workers["fusegrad"].info
    out = bench.report(args, spec, info, results["fusegrad"], firsts["fusegrad"], ends["fusegrad"], load_before)
    if args.vs:
        peer = bench.summarize(results[args.vs], info["flops_per_step"], out["tokens_per_step"], firsts[args.vs],
                               ends[args.vs])
        peer.pop("dispatches_per_step")
        out[args.vs] = dict(peer, kernels=workers[args.vs].info["kernels"])
        out[f"speedup_vs_{args.vs}"] = statistics.median(
            t["step_s"] / f["step_s"] for f, t in zip(results["fusegrad"], results[args.vs]))
        out[f"rss_ratio_vs_{args.vs}"] = out["peak_rss_mb"] / peer["peak_rss_mb"]
        out["losses_agree"] = abs(out["loss_step0"] - peer["loss_step0"]) <= 1e-3 * abs(peer["loss_step0"])
    return bench.flag_noise(out, args.vs)


# -- a side's process ----------------------------------------------------------------------------------------
COMMAND_TAG = 7  # MPI tag of the commands rank 0 passes on
IDLE_POLL_S = 0.0005


def commands(dp):
    """stdin's commands; under MPI rank 0 reads them and sends each to the other ranks ('' = stdin closed).

    The other ranks wait for a command asleep, polling: MPI's blocking receive spins, and a spinning idle
    rank would steal a core from the peer timed in between (torch ran 9.3 s steps instead of 1.2 s).
    """
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


def side_main(side: str, spec_json: str) -> int:
    """The child's loop: one JSON line answers each command read from stdin (rank 0 alone answers)."""
    timer = bench.Timer(side_class(side), json.loads(spec_json))

    def answer(obj) -> None:
        if timer.is_main:
            print(json.dumps(obj), flush=True)
    answer({"init_s": timer.init_s, "info": timer.info})
    # a failing rank must stop the others, which would otherwise wait in the next Allreduce forever
    with timer.dp.abort_on_error() if timer.dp is not None else contextlib.nullcontext():
        for command in commands(timer.dp):
            if command == "step":
                answer(timer.step())
            elif command == "trace":
                timer.start_trace()
                answer({})
            elif command == "finish":
                answer(timer.finish())
                return 0
    return 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--side"]:
        return side_main(argv[1], argv[2])
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare")
    bench.add_parser(parser.add_subparsers(dest="command")).set_defaults(func=run)  # `fusegrad bench`'s options
    args = parser.parse_args(["bench"] + argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
