"""`fusegrad bench`: timed Llama training steps, model FLOP/s against a measured sgemm peak, and a peer.

    fusegrad bench --preset stories15M --batch 8 --seq 256 --steps 5 --json --vs torch
    fusegrad bench --preset stories15M --lora --targets q,k,v,o --rank 8 --vs peft [--qlora]
    fusegrad bench --preset stories260K --backend torch:cpu       # fusegrad on its torch backend
    fusegrad bench --preset stories260K --ranks 2                 # data-parallel: mpirun -n 2, 1 thread each
    fusegrad bench --preset tiny --batch 2 --seq 16 --steps 2 --trace out.json

The steps are described in fusegrad/cli/bench_sides.py. With a peer (`--vs torch` for the full step,
`--vs peft` for `--lora`: transformers + peft on the same base weights, NF4 by bitsandbytes with --qlora)
each side runs in its own worker process (so peak RSS is its own), both start from the same weights and
get the same batches, and the parent alternates them step by step (fusegrad first on even steps, the peer
first on odd ones); `speedup_vs_<peer>` is the median of the per-pair ratios peer_step_s / fusegrad_step_s.
The first step on each side is a warm-up whose loss is compared (`losses_agree`): both sides do the same
work from the same state (LoRA's B starts at 0, so step 0 is the base model on both).

`--ranks N` runs the fusegrad side under `mpirun -n N` with one thread per rank; each rank takes B/N rows
of the global batch, tokens/s counts the global batch, and peak_rss_mb is the sum over ranks.

Model FLOPs per step (nanoGPT / PaLM accounting): 6 N tokens + 12 L H D T tokens, where N counts every weight
a GEMM multiplies by (a tied embedding once, as the classifier; an untied input embedding is a lookup and is
left out) and the second term is attention's QK^T and PV, forward and backward, counted over the full T x T
square as PaLM does (a causal kernel does about half of it). A LoRA step does no dW for the frozen base:
4 N tokens + 6 P tokens + the attention term, with P the adapter parameters.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from fusegrad.backends.openblas import blas_info
from fusegrad.cli.bench_worker import ProcessWorker, Worker


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time training steps (tokens/s, FLOP/s, MFU, RSS), optionally vs a peer",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="stories15M", help="model preset (tiny, stories260K, stories15M, ...)")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over --ranks)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vs", choices=["torch", "peft"], default=None,
                   help="also time the PyTorch eager step (torch) or, with --lora, transformers + peft (peft)")
    p.add_argument("--backend", default="numpy", help="fusegrad's backend: numpy, torch:cpu, torch:cuda, ...")
    p.add_argument("--ranks", type=int, default=0, help="run fusegrad under mpirun -n RANKS (1 thread each)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes splitting each batch, one core each (0 = one per core, as `fusegrad train`)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--trace", default="", help="write a Chrome trace of fusegrad's timed steps here")
    p.add_argument("--lora", action="store_true", help="benchmark a LoRA fine-tuning step (base frozen)")
    p.add_argument("--targets", default="q,v", help="LoRA target modules (q,k,v,o,gate,up,down or all)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--qlora", action="store_true", help="with --lora: the base projections in NF4")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square sgemm measuring the peak")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_bench)


# -- figures ------------------------------------------------------------------------------------------
def gemm_params(config) -> int:
    """Weights that a GEMM multiplies by per token (see the module docstring)."""
    c = config
    per_layer = c.dim * (c.dim + 2 * c.kv_dim) + c.dim * c.dim + 3 * c.dim * c.hidden_dim
    return c.n_layers * per_layer + c.vocab_size * c.dim


def flops_per_step(config, batch: int, seq: int, lora_params: int | None = None) -> float:
    """Model FLOPs of a full training step, or of a LoRA step with `lora_params` adapter weights."""
    tokens = batch * seq
    attention = 12.0 * config.n_layers * config.n_heads * config.head_dim * seq * tokens
    if lora_params is None:
        return 6.0 * gemm_params(config) * tokens + attention
    return 4.0 * gemm_params(config) * tokens + 6.0 * lora_params * tokens + attention


def sgemm_peak(n: int, repeats: int = 3) -> float:
    """Best FLOP/s of an (n, n) x (n, n) float32 numpy matmul over a few runs."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


