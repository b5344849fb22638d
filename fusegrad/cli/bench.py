"""`fusegrad bench`: the product's own training step, timed: tokens/s, model FLOP/s against a measured sgemm
peak (MFU), peak RSS, GEMM dispatches per step.

    fusegrad bench --preset stories15M --batch 8 --seq 256 --steps 5 --json
    fusegrad bench --preset stories15M --lora --targets q,k,v,o --rank 8 [--qlora]
    fusegrad bench --preset stories260K --backend torch:cpu       # fusegrad on its torch backend
    fusegrad bench --preset stories110M --backend torch --device cuda --dtype bf16 --vs torch
    fusegrad bench --preset tiny --batch 2 --seq 16 --steps 2 --trace out.json
    fusegrad bench --model out/model.bin --batch 4 --seq 128    # any checkpoint: HF dir, llama2.c .bin, run dir

The step is the one `fusegrad train` runs (train/loop.py: loss, backward, global-norm clip 1.0, AdamW with
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on matrices, at a constant lr 3e-4 here); with --lora, the step
`fusegrad finetune` runs (adapters only, base frozen, quantized with --qlora; clip 1.0, lr 1e-3, no weight decay).
Either is split over one worker process per core, as `fusegrad train` and `fusegrad finetune` do by default.
Each step gets the next batch of one seeded stream; the first --warmup steps are not timed.

The sgemm peak is measured between timed steps (of either side), and a step's MFU is its model FLOP/s over the
mean of the peaks measured just before and just after it, so load from other processes weighs on both alike.
The report gives medians and their spread (min, max) of tokens/s, step time, peak and MFU, the CPU model and
vector ISA, the BLAS kernels that ran, the load average, and with worker processes each one's busy seconds a
step and the median of the slowest's over the fastest's (`worker_imbalance`: the step waits for the slowest);
a run whose MFU exceeds 1 at any step, or whose peak, step times or workers vary too much, is flagged `noisy`
with the reasons (and a warning on stderr).

Side by side with a peer (`--vs torch` for the full step, `--vs peft` for --lora) or as MPI ranks (`--ranks
N`, one thread each), each side runs in its own process, driven by the comparison harness of a fusegrad
checkout (benchmarks/compare.py; `python -m benchmarks.compare` takes the same options):

    fusegrad bench --preset stories15M --batch 8 --seq 256 --steps 5 --json --vs torch
    fusegrad bench --preset stories15M --lora --targets q,k,v,o --rank 8 --vs peft [--qlora]
    fusegrad bench --preset stories260K --ranks 2

Model FLOPs per step come from the model (`Llama.flops_per_token`, nanoGPT / PaLM accounting).

`--device` and `--dtype` are `fusegrad train`'s run settings (RunConfig): with `--backend torch`, the step runs
on that device in that precision (bf16/fp16 GEMMs and activations, fp32 master weights; fp16 with loss
scaling), and `--vs torch` runs the PyTorch eager peer on the same device under torch.autocast in the same
dtype (fp16 with a GradScaler). On a GPU the peak beside each step is a torch matmul there in that dtype (of
side max(--gemm-size, 8192): a smaller one does not reach it), and the step time includes the loss read that
ends the step (a host sync).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from fusegrad.backends import get_backend
from fusegrad.backends.openblas import blas_info, stop_idle_threads
from fusegrad.core.errors import BackendError, ConfigError
from fusegrad.core.settings import field_spec
from fusegrad.core.trace import TRACER, mark_step, trace
from fusegrad.finetune.lora import HF_MODULES, LoraConfig, attach_lora
from fusegrad.finetune.qlora import attach_qlora, describe_base
from fusegrad.finetune.trainer import slice_losses, worker_adapters
from fusegrad.models.gguf_reader import is_gguf
from fusegrad.models.llama import PRESETS, Llama, LlamaConfig, preset
from fusegrad.parallel.mpi import DataParallel
from fusegrad.parallel.workers import peak_rss_mb, run_slice
from fusegrad.train.loop import FP16_LOSS_SCALE, Run, RunConfig, run_context, start_workers
from fusegrad.train.optim import AdamW
from fusegrad.train.trainer import load_model

FULL_STEP = dict(lr=3e-4, weight_decay=0.1)  # the settings a peer's full step mirrors (clip 1.0, betas, eps)
LORA_STEP = dict(lr=1e-3, weight_decay=0.0)


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="time the training step (tokens/s, FLOP/s, MFU, RSS), optionally vs a peer",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="stories15M", help="model preset (tiny, stories260K, stories15M, ...)")
    p.add_argument("--model", default="", help="benchmark this checkpoint instead of a preset (HF dir, llama2.c "
                                               ".bin, run dir or checkpoint)")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over --ranks)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after --warmup steps)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--vs", choices=["torch", "peft"], default=None,
                   help="also time the PyTorch eager step (torch) or, with --lora, transformers + peft (peft)")
    p.add_argument("--ranks", type=int, default=0, help="run fusegrad under mpirun -n RANKS (1 thread each)")
    p.add_argument("--backend", default="numpy", help="fusegrad's backend: numpy, torch:cpu, torch:cuda, ...")
    p.add_argument("--device", default="", help=field_spec(RunConfig, "device")[0])
    p.add_argument("--dtype", default="fp32", choices=field_spec(RunConfig, "dtype")[1].split("|"),
                   help=field_spec(RunConfig, "dtype")[0])
    p.add_argument("--workers", type=int, default=0,
                   help="processes splitting each batch, one core each (0 = one per core, as `fusegrad train`)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--trace", default="", help="write a Chrome trace of fusegrad's timed steps here")
    p.add_argument("--lora", action="store_true", help="benchmark a LoRA fine-tuning step (base frozen)")
    p.add_argument("--targets", default="q,v", help="LoRA target modules (q,k,v,o,gate,up,down or all)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--qlora", action="store_true", help="with --lora: the base projections quantized (--quantize)")
    p.add_argument("--quantize", choices=("auto", "nf4"), default="auto",
                   help="with --qlora, as `fusegrad finetune`: auto keeps a GGUF file's own quantized blocks and "
                        "quantizes the rest to NF4; nf4 quantizes every projection to NF4")
    p.add_argument("--dora", action="store_true", help="with --lora: DoRA (a magnitude per output row; the peer "
                                                       "peft's use_dora)")
    p.add_argument("--gemm-size", type=int, default=2048, help="side of the square sgemm measuring the peak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint_activations", "--checkpoint-activations", action="store_true",
                   help="fusegrad recomputes each block's forward in the backward (the peer does not)")
    p.set_defaults(func=run_bench)
    return p


def check_args(args) -> None:
    if not args.model and args.preset not in PRESETS:
        raise ConfigError(f"bench: unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.steps < 1 or args.warmup < 1 or args.batch < 1 or args.seq < 1:
        raise ConfigError(f"bench: --steps, --warmup, --batch and --seq must be >= 1, got {args.steps}, "
                          f"{args.warmup}, {args.batch}, {args.seq}")
    if args.vs == "peft" and not args.lora or args.vs == "torch" and args.lora:
        raise ConfigError(f"bench: --vs {args.vs} {'needs' if args.vs == 'peft' else 'cannot time'} --lora "
                          f"(the peer of --lora is --vs peft, of the full step --vs torch)")
    if (args.qlora or args.dora) and not args.lora:
        raise ConfigError(f"bench: --{'qlora' if args.qlora else 'dora'} needs --lora")
    if args.quantize != "auto" and not args.qlora:
        raise ConfigError(f"bench: --quantize {args.quantize} chooses --qlora's base format; add --qlora")
    if args.ranks < 0 or args.ranks and args.batch % args.ranks:
        raise ConfigError(f"bench: --batch {args.batch} must split evenly over --ranks {args.ranks}")
    if args.ranks and args.lora:
        raise ConfigError("bench: --ranks times the full training step; it does not combine with --lora")
    if args.device and (args.backend.split(":")[0] != "torch" or ":" in args.backend):
        raise ConfigError(f"bench: --device {args.device} needs --backend torch (got --backend {args.backend})")
    if args.dtype != "fp32" and not args.backend.startswith("torch"):
        raise ConfigError(f"bench: --dtype {args.dtype} needs --backend torch (backend {args.backend} computes in fp32)")
    rows = args.batch // max(args.ranks, 1)
    if args.workers < 0 or args.workers > rows:
        raise ConfigError(f"bench: --workers {args.workers} must be 0 (auto) or 1..{rows} (rows per rank)")


# -- the step --------------------------------------------------------------------------------------------
def batch_tokens(seed: int, step: int, batch: int, seq: int, vocab: int) -> np.ndarray:
    """The global batch (B, T+1) of a step: the same on every side and every rank."""
    return np.random.default_rng((seed, step)).integers(0, vocab, (batch, seq + 1))


class BenchRun(Run):
    """The step `fusegrad train` runs (or with `lora`, the one `fusegrad finetune` runs) on the batch in
    `self.tokens` (B, T+1), at a constant lr."""

    def __init__(self, model, batch: int, backend: str = "numpy", lora: dict | None = None, workers: int = 0,
                 seed: int = 0, dtype: str = "fp32"):
        settings = LORA_STEP if lora else FULL_STEP
        super().__init__(RunConfig(batch_size=batch, max_steps=1, warmup_steps=0, min_lr=settings["lr"], seed=seed,
                                   dtype=dtype, **settings))
        self.model, self.backend, self.tokens, self.lora = model, backend, None, None
        self.loss_scale = [FP16_LOSS_SCALE, 0] if dtype == "fp16" else None  # as `fusegrad train` scales fp16
        self.dp = DataParallel.from_env()  # None unless mpirun started several ranks
        self.info = {}
        named, extras, setup = model.named_parameters(), (), None
        if lora:  # adapters as fine-tuning attaches them (no dropout)
            cfg = LoraConfig(targets=lora["targets"], r=lora["rank"], alpha=lora["alpha"],
                             dora=lora.get("dora", False), seed=seed)
            self.lora, memory = attach_qlora(model, cfg) if lora["qlora"] else (attach_lora(model, cfg), None)
            named = extras = self.lora.named_parameters()
            setup = (worker_adapters, {"lora": dataclasses.asdict(cfg), "num_classes": 0})
            self.info = {"trainable_params": sum(t.numel() for _, t in named), "memory": memory,
                         "peft_target_modules": [HF_MODULES[t].split(".")[1] for t in cfg.targets]}
        self.optimizer = AdamW(named, **settings)
        rows = batch // (self.dp.size if self.dp is not None else 1)
        self.workers = start_workers(model, workers, rows, backend == "numpy" and self.dp is None, extras, setup)
        self.info["workers"] = self.workers.workers if self.workers is not None else 1

    def micro_batch(self, grad_scale: float) -> tuple[float, int]:
        if self.lora is None:
            return self.model_loss_backward(self.tokens, grad_scale)
        tokens = self.tokens  # fine-tuning's loss of one length group; every target counts (no prompt)
        rows, n = tokens.shape[0], tokens.shape[0] * (tokens.shape[1] - 1)
        mask = np.ones((rows, tokens.shape[1] - 1), bool)
        if self.workers is None:
            return run_slice(slice_losses, self.model, {}, ([(tokens, mask, None)], n), grad_scale), n
        bounds = [rows * k // self.workers.workers for k in range(self.workers.workers + 1)]
        slices = [([(tokens[lo:hi], mask[lo:hi], None)], n) for lo, hi in zip(bounds, bounds[1:])]
        return self.workers.backward_slices(slice_losses, slices, grad_scale), n


def base_model(spec: dict) -> Llama:
    """The weights every side starts from: the checkpoint spec["model"], or a fresh model seeded spec["seed"]."""
    path, lora = spec.get("model"), spec.get("lora") or {}
    if path and lora.get("qlora") and is_gguf(path):  # the file's own blocks kept, as finetune does
        model = Llama.from_pretrained(path, quantize=lora["quantize"])
    else:
        model = load_model(path)[0] if path else Llama(LlamaConfig.from_dict(spec["config"]), seed=spec["seed"])
    model.config.checkpoint_activations = spec["config"].get("checkpoint_activations", False)  # also a --model's
    return model


class FusegradSide:
    """fusegrad's side of a benchmark: a BenchRun on the model of `spec` (config, seed, batch, seq, backend,
    dtype, lora, workers), on `spec["backend"]` in `spec["dtype"]` for the steps only."""
    name = "fusegrad"

    def __init__(self, spec: dict):
        get_backend("numpy").prewarm_kernels()  # JIT kernels load from the disk cache before the first step
        self.backend, self.dtype = spec["backend"], spec.get("dtype", "fp32")
        with run_context(self.backend):
            model = base_model(spec)
        self.run = BenchRun(model, spec["batch"], self.backend, spec.get("lora"), spec.get("workers", 0), spec["seed"],
                            self.dtype)
        self.dp, self.info = self.run.dp, self.run.info
        self.info["flops_per_step"] = model.flops_per_token(spec["seq"]) * spec["batch"] * spec["seq"]
        device = getattr(model.backend, "device", None)
        if getattr(device, "type", "cpu") != "cpu":  # a GPU: the peak beside each step is measured there
            self.info["peak_on"] = [str(device), self.dtype]

    def step(self, tokens) -> float:
        self.run.tokens = tokens
        with run_context(self.backend, dtype=self.dtype):
            return self.run.train_step()

    def helpers_peak_rss_mb(self) -> float:
        return self.run.workers.helpers_peak_rss_mb() if self.run.workers is not None else 0.0

    def worker_busy_s(self) -> list | None:
        """Each worker process's seconds on its slices since the last call; None in one process."""
        return self.run.workers.take_busy_s() if self.run.workers is not None else None


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
        busy = getattr(self.side, "worker_busy_s", lambda: None)
        busy()  # what earlier steps left
        before = dispatch_counts()
        t0 = time.perf_counter()
        loss = self.side.step(tokens)
        dt = time.perf_counter() - t0
        self.steps += 1
        mark_step(self.steps)
        after = dispatch_counts()
        out = {"step_s": dt, "loss": loss, "dispatches": {k: n - before.get(k, 0) for k, n in after.items()
                                                          if n != before.get(k, 0)}}
        workers = busy()
        if workers:
            out["worker_busy_s"] = workers
        return out

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
ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8",
       "neon", "asimd", "sve", "sme", "bf16")  # the vector extensions that decide a GEMM's speed
