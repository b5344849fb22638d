"""Greedy generation speed: fusegrad's generate vs transformers' on the same Hugging Face checkpoint, both
float32 on the CPU, token-identical output checked. Default model: the real SmolLM2-135M-Instruct the tests use.

    PYTHONPATH=. python benchmarks/bench_generate.py [--model HF_DIR] [--new 64] [--repeat 3]

Prints tokens/s of each (best of --repeat runs, prompt processing included) and the ratio.
"""
import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusegrad.models import Llama  # noqa: E402
from fusegrad.models.generate import generate  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def best_rate(fn, new: int, repeat: int) -> tuple:
    out, best = None, 0.0
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = max(best, new / (time.perf_counter() - t))
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face directory (default: the tests' SmolLM2-135M-Instruct)")
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--torch_threads", type=int, help="torch.set_num_threads for transformers (default: torch's)")
    args = ap.parse_args()
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
    ours_rate, ours_out = best_rate(run_ours, args.new, args.repeat)
    theirs_rate, theirs_out = best_rate(run_theirs, args.new, args.repeat)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"model {args.model}: prompt {len(prompt)} tokens + {args.new} new, greedy, float32")
    print(f"fusegrad     {ours_rate:6.1f} tokens/s")
    print(f"transformers {theirs_rate:6.1f} tokens/s")
    print(f"ratio {ours_rate / theirs_rate:.2f}x, token-identical: {ours_out == theirs_out}")


if __name__ == "__main__":
    main()