# -- the run -------------------------------------------------------------------------------------------
def summarize(results: list, flops: float, tokens: int, peak: float, first: dict, end: dict) -> dict:
    times = [r["step_s"] for r in results]
    median = statistics.median(times)
    model_flops = flops / median
    return {"tokens_per_s": tokens / median,
            "step_s": {"median": median, "min": min(times), "max": max(times)},
            "model_flops_per_s": model_flops, "mfu": model_flops / peak, "peak_rss_mb": end["peak_rss_mb"],
            "loss_step0": first["loss"], "init_s": end["init_s"], "first_step_s": first["step_s"],
            "dispatches_per_step": results[-1]["dispatches"]}


def check_args(args) -> None:
    from fusegrad.core.errors import ShapeError

    if args.steps < 1 or args.warmup < 1 or args.batch < 1 or args.seq < 1:
        raise ShapeError(f"bench: --steps, --warmup, --batch and --seq must be >= 1, got {args.steps}, "
                         f"{args.warmup}, {args.batch}, {args.seq}")
    if args.vs == "peft" and not args.lora or args.vs == "torch" and args.lora:
        raise ShapeError(f"bench: --vs {args.vs} {'needs' if args.vs == 'peft' else 'cannot time'} --lora "
                         f"(the peer of --lora is --vs peft, of the full step --vs torch)")
    if args.qlora and not args.lora:
        raise ShapeError("bench: --qlora needs --lora")
    if args.ranks < 0 or args.ranks and args.batch % args.ranks:
        raise ShapeError(f"bench: --batch {args.batch} must split evenly over --ranks {args.ranks}")
    if args.ranks and args.lora:
        raise ShapeError("bench: --ranks times the full training step; it does not combine with --lora")
    rows = args.batch // max(args.ranks, 1)
    if args.workers < 0 or args.workers > rows or args.lora and args.workers > 1:
        raise ShapeError(f"bench: --workers {args.workers} must be 0 (auto) or 1..{rows} (rows per rank)"
                         + (", and 1 with --lora" if args.lora else ""))


def start_workers(args, spec: dict) -> dict:
    """fusegrad's worker, then the peer's (which needs peft's target names from fusegrad's LoRA)."""
    if not (args.vs or args.ranks or args.backend != "numpy"):  # another backend would become the default here
        return {"fusegrad": Worker("fusegrad", spec)}
    workers = {"fusegrad": ProcessWorker("fusegrad", spec, ranks=args.ranks)}
    if args.vs == "peft":
        spec = dict(spec, lora=dict(spec["lora"], **workers["fusegrad"].info))
    if args.vs:
        workers[args.vs] = ProcessWorker(args.vs, spec)
    return workers


