"""Opening a GGUF file: fusegrad's one-pass reader against the gguf package's GGUFReader, alternating.

    python benchmarks/bench_gguf_open.py FILE.gguf [--repeats 5]

Each round opens the file with both and reads every metadata value (as a model and its tokenizer need); prints
the median seconds of each, their spread and the ratio. The test cache holds a real file to try it on:
~/.cache/fusegrad-tests/SmolLM2-135M-Instruct.Q4_1.gguf (tests/real_checkpoint.py).
"""
import argparse
import statistics
import time

import gguf

from fusegrad.models.gguf_reader import GGUFContents


def theirs(path):
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def ours(path):
    return GGUFContents(path).metadata


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    times = {"fusegrad": [], "gguf.GGUFReader": []}
    for _ in range(args.repeats):  # alternating, so both see the same machine
        for name, fn in (("fusegrad", ours), ("gguf.GGUFReader", theirs)):
            t0 = time.perf_counter()
            fn(args.path)
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:16s} median {statistics.median(ts):7.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})")
    ratio = statistics.median(times["gguf.GGUFReader"]) / statistics.median(times["fusegrad"])
    print(f"ratio GGUFReader / fusegrad: {ratio:.1f}x")


if __name__ == "__main__":
    main()