PEAK_SPREAD, STEP_SPREAD = 1.25, 1.5  # max / min of a run's sgemm peaks or of a side's step times: too noisy
WORKER_SPREAD = 1.25  # the slowest worker process's busy time over the fastest's, median over steps: too uneven


def cpu_info() -> dict:
    """The CPU's model name and which of ISA it has: /proc/cpuinfo on Linux, sysctl on macOS."""
    model, flags = platform.processor() or platform.machine(), set()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)  # the last core's: all alike
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("model name") or fields.get("Model") or fields.get("Hardware") or model
        flags = set((fields.get("flags") or fields.get("Features") or "").split())
    elif sys.platform == "darwin":
        sysctl = lambda *a: subprocess.run(["sysctl", *a], capture_output=True, text=True).stdout  # noqa: E731
        model = sysctl("-n", "machdep.cpu.brand_string").strip() or model
        for line in sysctl("hw.optional").splitlines():  # hw.optional.avx2_0: 1, hw.optional.arm.FEAT_SME: 1
            name, _, value = line.partition(":")
            if value.strip() == "1":
                flags.add(name.rsplit(".", 1)[-1].lower().removeprefix("feat_").removesuffix("_0"))
    return {"model": model, "isa": [f for f in ISA if f in flags]}


def sgemm_peak(n: int, repeats: int = 3) -> float:
    """Best FLOP/s of an (n, n) x (n, n) float32 numpy matmul over a few runs. OpenBLAS's threads are
    stopped after: left spinning, they would take a core from the step timed next (7-10 % of a stories15M
    step, docs/performance.md)."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, a, out=out)
        best = min(best, time.perf_counter() - t0)
    stop_idle_threads()
    return 2.0 * n ** 3 / best


def device_peak(n: int, device: str, dtype: str, repeats: int = 3) -> float:
    """Best FLOP/s of an (n, n) x (n, n) torch matmul on `device` in `dtype` (fp32 | bf16 | fp16)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    a = torch.randn((n, n), device=device).to(dt)
    out = torch.matmul(a, a)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device) if a.is_cuda else torch.mps.synchronize() if a.device.type == "mps" else None
        t0 = time.perf_counter()
        torch.matmul(a, a, out=out)
        torch.cuda.synchronize(device) if a.is_cuda else torch.mps.synchronize() if a.device.type == "mps" else None
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def measure_peak(timer, gemm_size: int) -> float:
    """The sgemm peak now (on a GPU, `timer.info["peak_on"]` = [device, dtype]: a matmul there)."""
    on = timer.info.get("peak_on")
    return device_peak(max(gemm_size, 8192), *on) if on else sgemm_peak(gemm_size)


