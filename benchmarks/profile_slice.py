"""Where one worker's slice of a training step goes: loss + backward of stories15M (or --preset) on 4 x 256 tokens
(what each of `fusegrad train`'s two worker processes runs), traced, on the threads the environment gives it.

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 PYTHONPATH=. python benchmarks/profile_slice.py [--lora] [--slices 3]
    ... profile_slice.py --preset stories110M --batch 2    # a worker's half of `fusegrad bench`'s batch 4
    ... profile_slice.py --model SmolLM2-135M-DIR --batch 2 --lora    # a checkpoint instead of a preset

Prints the wall time a slice, the tracer's summary, then every GEMM shape (the fused op it serves, m k n batch)
with its milliseconds a slice, its share of GEMM time and its GFLOP/s, and the 2048^3 sgemm peak of the same
threads for scale. --lora: adapters r 8 on q, k, v, o (the base frozen, as `fusegrad finetune`).
"""
import argparse
import collections
import time

import numpy as np

import fusegrad as fg
from fusegrad.cli.bench import sgemm_peak
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.models.llama import Llama


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", action="store_true")
    p.add_argument("--slices", type=int, default=3)
    p.add_argument("--preset", default="stories15M")
    p.add_argument("--model", help="a checkpoint (HF dir, llama2.c .bin, run dir) instead of --preset")
    p.add_argument("--batch", type=int, default=4, help="sequences in the slice (a worker's share of a step)")
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    model = Llama.from_pretrained(args.model) if args.model else Llama.from_preset(args.preset, seed=0)
    adapters = list(attach_lora(model, LoraConfig(targets="q,k,v,o", r=8, alpha=16)).parameters()) if args.lora else []
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (args.batch, args.seq + 1))

    def slice_():
        model.loss(tokens).backward()
        for t in list(model.params.values()) + adapters:
            t.grad = None

    for _ in range(2):  # warm-up: kernels loaded, malloc's arenas grown
        slice_()
    with fg.trace() as tracer:
        wall = sum(_timed(slice_) for _ in range(args.slices)) / args.slices
    print(f"{'LoRA' if args.lora else 'full'} slice: {wall * 1e3:.0f} ms")
    print(tracer.summary(20))
    gemms = collections.defaultdict(lambda: [0, 0, 0.0])  # (op, m, k, n, batch) -> [ns, calls, flops]
    for name, _, _, dur, _, _, a in tracer.events:
        if name == "gemm":
            row = gemms[(a.get("op", "-"), a["m"], a["k"], a["n"], a["batch"])]
            row[0] += dur
            row[1] += 1
            row[2] += 2.0 * a["m"] * a["k"] * a["n"] * a["batch"]
    total = sum(r[0] for r in gemms.values())
    print(f"sgemm 2048^3 on these threads: {sgemm_peak(2048) / 1e9:.0f} GFLOP/s")
    print(f"{'op':<11} {'m':>5} {'k':>6} {'n':>6} {'batch':>5}  {'ms/slice':>8}  {'share':>6}  {'GFLOP/s':>7}  calls/slice")
    for (op, m, k, n, batch), (ns, calls, flops) in sorted(gemms.items(), key=lambda kv: -kv[1][0]):
        print(f"{op:<11} {m:>5} {k:>6} {n:>6} {batch:>5}  {ns / args.slices / 1e6:>8.1f}  {ns / total:>6.1%}  "
              f"{flops / ns:>7.0f}  {calls // args.slices}")


if __name__ == "__main__":
    main()
