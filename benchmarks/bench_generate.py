"""Greedy generation speed: fusegrad's generate vs transformers' on the same Hugging Face checkpoint, both
float32 on the CPU, token-identical output checked. Default model: the real SmolLM2-135M-Instruct the tests use.

    PYTHONPATH=. python benchmarks/bench_generate.py [--model HF_DIR] [--new 32] [--repeat 5] [--torch_threads N]

Runs the two alternately (ours, theirs, ours, ...) after a warm-up of each and prints tokens/s of each
(median and range over --repeat runs, prompt processing included), the ratio of the medians, the CPU, the
BLAS kernels, the thread counts and the load average before and after.
"""
import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusegrad.backends import openblas  # noqa: E402
from fusegrad.models import Llama  # noqa: E402
from fusegrad.models.generate import generate  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def rate(fn, new: int) -> tuple:
    t = time.perf_counter()
    out = fn()
    return new / (time.perf_counter() - t), out


def summary(rates: list) -> str:
    lo, hi = min(rates), max(rates)
    return f"{statistics.median(rates):6.1f} tokens/s (median; {lo:.1f}-{hi:.1f} over {len(rates)} runs)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face directory (default: the tests' SmolLM2-135M-Instruct)")
    ap.add_argument("--new", type=int, default=32, help="new tokens per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each, alternating")
    ap.add_argument("--torch_threads", type=int, help="torch.set_num_threads for transformers (default: torch's)")
    args = ap.parse_args()
    import numba
    import torch
    import transformers

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.model is None:
        from tests.real_checkpoint import smollm2_dir
        args.model = smollm2_dir()
    prompt = transformers.AutoTokenizer.from_pretrained(args.model).encode("Once upon a time, in a small village,")
    ours = Llama.from_pretrained(args.model)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run_theirs():
        with torch.no_grad():
            return theirs.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)[0].tolist()

    def run_ours():
        return generate(ours, prompt, max_new_tokens=args.new, temperature=0.0)

    run_ours(), run_theirs()  # warm up both (JIT kernels, torch's first-call setup)
    before = load()
    ours_rates, theirs_rates = [], []
    for _ in range(args.repeat):
        r, ours_out = rate(run_ours, args.new)
        ours_rates.append(r)
        r, theirs_out = rate(run_theirs, args.new)
        theirs_rates.append(r)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, OpenBLAS {openblas.corename()}, numba threads "
          f"{numba.get_num_threads()} ({numba.threading_layer()}), torch {torch.__version__} threads "
          f"{torch.get_num_threads()}; load average {before} before, {load()} after")
    print(f"model {args.model}: prompt {len(prompt)} tokens + {args.new} new, greedy, float32")
    print(f"fusegrad     {summary(ours_rates)}")
    print(f"transformers {summary(theirs_rates)}")
    ratio = statistics.median(ours_rates) / statistics.median(theirs_rates)
    print(f"ratio {ratio:.2f}x, token-identical: {ours_out == theirs_out}")


if __name__ == "__main__":
    main()