def timed_steps(timers: list, gemm_size: int) -> list:
    """One step of each timer in turn (a Timer, or a side's process), with the peak measured between steps: a
    step's peak is the mean of the one just before it and the one just after it (`sgemm_peak_bracket`), so a
    machine whose speed drifts over a step weighs on its peak as on the step."""
    before, results = measure_peak(timers[0], gemm_size), []
    for timer in timers:
        result = timer.step()
        after = measure_peak(timer, gemm_size)
        results.append(dict(result, sgemm_peak_flops_per_s=(before + after) / 2, sgemm_peak_bracket=[before, after]))
        before = after
    return results


def summarize(results: list, flops: float, tokens: int, first: dict, end: dict) -> dict:
    """A side's medians and their spread (min, max) over its timed steps; each step's MFU is its model FLOP/s
    over the sgemm peak measured around it (the spread: of every peak measured)."""
    times = [r["step_s"] for r in results]
    peaks = [r["sgemm_peak_flops_per_s"] for r in results]
    measured = [p for r in results for p in r["sgemm_peak_bracket"]]
    mfus = [flops / t / p for t, p in zip(times, peaks)]
    median = statistics.median(times)
    return {"tokens_per_s": tokens / median,
            "step_s": {"median": median, "min": min(times), "max": max(times)},
            "model_flops_per_s": flops / median, "sgemm_peak_flops_per_s": statistics.median(peaks),
            "mfu": statistics.median(mfus),
            "per_step": [{"step_s": t, "sgemm_peak_flops_per_s": p, "sgemm_peak_bracket": r["sgemm_peak_bracket"],
                          "mfu": m} for t, p, r, m in zip(times, peaks, results, mfus)],
            "spread": {"tokens_per_s": [tokens / max(times), tokens / min(times)], "mfu": [min(mfus), max(mfus)],
                       "sgemm_peak_flops_per_s": [min(measured), max(measured)]},
            "peak_rss_mb": end["peak_rss_mb"], "loss_step0": first["loss"], "init_s": end["init_s"],
            "first_step_s": first["step_s"], "dispatches_per_step": results[-1]["dispatches"],
            **worker_balance(results)}