def run_bench(args) -> int:
    from fusegrad.models.llama import Llama, preset

    check_args(args)
    config = preset(args.preset, max_seq_len=max(args.seq, 1))
    model = Llama(config, seed=args.seed)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory(prefix="fusegrad-bench-") as tmp:
        weights = os.path.join(tmp, "weights.npz")
        np.savez(weights, **{n: t.data for n, t in model.params.items()})
        if args.vs == "peft":  # the peer loads the same base as a Hugging Face directory
            model.save_pretrained(os.path.join(tmp, "hf"))
        del model
        lora = dict(targets=args.targets, rank=args.rank, alpha=args.alpha, qlora=args.qlora) if args.lora else None
        spec = {"config": config.to_dict(), "weights": weights, "batch": args.batch, "seq": args.seq,
                "seed": args.seed, "trace": os.path.abspath(args.trace) if args.trace else "",
                "backend": args.backend, "lora": lora, "hf_dir": os.path.join(tmp, "hf"), "workers": args.workers}
        workers = start_workers(args, spec)
        sides = list(workers)
        firsts = {side: [w.step() for _ in range(args.warmup)][0] for side, w in workers.items()}
        if args.trace:
            workers["fusegrad"].start_trace()
        results = {side: [] for side in sides}
        for i in range(args.steps):
            for side in (sides if i % 2 == 0 else sides[::-1]):  # alternate who goes first
                results[side].append(workers[side].step())
        ends = {side: w.finish() for side, w in workers.items()}
    info = workers["fusegrad"].info
    flops = flops_per_step(config, args.batch, args.seq, info.get("trainable_params"))
    peak = sgemm_peak(args.gemm_size)
    out = {"preset": args.preset, "config": config.to_dict(), "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "tokens_per_step": tokens, "gemm_params": gemm_params(config),
           "model_flops_per_step": flops, "sgemm_peak_flops_per_s": peak, "sgemm_size": args.gemm_size,
           "jit": os.environ.get("FUSEGRAD_JIT", "1") != "0", "backend": args.backend,
           "ranks": ends["fusegrad"]["ranks"], "workers": info.get("workers", 1), **blas_info()}
    if args.lora:
        out["lora"] = dict(lora, **info)
    out.update(summarize(results["fusegrad"], flops, tokens, peak, firsts["fusegrad"], ends["fusegrad"]))
    if args.trace:
        out["trace"] = spec["trace"]
    if args.vs:
        peer = summarize(results[args.vs], flops, tokens, peak, firsts[args.vs], ends[args.vs])
        peer.pop("dispatches_per_step")
        out[args.vs] = peer
        out[f"speedup_vs_{args.vs}"] = statistics.median(
            t["step_s"] / f["step_s"] for f, t in zip(results["fusegrad"], results[args.vs]))
        out[f"rss_ratio_vs_{args.vs}"] = out["peak_rss_mb"] / peer["peak_rss_mb"]
        out["losses_agree"] = abs(out["loss_step0"] - peer["loss_step0"]) <= 1e-3 * abs(peer["loss_step0"])
    print(json.dumps(out) if args.json else format_report(out, args.vs))
    return 0


def format_report(out: dict, vs) -> str:
    lines = [f"{out['preset']} batch {out['batch']} x seq {out['seq']}, {out['steps']} timed steps, "
             f"backend {out['backend']}, {out['ranks']} rank(s) x {out['workers']} worker process(es), "
             f"sgemm peak {out['sgemm_peak_flops_per_s'] / 1e9:.1f} GFLOP/s on OpenBLAS's {out['blas_core']} kernels"
             + (f" (OPENBLAS_CORETYPE={out['openblas_coretype_env']})" if out["openblas_coretype_env"] else "")]
    if "lora" in out:
        lo = out["lora"]
        lines.append(f"{'QLoRA' if lo['qlora'] else 'LoRA'} r {lo['rank']} alpha {lo['alpha']} on {lo['targets']}: "
                     f"{lo['trainable_params']} trainable params"
                     + (f", NF4 base {lo['memory']['nf4_bytes']} B vs fp32 {lo['memory']['fp32_bytes']} B "
                        f"({lo['memory']['ratio']:.3f}x)" if lo["memory"] else ""))
    for name, row in [("fusegrad", out)] + ([(vs, out[vs])] if vs else []):
        s = row["step_s"]
        lines.append(f"{name:>9}: {row['tokens_per_s']:8.1f} tok/s  step {s['median']:.3f}s (min {s['min']:.3f}, "
                     f"max {s['max']:.3f})  {row['model_flops_per_s'] / 1e9:6.1f} GFLOP/s  MFU {row['mfu']:.2f}  "
                     f"RSS {row['peak_rss_mb']:.0f} MB  loss0 {row['loss_step0']:.4f}")
    lines.append(f"dispatches per step: {out['dispatches_per_step']}")
    if vs:
        lines.append(f"speedup vs {vs} (median of per-step ratios): {out[f'speedup_vs_{vs}']:.2f}x, "
                     f"RSS ratio {out[f'rss_ratio_vs_{vs}']:.2f}, step-0 losses agree: {out['losses_agree']}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="fusegrad")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench"] + sys.argv[1:])
    sys.exit(args.func(args))
