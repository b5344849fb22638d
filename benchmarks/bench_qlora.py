"""QLoRA step vs LoRA step on one model, in one process, steps alternating (A B C ... then B C ... A), so load
from other processes weighs on every side alike. Each side is the step `fusegrad bench --lora [--qlora]`
times (BenchRun: loss, backward, clip, AdamW on the adapters) on the same seeded batches. Per side: median,
min and max wall seconds per step, median CPU seconds per step (all threads: steadier on a loaded machine),
median seconds in the dequantize spans (nf4_dequantize, ggml_dequantize), and the median over rounds of its
step time over LoRA's. The process's peak RSS is printed at the end: run one side alone to read its own.

Sides (--sides, comma-separated):
    lora        the fp32 base, frozen
    qlora       NF4 base as fusegrad runs it: the numba kernel dequantizes into the one reused buffer, right
                before each GEMM (forward and dx)
    qlora-host  NF4 base dequantized as before the kernel: numpy on the host, a new array per GEMM
    qlora-keep  the kernel into a new array in the forward, that array kept for the dx GEMM (one dequantize
                per weight per step; every projection's fp32 weight alive between forward and backward)
    qlora-gguf  a quantized GGUF file's own blocks as the base (from_pretrained(quantize="auto")), dequantized
                by the ggml kernel into the reused buffer; needs --model FILE.gguf

--dequantize times one pass over every quantized weight (kernel on all cores, on one, the host reference);
--base auto takes a GGUF file's own blocks (the ggml kernel), nf4 (default) NF4. --load times loading the model
with each base (quantize="auto", "nf4", None), in turn.
--gemm also times one weight's two GEMMs (y = x W^T, dx = g W) with W dequantized whole into the buffer
against W dequantized a panel of rows at a time into a small buffer, each panel's GEMM right after it
(blockwise inside the GEMM).

    python -m benchmarks.bench_qlora --model /root/.cache/fusegrad-tests/smollm2-135m-instruct --batch 4 --seq 256
    python -m benchmarks.bench_qlora --preset stories15M --batch 8 --seq 256 --sides lora,qlora,qlora-host
    python -m benchmarks.bench_qlora --gemm --model <dir>
    python -m benchmarks.bench_qlora --dequantize --model <dir>
    python -m benchmarks.bench_qlora --model SmolLM2-135M-Instruct.Q4_1.gguf --sides lora,qlora,qlora-gguf
    python -m benchmarks.bench_qlora --dequantize --base auto --model SmolLM2-135M-Instruct.Q4_1.gguf
    python -m benchmarks.bench_qlora --load --reps 3 --model SmolLM2-135M-Instruct.Q4_1.gguf
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np

from fusegrad.backends import cpu_jit_nf4
from fusegrad.backends.base import Backend
from fusegrad.backends.cpu_jit import JitBackend
from fusegrad.backends.openblas import CBLAS_SGEMM, NO_TRANS, ROW_MAJOR, TRANS, blas_info
from fusegrad.cli.bench import BenchRun, batch_tokens, cpu_info
from fusegrad.finetune.qlora import quantize_projections
from fusegrad.core.registry import use_backend
from fusegrad.core.trace import trace
from fusegrad.models import Llama
from fusegrad.quant.nf4 import NF4_CODE


class HostDequant(JitBackend):
    """The NF4 path before the kernel: the reference (numpy on the host), a new array per call."""

    def dequantize_nf4(self, q, code, out=None):
        return Backend.dequantize_nf4(self, q, code)


class KeepForBackward(JitBackend):
    """The forward's dequantized weight handed to the dx GEMM: the first call for a weight makes a new array
    and keeps it, the second hands it back and forgets it."""

    def __init__(self):
        super().__init__()
        self.kept = {}

    def dequantize_nf4(self, q, code, out=None):
        w = self.kept.pop(id(q), None)
        if w is None:
            w = self.kept[id(q)] = super().dequantize_nf4(q, code)
        return w


BACKENDS = {"lora": JitBackend, "qlora": JitBackend, "qlora-host": HostDequant, "qlora-keep": KeepForBackward,
            "qlora-gguf": JitBackend}
SPANS = ("nf4_dequantize", "ggml_dequantize")



def alternate(cases: dict, reps: int, before=None) -> dict:
    """{name: fn} -> {name: [seconds per call]}, the cases run in turn, reps rounds; `before()`, if given, runs
    untimed ahead of each call."""
    times = {c: [] for c in cases}
    for _ in range(reps):
        for c, fn in cases.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[c].append(time.perf_counter() - t0)
    return times

def make_side(name: str, args):
    be = BACKENDS[name]()
    quantize = None if name == "lora" or not args.model else "auto" if name == "qlora-gguf" else "nf4"
    with use_backend(be):
        model = (Llama.from_pretrained(args.model, backend=be, quantize=quantize) if args.model
                 else Llama.from_preset(args.preset, seed=0, backend=be))
        lora = dict(targets=args.targets, rank=args.rank, alpha=args.alpha, qlora=name != "lora")
        run = BenchRun(model, args.batch, "numpy", lora, seed=0)
    return be, run, model.config.vocab_size


def bench_steps(args) -> dict:
    sides = args.sides.split(",")
    made = {s: make_side(s, args) for s in sides}
    times, cpu, dequant = ({s: [] for s in sides} for _ in range(3))
    for i in range(args.warmup + args.steps):
        order = sides[i % len(sides):] + sides[:i % len(sides)]
        for s in order:
            be, run, vocab = made[s]
            run.tokens = batch_tokens(0, i, args.batch, args.seq, vocab)
            with use_backend(be), trace() as t:
                t0, c0 = time.perf_counter(), time.process_time()
                run.train_step()
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= args.warmup:
                times[s].append(dt)
                cpu[s].append(dc)
                dequant[s].append(sum(t.totals().get(span, {}).get("total_s", 0.0) for span in SPANS))
    out = {s: {"step_s": statistics.median(times[s]), "min_s": min(times[s]), "max_s": max(times[s]),
               "cpu_s": statistics.median(cpu[s]), "dequantize_s": statistics.median(dequant[s])} for s in sides}
    if "lora" in sides:  # per round: a side's step over the LoRA step of the same round, then the median
        for s in sides:
            out[s]["vs_lora"] = statistics.median(a / b for a, b in zip(times[s], times["lora"]))
    return out


def gemm_into(a, b, c, trans_b: bool, beta: float) -> None:
    """c = a op(b) + beta c, c a row-major (m, n) view with its own row stride (cblas_sgemm)."""
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    CBLAS_SGEMM(ROW_MAJOR, NO_TRANS, TRANS if trans_b else NO_TRANS, m, n, k, 1.0, a.ctypes.data, a.strides[0] // 4,
                b.ctypes.data, b.strides[0] // 4, beta, c.ctypes.data, c.strides[0] // 4)


def fused_rows(q) -> list:
    """[(part, first fused row, source row of each of its fused rows)] of a FusedNF4."""
    out, lo = [], 0
    for part, unpermute in q.parts:
        n = part.shape[0]
        out.append((part, lo, np.arange(n) if unpermute is None else cpu_jit_nf4.row_map(unpermute, n)))
        lo += n
    return out


def dequantize_panel(sources, lo: int, hi: int, buf):
    """Fused rows lo..hi into buf[:hi - lo] with the kernel, part by part; returns that view."""
    for part, first, src in sources:
        a, b = max(lo, first), min(hi, first + src.size)
        if a < b:
            cpu_jit_nf4.dequantize_part(part, NF4_CODE, src[a - first:b - first], buf[a - lo:b - lo])
    return buf[:hi - lo]


def bench_gemm(args) -> dict:
    """Per weight shape: the forward and dx GEMMs of N = batch * seq rows with W dequantized whole, then by
    panels of `panel` rows (y[:, rows] = x W_rows^T, dx += g[:, rows] W_rows), medians over alternating reps."""
    be = JitBackend()
    model = Llama.from_pretrained(args.model, backend=be, quantize="nf4")
    rng = np.random.default_rng(0)
    N = args.batch * args.seq
    out = {}
    for kind in ("wqkv", "wo", "w13", "w2"):
        q = model.quantized[f"layers.0.{kind}"]
        rows, cols = q.shape
        x, g = rng.standard_normal((N, cols), np.float32), rng.standard_normal((N, rows), np.float32)
        whole = np.empty(q.shape, np.float32)
        y, dx = np.empty((N, rows), np.float32), np.empty((N, cols), np.float32)
        panels = {p: np.empty((p, cols), np.float32) for p in args.panels}

        def run_whole():
            be.dequantize_nf4(q, NF4_CODE, whole)
            np.matmul(x, whole.T, out=y)
            be.dequantize_nf4(q, NF4_CODE, whole)
            np.matmul(g, whole, out=dx)

        sources = fused_rows(q)

        def run_panels(p):
            buf = panels[p]
            for lo in range(0, rows, p):
                w = dequantize_panel(sources, lo, min(lo + p, rows), buf)
                gemm_into(x, w, y[:, lo:lo + w.shape[0]], True, 0.0)
            for lo in range(0, rows, p):
                w = dequantize_panel(sources, lo, min(lo + p, rows), buf)
                gemm_into(g[:, lo:lo + w.shape[0]], w, dx, False, 0.0 if lo == 0 else 1.0)

        cases = {"whole": run_whole, **{f"panel{p}": (lambda p=p: run_panels(p)) for p in args.panels}}
        times = alternate(cases, args.reps)
        out[f"{kind} {rows}x{cols}"] = {c: statistics.median(ts) * 1e3 for c, ts in times.items()}
    return out


def bench_dequantize(args) -> dict:
    """One pass over every quantized projection of the model (what each of a step's two passes costs): the
    kernel into one reused buffer, on every core and on one, against the host reference's new array per weight;
    median and min (the figure least touched by load) over alternating reps, in ms."""
    import numba

    be = JitBackend()
    model = (Llama.from_pretrained(args.model, backend=be, quantize=args.base) if args.model
             else Llama.from_preset(args.preset, seed=0, backend=be))
    if not model.quantized:
        quantize_projections(model)
    qs = list(model.quantized.values())
    buffer = np.empty(max(q.size for q in qs), np.float32)
    threads = numba.get_num_threads()

    def kernel(n):
        numba.set_num_threads(n)
        for q in qs:
            q.dequantize_on(be, buffer[:q.size].reshape(q.shape))
        numba.set_num_threads(threads)

    cases = {f"kernel x{threads}": lambda: kernel(threads), "kernel x1": lambda: kernel(1),
             "host": lambda: [q.dequantize() for q in qs]}
    times = alternate(cases, args.reps)
    elements = sum(q.size for q in qs)
    return {c: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3,
                "ns_per_weight": min(ts) / elements * 1e9} for c, ts in times.items()}


def bench_load(args) -> dict:
    """Seconds to load --model with each base (its file's blocks, NF4, float32), in turn, medians and mins."""
    cases = {str(q): (lambda q=q: Llama.from_pretrained(args.model, quantize=q)) for q in ("auto", "nf4", None)}
    times = alternate(cases, args.reps)
    return {c: {"median_s": statistics.median(ts), "min_s": min(ts)} for c, ts in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint (HF dir, llama2.c .bin, .gguf)")
    p.add_argument("--preset", default="stories15M", help="without --model: a fresh preset model")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--targets", default="q,k,v,o")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--sides", default="lora,qlora,qlora-host,qlora-keep")
    p.add_argument("--gemm", action="store_true", help="time whole vs panel dequantization around the GEMMs")
    p.add_argument("--dequantize", action="store_true", help="time one dequantization pass over the model")
    p.add_argument("--load", action="store_true", help="time loading --model with each base")
    p.add_argument("--base", default="nf4", choices=("nf4", "auto"), help="--dequantize: NF4, or a GGUF's own blocks")
    p.add_argument("--panels", type=lambda s: [int(v) for v in s.split(",")], default=[64, 256])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    head = {"cpu": cpu_info().get("model"), "blas": blas_info(), "load_before": os.getloadavg()[0]}
    result = (bench_gemm(args) if args.gemm else bench_dequantize(args) if args.dequantize else
              bench_load(args) if args.load else bench_steps(args))
    head["load_after"] = os.getloadavg()[0]
    head["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({**head, "result": result}))
        return
    print(f"{args.model or args.preset} batch {args.batch} seq {args.seq}; {head['cpu']}; "
          f"OpenBLAS {head['blas']['blas_core']}; "
          f"load {head['load_before']:.2f} -> {head['load_after']:.2f}; peak RSS {head['peak_rss_mb']:.0f} MB")
    for name, row in result.items():
        print(f"  {name:12s} " + "  ".join(f"{k} {v:.4g}" for k, v in row.items()))


if __name__ == "__main__":
    main()