def worker_balance(results: list) -> dict:
    """With worker processes: each step's busy seconds per worker, and the median over steps of the slowest
    worker's over the fastest's (the step waits for the slowest)."""
    if not all(r.get("worker_busy_s") for r in results):
        return {}
    busy = [r["worker_busy_s"] for r in results]
    return {"worker_busy_s": busy, "worker_imbalance": statistics.median(max(b) / max(min(b), 1e-9) for b in busy)}


def noise(rows: dict) -> list:
    """Why the figures of a run's sides ({name: summary}) cannot be trusted, if they cannot."""
    reasons = []
    peaks = [p for row in rows.values() for p in row["spread"]["sgemm_peak_flops_per_s"]]
    if max(peaks) > PEAK_SPREAD * min(peaks):
        reasons.append(f"the sgemm peak varied {min(peaks) / 1e9:.1f}-{max(peaks) / 1e9:.1f} GFLOP/s over the run")
    for name, row in rows.items():
        worst = max(row["per_step"], key=lambda r: r["mfu"])
        if worst["mfu"] > 1:
            reasons.append(f"{name}'s MFU reached {worst['mfu']:.2f} > 1 at timed step {row['per_step'].index(worst)}: "
                           f"other load slowed the sgemm peak measured beside it")
        if row.get("worker_imbalance", 1.0) > WORKER_SPREAD:
            reasons.append(f"{name}'s worker processes were busy unevenly: the slowest took "
                           f"{row['worker_imbalance']:.2f}x the fastest's time (median over steps): other load, "
                           f"or cores of unequal speed")
        s = row["step_s"]
        if s["max"] > STEP_SPREAD * s["min"]:
            reasons.append(f"{name}'s step times varied {s['min']:.3f}-{s['max']:.3f} s")
    return reasons


