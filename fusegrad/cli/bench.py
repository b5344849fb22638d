"""`fusegrad bench`: the product's own training step, timed: tokens/s, model FLOP/s against a measured sgemm
peak (MFU), peak RSS, GEMM dispatches per step.

    fusegrad bench --preset stories15M --batch 8 --seq 256 --steps 5 --json
    fusegrad bench --preset stories15M --lora --targets q,k,v,o --rank 8 [--qlora]
    fusegrad bench --preset stories260K --backend torch:cpu       # fusegrad on its torch backend
    fusegrad bench --preset tiny --batch 2 --seq 16 --steps 2 --trace out.json

The step is the one `fusegrad train` runs (train/loop.py: loss, backward, global-norm clip 1.0, AdamW with
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices, at a constant lr 3e-4 here), split over one worker
process per core as `fusegrad train` does by default; with --lora, the step `fusegrad finetune` runs (adapters
only, base frozen or NF4 with --qlora; clip 1.0, lr 1e-3, no weight decay). Each step gets the next batch of
one seeded stream; the first --warmup steps are not timed.

Side by side with a peer (`--vs torch` for the full step, `--vs peft` for --lora) or as MPI ranks (`--ranks
N`, one thread each), each side runs in its own process, driven by the comparison harness of a fusegrad
checkout (benchmarks/compare.py; `python -m benchmarks.compare` takes the same options):

    fusegrad bench --preset stories15M --batch 8 --seq 256 --steps 5 --json --vs torch
    fusegrad bench --preset stories15M --lora --targets q,k,v,o --rank 8 --vs peft [--qlora]
    fusegrad bench --preset stories260K --ranks 2

Model FLOPs per step come from the model (`Llama.flops_per_token`, nanoGPT / PaLM accounting).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from fusegrad.backends import get_backend
from fusegrad.backends.openblas import blas_info
from fusegrad.core.errors import BackendError, ConfigError
from fusegrad.core.trace import TRACER, mark_step, trace
from fusegrad.finetune.lora import HF_MODULES, LoraConfig, attach_lora
from fusegrad.finetune.losses import lm_loss
from fusegrad.finetune.qlora import attach_qlora
from fusegrad.models.llama import PRESETS, Llama, LlamaConfig, preset
from fusegrad.parallel.mpi import DataParallel
from fusegrad.parallel.workers import peak_rss_mb
from fusegrad.train.loop import Run, RunConfig, start_workers, use_backend
from fusegrad.train.optim import AdamW

FULL_STEP = dict(lr=3e-4, weight_decay=0.1)  # the settings a peer's full step mirrors (clip 1.0, betas, eps)
LORA_STEP = dict(lr=1e-3, weight_decay=0.0)


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="time the training step (tokens/s, FLOP/s, MFU, RSS), optionally vs a peer",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="stories15M", help="model preset (tiny, stories260K, stories15M, ...)")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over --ranks)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vs", choices=["torch", "peft"], default=None,
                   help="also time the PyTorch eager step (torch) or, with --lora, transformers + peft (peft)")
    p.add_argument("--ranks", type=int, default=0, help="run fusegrad under mpirun -n RANKS (1 thread each)")
    p.add_argument("--backend", default="numpy", help="fusegrad's backend: numpy, torch:cpu, torch:cuda, ...")
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
    return p


def check_args(args) -> None:
    if args.preset not in PRESETS:
        raise ConfigError(f"bench: unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.steps < 1 or args.warmup < 1 or args.batch < 1 or args.seq < 1:
        raise ConfigError(f"bench: --steps, --warmup, --batch and --seq must be >= 1, got {args.steps}, "
                          f"{args.warmup}, {args.batch}, {args.seq}")
    if args.vs == "peft" and not args.lora or args.vs == "torch" and args.lora:
        raise ConfigError(f"bench: --vs {args.vs} {'needs' if args.vs == 'peft' else 'cannot time'} --lora "
                          f"(the peer of --lora is --vs peft, of the full step --vs torch)")
    if args.qlora and not args.lora:
        raise ConfigError("bench: --qlora needs --lora")
    if args.ranks < 0 or args.ranks and args.batch % args.ranks:
        raise ConfigError(f"bench: --batch {args.batch} must split evenly over --ranks {args.ranks}")
    if args.ranks and args.lora:
        raise ConfigError("bench: --ranks times the full training step; it does not combine with --lora")
    rows = args.batch // max(args.ranks, 1)
    if args.workers < 0 or args.workers > rows or args.lora and args.workers > 1:
        raise ConfigError(f"bench: --workers {args.workers} must be 0 (auto) or 1..{rows} (rows per rank)"
                          + (", and 1 with --lora" if args.lora else ""))


# -- the step --------------------------------------------------------------------------------------------
def batch_tokens(seed: int, step: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    """The global batch (B, T+1) of a step: the same on every side and every rank."""
    return np.random.default_rng((seed, step)).integers(0, vocab, (batch, seq + 1))


class BenchRun(Run):
    """The step `fusegrad train` runs (or with `lora`, the one `fusegrad finetune` runs) on the batch in
    `self.tokens` (B, T+1), at a constant lr."""

    def __init__(self, model, batch: int, backend: str = "numpy", lora: dict | None = None, workers: int = 0,
                 seed: int = 0):
        settings = LORA_STEP if lora else FULL_STEP
        super().__init__(RunConfig(batch_size=batch, max_steps=1, warmup_steps=0, min_lr=settings["lr"], seed=seed,
                                   **settings))
        self.model, self.backend, self.tokens, self.lora = model, backend, None, None
        self.dp = DataParallel.from_env()  # None unless mpirun started several ranks
        self.info = {}
        named = model.named_parameters()
        if lora:  # adapters as fine-tuning attaches them (no dropout)
            cfg = LoraConfig(targets=lora["targets"], r=lora["rank"], alpha=lora["alpha"], seed=seed)
            self.lora, memory = attach_qlora(model, cfg) if lora["qlora"] else (attach_lora(model, cfg), None)
            named = self.lora.named_parameters()
            self.info = {"trainable_params": sum(t.numel() for _, t in named), "memory": memory,
                         "peft_target_modules": [HF_MODULES[t].split(".")[1] for t in cfg.targets]}
        self.optimizer = AdamW(named, **settings)
        rows = batch // (self.dp.size if self.dp is not None else 1)
        self.workers = None if lora else start_workers(model, workers, rows, backend == "numpy" and self.dp is None)
        self.info["workers"] = self.workers.workers if self.workers is not None else 1

    def micro_batch(self, grad_scale: float) -> tuple[float, int]:
        if self.lora is None:
            return self.model_loss_backward(self.tokens, grad_scale)
        tokens = self.tokens  # fine-tuning's loss of one length group; every target counts (no prompt)
        n = tokens.shape[0] * (tokens.shape[1] - 1)
        loss = lm_loss(self.model, tokens, np.ones((tokens.shape[0], tokens.shape[1] - 1), bool), n)
        (loss * grad_scale if grad_scale != 1.0 else loss).backward()
        return loss.item(), n


class FusegradSide:
    """fusegrad's side of a benchmark: a BenchRun on the model of `spec` (config, seed, batch, seq, backend,
    lora, workers), on `spec["backend"]` for the steps only."""
    name = "fusegrad"

    def __init__(self, spec: dict):
        get_backend("numpy").prewarm_kernels()  # JIT kernels load from the disk cache before the first step
        self.backend = spec["backend"]
        with use_backend(self.backend):
            model = Llama(LlamaConfig.from_dict(spec["config"]), seed=spec["seed"])
        self.run = BenchRun(model, spec["batch"], self.backend, spec.get("lora"), spec.get("workers", 0), spec["seed"])
        self.dp, self.info = self.run.dp, self.run.info
        self.info["flops_per_step"] = model.flops_per_token(spec["seq"]) * spec["batch"] * spec["seq"]

    def step(self, tokens) -> float:
        self.run.tokens = tokens
        with use_backend(self.backend):
            return self.run.train_step()

    def helpers_peak_rss_mb(self) -> float:
        return self.run.workers.helpers_peak_rss_mb() if self.run.workers is not None else 0.0


def dispatch_counts() -> dict:
    return {k.split(":", 1)[1]: n for k, n in TRACER.counters.items() if k.startswith("dispatch:")}


class Timer:
    """Times one side's steps (a side: .step(tokens) -> loss) on the seeded batch stream; `finish()` -> peak
    RSS (with helper processes; summed over MPI ranks) and set-up time."""

    def __init__(self, side_class, spec: dict):
        t0 = time.perf_counter()
        self.spec, self.side = spec, side_class(spec)
        self.dp, self.info = getattr(self.side, "dp", None), getattr(self.side, "info", {})
        self.steps, self.tracing, self.tracer = 0, contextlib.ExitStack(), None
        self.init_s = time.perf_counter() - t0

    @property
    def is_main(self) -> bool:
        return self.dp is None or self.dp.is_main

    def step(self) -> dict:
        s = self.spec
        tokens = batch_tokens(s["seed"], self.steps, s["batch"], s["seq"], s["config"]["vocab_size"])
        before = dispatch_counts()
        t0 = time.perf_counter()
        loss = self.side.step(tokens)
        dt = time.perf_counter() - t0
        self.steps += 1
        mark_step(self.steps)
        after = dispatch_counts()
        return {"step_s": dt, "loss": loss, "dispatches": {k: n - before.get(k, 0) for k, n in after.items()
                                                                 if n != before.get(k, 0)}}

    def start_trace(self) -> None:
        self.tracer = self.tracing.enter_context(trace())

    def finish(self) -> dict:
        if self.spec.get("trace") and self.tracer is not None and self.is_main:
            self.tracer.save_chrome(self.spec["trace"])
        self.tracing.close()
        own = peak_rss_mb() + getattr(self.side, "helpers_peak_rss_mb", lambda: 0.0)()  # with its worker processes
        rss = own if self.dp is None else self.dp.comm.allreduce(own)  # all ranks' sum
        return {"peak_rss_mb": rss, "init_s": self.init_s, "ranks": 1 if self.dp is None else self.dp.size}


# -- the report ------------------------------------------------------------------------------------------
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


def summarize(results: list, flops: float, tokens: int, peak: float, first: dict, end: dict) -> dict:
    times = [r["step_s"] for r in results]
    median = statistics.median(times)
    model_flops = flops / median
    return {"tokens_per_s": tokens / median,
            "step_s": {"median": median, "min": min(times), "max": max(times)},
            "model_flops_per_s": model_flops, "mfu": model_flops / peak, "peak_rss_mb": end["peak_rss_mb"],
            "loss_step0": first["loss"], "init_s": end["init_s"], "first_step_s": first["step_s"],
            "dispatches_per_step": results[-1]["dispatches"]}


def spec_of(args) -> dict:
    """What a side needs to build its step (JSON: it goes to worker processes as is)."""
    lora = dict(targets=args.targets, rank=args.rank, alpha=args.alpha, qlora=args.qlora) if args.lora else None
    return {"config": preset(args.preset, max_seq_len=max(args.seq, 1)).to_dict(), "batch": args.batch,
            "seq": args.seq, "seed": args.seed, "trace": os.path.abspath(args.trace) if args.trace else "",
            "backend": args.backend, "lora": lora, "workers": args.workers}


def report(args, spec: dict, info: dict, results: list, first: dict, end: dict) -> dict:
    """The JSON report of fusegrad's side."""
    tokens = args.batch * args.seq
    peak = sgemm_peak(args.gemm_size)
    out = {"preset": args.preset, "config": spec["config"], "batch": args.batch, "seq": args.seq,
           "steps": args.steps, "tokens_per_step": tokens, "model_flops_per_step": info["flops_per_step"],
           "sgemm_peak_flops_per_s": peak, "sgemm_size": args.gemm_size,
           "jit": os.environ.get("FUSEGRAD_JIT", "1") != "0", "backend": args.backend,
           "ranks": end["ranks"], "workers": info.get("workers", 1), **blas_info()}
    if args.lora:
        out["lora"] = dict(spec["lora"], **{k: v for k, v in info.items() if k not in ("workers", "flops_per_step")})
    out.update(summarize(results, info["flops_per_step"], tokens, peak, first, end))
    if args.trace:
        out["trace"] = spec["trace"]
    return out


