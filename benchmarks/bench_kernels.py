"""Each numba kernel against its numpy reference at the stories15M training shapes (batch 8 x seq 256).

    python benchmarks/bench_kernels.py [--repeats 5]
    python benchmarks/bench_kernels.py --twins        # each kernel's serial twin against its parallel launch

Prints the median milliseconds of both and their ratio. Kernels are pre-warmed first (disk cache). --twins times
memory-bound kernels at growing sizes on numba's threads (and on one, as a worker process runs them): where a
parallel launch starts to pay on this machine (jit_common.Kernel, SERIAL_MAX_WORK).
"""
import argparse
import statistics
import time

import numba
import numpy as np

from fusegrad.backends import cpu_jit_attention
from fusegrad.backends.base import rope_tables
from fusegrad.backends.cpu_jit import JitBackend, _adamw, _add_into, _swiglu_forward
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


def twins(repeats: int) -> None:
    """Microseconds a call of each twin, back to back (the median of `repeats` means over 50 calls)."""
    def us(kernel, *args):
        return 1e3 * median_ms(lambda: [kernel(*args) for _ in range(50)], repeats) / 50

    rng = np.random.default_rng(0)
    heads, flat = np.ones((1, 1, 1, 48), np.float32), np.zeros((1, 1, 48), np.float32)
    for threads in sorted({numba.get_num_threads(), 1}, reverse=True):
        numba.set_num_threads(threads)
        rows = cpu_jit_attention._block_rows
        print(f"numba threads {threads}: a 48-float _block_rows {us(rows.parallel, heads, flat, 0, 1, True):.1f} us "
              f"parallel, {us(rows.serial, heads, flat, 0, 1, True):.1f} us serial")
        print(f"{'elements':>10}" + "".join(f"{k + ' ' + t:>20}" for k in ("adamw", "add", "swiglu")
                                            for t in ("serial", "parallel")))
        for n in (2304, 1 << 16, 1 << 18, 1 << 20, 1 << 22):
            p, g, m, v = (rng.random(n, dtype=np.float32) for _ in range(4))
            h13, out = rng.random((n // 128, 256), dtype=np.float32), np.empty((n // 128, 128), np.float32)
            cells = [us(twin, *a) for kernel, a in ((_adamw, (p, g, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 0.01, 0.5, 1.0)),
                                                    (_add_into, (p, g)), (_swiglu_forward, (h13, out)))
                     for twin in (kernel.serial, kernel.parallel)]
            print(f"{n:>10}" + "".join(f"{c:>20.1f}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--twins", action="store_true", help="serial twins against parallel launches")
    args = parser.parse_args()
    cpu_jit.prewarm_kernels()
    if args.twins:
        return twins(args.repeats)
    print(f"{'kernel':<28}{'reference ms':>14}{'numba ms':>10}{'ratio':>8}")
    for name, run in cases(np.random.default_rng(0)).items():
        ref = median_ms(lambda: run(reference), args.repeats)
        jit = median_ms(lambda: run(cpu_jit), args.repeats)
        print(f"{name:<28}{ref:>14.2f}{jit:>10.2f}{ref / jit:>7.2f}x")


if __name__ == "__main__":
    main()
