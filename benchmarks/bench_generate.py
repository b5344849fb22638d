"""Greedy generation speed: fusegrad's generate vs transformers' on the same Hugging Face checkpoint, both
float32 on the CPU, token-identical output checked. Default model: the real SmolLM2-135M-Instruct the tests use.

    PYTHONPATH=. python benchmarks/bench_generate.py [--model HF_DIR] [--new 32] [--repeat 5] [--torch_threads N]

Each side runs in its own process (one side's idle BLAS/OpenMP threads never spin beside the other's run),
loaded and warmed up once; the parent alternates them (ours, theirs, ours, ...) and prints tokens/s of each
(median and range over --repeat runs, prompt processing included), the ratio of the medians, the CPU, the
BLAS kernels, the thread counts and the load average before and after.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summary(rates: list) -> str:
    lo, hi = min(rates), max(rates)
    return f"{statistics.median(rates):6.1f} tokens/s (median; {lo:.1f}-{hi:.1f} over {len(rates)} runs)"


def side_main(side: str, model: str, new: int, torch_threads: int) -> None:
    """A child: load one side, warm it up, then answer each "run" line with {"rate", "ids"}."""
    if side == "fusegrad":
        import numba

        from fusegrad.backends import openblas
        from fusegrad.data.tokenizer import load_tokenizer
        from fusegrad.models import Llama
        from fusegrad.models.generate import generate

        ours = Llama.from_pretrained(model)
        prompt = load_tokenizer(model).encode("Once upon a time, in a small village,")

        def run():
            return generate(ours, prompt, max_new_tokens=new, temperature=0.0)
        about = f"fusegrad: OpenBLAS {openblas.corename()}, numba threads {numba.get_num_threads()}"
    else:
        import torch
        import transformers

        if torch_threads:
            torch.set_num_threads(torch_threads)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        ids = torch.tensor([transformers.AutoTokenizer.from_pretrained(model).encode(
            "Once upon a time, in a small village,")])

        def run():
            with torch.no_grad():
                return theirs.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0].tolist()
        about = f"transformers {transformers.__version__}, torch {torch.__version__} threads {torch.get_num_threads()}"
    run()  # warm-up: JIT kernels, torch's first-call setup
    print(json.dumps({"about": about}), flush=True)
    for _ in sys.stdin:
        t = time.perf_counter()
        out = run()
        print(json.dumps({"rate": new / (time.perf_counter() - t), "ids": out}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face directory (default: the tests' SmolLM2-135M-Instruct)")
    ap.add_argument("--new", type=int, default=32, help="new tokens per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each, alternating")
    ap.add_argument("--torch_threads", type=int, default=0, help="torch.set_num_threads for transformers (default: torch's)")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # a child process: fusegrad | transformers
    args = ap.parse_args()
    if args.side:
        return side_main(args.side, args.model, args.new, args.torch_threads)
    if args.model is None:
        from tests.real_checkpoint import smollm2_dir
        args.model = smollm2_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    sides = {}
    for name in ("fusegrad", "transformers"):
        cmd = [sys.executable, os.path.abspath(__file__), "--side", name, "--model", args.model, "--new", str(args.new),
               "--torch_threads", str(args.torch_threads)]
        sides[name] = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    about = {name: json.loads(p.stdout.readline())["about"] for name, p in sides.items()}  # loaded and warm
    before = load()
    rates, ids = {name: [] for name in sides}, {}
    for _ in range(args.repeat):
        for name, p in sides.items():
            p.stdin.write("run\n")
            p.stdin.flush()
            answer = json.loads(p.stdout.readline())
            rates[name].append(answer["rate"])
            ids[name] = answer["ids"]
    for p in sides.values():
        p.stdin.close()
        p.wait()
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {about['fusegrad']}; {about['transformers']}; "
          f"load average {before} before, {load()} after")
    print(f"model {args.model}: {args.new} new tokens, greedy, float32, each side in its own process")
    print(f"fusegrad     {summary(rates['fusegrad'])}")
    print(f"transformers {summary(rates['transformers'])}")
    ratio = statistics.median(rates["fusegrad"]) / statistics.median(rates["transformers"])
    print(f"ratio {ratio:.2f}x, token-identical: {ids['fusegrad'] == ids['transformers']}")


if __name__ == "__main__":
    main()