def measure(args) -> dict:
    """fusegrad's step in this process: --warmup untimed steps, then --steps timed ones."""
    spec = spec_of(args)
    timer = Timer(FusegradSide, spec)
    first = [timer.step() for _ in range(args.warmup)][0]
    if args.trace:
        timer.start_trace()
    results = [timer.step() for _ in range(args.steps)]
    end = timer.finish()
    timer.side.run.close()
    return report(args, spec, timer.info, results, first, end)


CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a repository's root


def run_bench(args) -> int:
    check_args(args)
    if args.vs or args.ranks:
        return compare_in_checkout(args)
    out = measure(args)
    print(json.dumps(out) if args.json else format_report(out))
    return 0


def compare_in_checkout(args) -> int:
    """--vs, --ranks: `python -m benchmarks.compare` of the checkout this fusegrad runs from, same options."""
    if not os.path.isfile(os.path.join(CHECKOUT, "benchmarks", "compare.py")):
        raise ConfigError("bench: --vs and --ranks run the comparison harness of a fusegrad checkout "
                          "(benchmarks/compare.py), which this installation does not have")
    argv = []
    for key, value in vars(args).items():
        if key not in ("func", "command") and value is not None and value is not False:
            argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [CHECKOUT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "benchmarks.compare", *argv], env=env, stdout=subprocess.PIPE,
                          text=True)
    print(done.stdout, end="")
    if done.returncode:
        raise BackendError(f"bench: the comparison harness failed (exit code {done.returncode}); see above")
    return 0


def format_report(out: dict, vs: str | None = None) -> str:
    """The report as text; `vs` names a peer whose row out[vs] holds (benchmarks/compare.py)."""
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