def spec_of(args) -> dict:
    """What a side needs to build its step (JSON: it goes to worker processes as is)."""
    lora = dict(targets=args.targets, rank=args.rank, alpha=args.alpha, qlora=args.qlora, quantize=args.quantize,
                dora=args.dora) if args.lora else None
    if args.model:
        config = load_model(args.model)[0].config
        if args.seq > config.max_seq_len:
            raise ConfigError(f"bench: --seq {args.seq} exceeds {args.model}'s max_seq_len {config.max_seq_len}")
    else:
        config = preset(args.preset, max_seq_len=max(args.seq, 1))
    config.checkpoint_activations = args.checkpoint_activations
    backend = f"{args.backend}:{args.device}" if args.device else args.backend  # as RunConfig combines them
    return {"config": config.to_dict(), "model": os.path.abspath(args.model) if args.model else "",
            "batch": args.batch, "seq": args.seq, "seed": args.seed, "backend": backend, "dtype": args.dtype,
            "lora": lora,
            "trace": os.path.abspath(args.trace) if args.trace else "", "workers": args.workers}


def report(args, spec: dict, info: dict, results: list, first: dict, end: dict, load_before: float) -> dict:
    """The JSON report of fusegrad's side; the 1-minute load average before and after the run."""
    tokens = args.batch * args.seq
    out = {"preset": None if args.model else args.preset, "model": spec["model"] or None, "config": spec["config"],
           "batch": args.batch, "seq": args.seq, "steps": args.steps, "tokens_per_step": tokens,
           "model_flops_per_step": info["flops_per_step"], "sgemm_size": args.gemm_size,
           "jit": os.environ.get("FUSEGRAD_JIT", "1") != "0", "backend": spec["backend"], "dtype": args.dtype,
           "ranks": end["ranks"], "workers": info.get("workers", 1), "cpu": cpu_info(), **blas_info(),
           "load_average": [load_before, os.getloadavg()[0]]}
    if args.lora:
        out["lora"] = dict(spec["lora"], **{k: v for k, v in info.items() if k not in ("workers", "flops_per_step")})
    out.update(summarize(results, info["flops_per_step"], tokens, first, end))
    if args.trace:
        out["trace"] = spec["trace"]
    return out


