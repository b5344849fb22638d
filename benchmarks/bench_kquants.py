"""K-quant speed: fusegrad's numba quantizers (fusegrad/quant/kquants.py) against llama.cpp's own C reference
quantizers on the same weights, byte-identical output checked. Default model: the real SmolLM2-135M-Instruct.

    PYTHONPATH=. python benchmarks/bench_kquants.py [--model HF_DIR] [--repeat 3] [--kinds Q4_K,Q6_K] [--mix q4_k_m]

Blocks: all the model's 2-D weights (134M values, cut to a multiple of 256) as each of --kinds, fusegrad's
`quantize_k` on one thread and on every core against ggml's quantize_row_*_ref (libggml-base through ctypes, one
thread). File: fusegrad's `export_model(..., dtype=MIX)` from the loaded model against llama_model_quantize
(libllama, as many threads as cores) on fusegrad's F32 export of it. Each pair alternates (ours, theirs, ours, ...);
prints medians, ranges and ratios, the CPU and the load average before and after. The libraries are node-llama-cpp
3.22.1's prebuilt CPU build (tests/llamacpp.py installs it). The kernels are compiled (or loaded from numba's cache)
by the byte check before any timing.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_generate import cpu_name, load  # noqa: E402
from fusegrad.models import Llama  # noqa: E402
from fusegrad.models.export import export_model  # noqa: E402
from fusegrad.quant.kquants import quantize_k  # noqa: E402
from tests.llamacpp_lib import ggml_quantize, llama_quantize  # noqa: E402


def alternate(sides: dict, repeat: int) -> dict:
    """{name: fn} -> {name: [seconds per run]}, running them in turn `repeat` times."""
    times = {name: [] for name in sides}
    for _ in range(repeat):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def report(what: str, times: dict) -> None:
    (ours, a), (theirs, b) = times.items()
    for name, ts in times.items():
        print(f"  {what:6s} {name:28s} median {statistics.median(ts):6.2f} s  ({min(ts):.2f}-{max(ts):.2f})")
    print(f"  {what:6s} {ours} / {theirs}: {statistics.median(a) / statistics.median(b):.2f}x the time")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face directory (default: the tests' SmolLM2-135M-Instruct)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each, alternating")
    ap.add_argument("--kinds", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K", help="block types, comma-separated")
    ap.add_argument("--mix", default="q4_k_m", help="the file type of the whole-file comparison")
    args = ap.parse_args()
    if args.model is None:
        from tests.real_checkpoint import smollm2_dir
        args.model = smollm2_dir()
    model = Llama.from_pretrained(args.model)
    values = np.concatenate([t.numpy().reshape(-1) for t in model.params.values() if t.data.ndim == 2])
    values = values[:values.size // 256 * 256]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; load average {load()} before")
    print(f"model {args.model}: {values.size / 1e6:.1f}M weight values")
    for kind in args.kinds.split(","):
        ggml_kind = kind.lower().replace("_k", "_K")
        assert np.array_equal(quantize_k(values, kind), ggml_quantize(values, ggml_kind)), kind
        times = alternate({"fusegrad quantize_k, 1 thread": lambda: quantize_k(values, kind, threads=1),
                           "ggml quantize_row_ref": lambda: ggml_quantize(values, ggml_kind),
                           "fusegrad quantize_k, all cores": lambda: quantize_k(values, kind)}, args.repeat)
        report(kind, dict(list(times.items())[:2]))
        report(kind, dict(list(times.items())[2:0:-1]))
    with tempfile.TemporaryDirectory() as tmp:
        f32, ours, theirs = (os.path.join(tmp, f"{name}.gguf") for name in ("f32", "ours", "theirs"))
        export_model(model, f32, "gguf", dtype="f32")
        report(args.mix.upper(), alternate({
            "fusegrad export_model": lambda: export_model(model, ours, "gguf", dtype=args.mix),
            "llama_model_quantize": lambda: llama_quantize(f32, theirs, args.mix, os.cpu_count())}, args.repeat))
    print(f"load average {load()} after")


if __name__ == "__main__":
    main()
