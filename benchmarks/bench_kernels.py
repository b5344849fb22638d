"""Each numba kernel against its numpy reference at the stories15M training shapes (batch 8 x seq 256).

    python benchmarks/bench_kernels.py [--repeats 5]

Prints the median milliseconds of both and their ratio. Kernels are pre-warmed first (disk cache).
"""
import argparse
import statistics
import time

import numpy as np

from fusegrad.backends.base import rope_tables
from fusegrad.backends.cpu_jit import JitBackend
from fusegrad.backends.numpy_backend import NumpyBackend

reference, cpu_jit = NumpyBackend(), JitBackend()  # the contract's reference bodies; the numba overrides

B, T, C, H, HD, V = 8, 256, 288, 6, 768, 32000
N = B * T


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def cases(rng):
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x, w, h13, g = f32(N, C), f32(C), f32(N, 2 * HD), f32(N, HD)
    tokens, targets = rng.integers(0, V, N), rng.integers(0, V, N)
    emb = f32(V, C) * 0.02
    qkv = f32(B, T, 3 * C)
    cos, sin = rope_tables(T, C // H, 10000.0)
    _, rstd = reference.rmsnorm_forward(x, w, 1e-5)
    y, saved_ref = reference.attention_forward(qkv, H, H, cos, sin)
    _, saved_jit = cpu_jit.attention_forward(qkv, H, H, cos, sin)
    p, grad, m, v = f32(V, C), f32(V, C), np.zeros((V, C), np.float32), np.zeros((V, C), np.float32)
    return {
        "rmsnorm_forward": lambda k: k.rmsnorm_forward(x, w, 1e-5),
        "rmsnorm_backward": lambda k: k.rmsnorm_backward(x, x, w, rstd),
        "swiglu_forward": lambda k: k.swiglu_forward(h13),
        "swiglu_backward": lambda k: k.swiglu_backward(g, h13),
        "embedding_backward": lambda k: k.embedding_backward(x, tokens, V),
        "attention_forward": lambda k: k.attention_forward(qkv, H, H, cos, sin),
        "attention_backward": lambda k: k.attention_backward(y, saved_jit if k is cpu_jit else saved_ref, H, H),
        "classifier_cross_entropy": lambda k: k.classifier_cross_entropy(x, emb, targets),
        "adamw_update (V x C)": lambda k: k.adamw_update(p, grad, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cpu_jit.prewarm_kernels()
    print(f"{'kernel':<28}{'reference ms':>14}{'numba ms':>10}{'ratio':>8}")
    for name, run in cases(np.random.default_rng(0)).items():
        ref = median_ms(lambda: run(reference), args.repeats)
        jit = median_ms(lambda: run(cpu_jit), args.repeats)
        print(f"{name:<28}{ref:>14.2f}{jit:>10.2f}{ref / jit:>7.2f}x")


if __name__ == "__main__":
    main()