def flag_noise(out: dict, vs: str | None = None) -> dict:
    out["noisy_reasons"] = noise({"fusegrad": out, **({vs: out[vs]} if vs else {})})
    out["noisy"] = bool(out["noisy_reasons"])
    return out


def measure(args) -> dict:
    """fusegrad's step in this process: --warmup untimed steps, then --steps timed ones."""
    load_before, spec = os.getloadavg()[0], spec_of(args)
    timer = Timer(FusegradSide, spec)
    first = [timer.step() for _ in range(args.warmup)][0]
    if args.trace:
        timer.start_trace()
    results = timed_steps([timer] * args.steps, args.gemm_size)
    end = timer.finish()
    timer.side.run.close()
    return flag_noise(report(args, spec, timer.info, results, first, end, load_before))


def emit(out: dict, as_json: bool, vs: str | None = None) -> None:
    """Print the report: as text (a noisy run's reasons in its last line) or JSON (and the reasons on stderr)."""
    print(json.dumps(out) if as_json else format_report(out, vs))
    if out["noisy"] and as_json:
        print("bench: WARNING: too noisy to trust: " + "; ".join(out["noisy_reasons"]), file=sys.stderr)


CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a repository's root


def run_bench(args) -> int:
    check_args(args)
    if args.vs or args.ranks:
        return compare_in_checkout(args)
    emit(measure(args), args.json)
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
    lo, hi = out["spread"]["sgemm_peak_flops_per_s"]
    lines = [f"{out['model'] or out['preset']} batch {out['batch']} x seq {out['seq']}, {out['steps']} timed steps, "
             f"backend {out['backend']} {out['dtype']}, {out['ranks']} rank(s) x {out['workers']} worker process(es)",
             f"{out['cpu']['model']} ({', '.join(out['cpu']['isa']) or 'no AVX2/AVX-512/AMX/NEON'}), load average "
             f"{out['load_average'][0]:.2f} -> {out['load_average'][1]:.2f}; sgemm peak {out['sgemm_peak_flops_per_s'] / 1e9:.1f} "
             f"GFLOP/s ({lo / 1e9:.1f}-{hi / 1e9:.1f}) on OpenBLAS's {out['blas_core']} kernels"
             + (f" (OPENBLAS_CORETYPE={out['openblas_coretype_env']})" if out["openblas_coretype_env"] else "")]
    if "lora" in out:
        lo = out["lora"]
        lines.append(f"{'QLoRA' if lo['qlora'] else 'LoRA'}{' (DoRA)' if lo.get('dora') else ''} r {lo['rank']} "
                     f"alpha {lo['alpha']} on {lo['targets']}: "
                     f"{lo['trainable_params']} trainable params"
                     + (f"; {describe_base(lo['memory'])}" if lo["memory"] else ""))
    for name, row in [("fusegrad", out)] + ([(vs, out[vs])] if vs else []):
        s, (t0, t1), (m0, m1) = row["step_s"], row["spread"]["tokens_per_s"], row["spread"]["mfu"]
        lines.append(f"{name:>9}: {row['tokens_per_s']:8.1f} tok/s ({t0:.1f}-{t1:.1f})  step {s['median']:.3f}s "
                     f"({s['min']:.3f}-{s['max']:.3f})  {row['model_flops_per_s'] / 1e9:6.1f} GFLOP/s  MFU "
                     f"{row['mfu']:.2f} ({m0:.2f}-{m1:.2f})  RSS {row['peak_rss_mb']:.0f} MB  loss0 {row['loss_step0']:.4f}"
                     + (f"  [{row['kernels']}]" if "kernels" in row else ""))
    lines.append(f"dispatches per step: {out['dispatches_per_step']}")
    if "worker_imbalance" in out:
        lines.append(f"worker processes: the slowest slice took {out['worker_imbalance']:.2f}x the fastest's "
                     f"(median over steps)")
    if vs:
        lines.append(f"speedup vs {vs} (median of per-step ratios): {out[f'speedup_vs_{vs}']:.2f}x, "
                     f"RSS ratio {out[f'rss_ratio_vs_{vs}']:.2f}, step-0 losses agree: {out['losses_agree']}")
    if out["noisy"]:
        lines.append("NOISY, do not quote these figures: " + "; ".join(out["noisy_reasons"]))
    return "\n".join(lines)
