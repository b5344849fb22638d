#!/usr/bin/env python
"""Run every fusegrad ANE kernel on this Mac's Neural Engine and compare with ane-sim, like the seed's test.

    python scripts/ane_verify.py             # stories110M sizes (DIM 768, HIDDEN 2048, SEQ 64, 12 heads)
    python scripts/ane_verify.py --small     # DIM 64, HIDDEN 128, SEQ 16, 4 heads / 2 kv heads
    python scripts/ane_verify.py --sim-only  # no ANE needed: checks this script anywhere (sim vs sim)

Prints per kernel: compile and evaluate time, max |ANE - ane-sim|, and the bound; exits 1 if any kernel
fails or exceeds the bound (2e-2 of the largest output magnitude), 2 if the ANE is unavailable.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fusegrad.backends.ane import AneSim, available, get_runner, kernels as K  # noqa: E402
from fusegrad.core.errors import BackendError  # noqa: E402

REL_BOUND = 2e-2


def cases(dim, hidden, seq, n_heads, n_kv):
    """(name, (program, weights), input x) for every kernel; weights ~ U(-1, 1)/sqrt(fan_in) as in the seed."""
    rng = np.random.default_rng(42)
    kv = dim // n_heads * n_kv

    def w(out, inp):
        return ((rng.random((out, inp)) * 2 - 1) / np.sqrt(inp)).astype(np.float32)

    def act(c, scale=1.0):
        return (scale * rng.standard_normal((c, seq))).astype(np.float32)

    w1, w2, w3 = w(hidden, dim), w(dim, hidden), w(hidden, dim)
    wq, wk, wv, wo, g = w(dim, dim), w(kv, dim), w(kv, dim), w(dim, dim), np.ones(dim, np.float32)
    dh, dqkv, x = act(2 * hidden, 0.01), act(dim + 2 * kv, 0.1), act(dim)
    def cf(a):  # (C, S) -> (1, C, 1, S)
        return a[None, :, None, :]

    yield "ffn_w13_backward_dx", K.ffn_w13_backward_dx(w1, w3, seq), cf(dh)
    yield "ffn_w13_backward_dx_dynamic", K.ffn_w13_backward_dx_dynamic(dim, hidden, seq), \
        K.pack_dynamic(dh, np.concatenate([w1, w3]))
    yield "qkv_backward_dx", K.qkv_backward_dx(wq, wk, wv, seq), cf(dqkv)
    yield "qkv_backward_dx_dynamic", K.qkv_backward_dx_dynamic(dim, kv, seq), \
        K.pack_dynamic(dqkv, np.concatenate([wq, wk, wv]))
    yield "ffn_forward", K.ffn_forward(w1, w2, w3, seq), cf(x)
    yield "ffn_forward_dynamic", K.ffn_forward_dynamic(dim, hidden, seq), K.pack_dynamic(x, w1.T, w3.T, w2)
    yield "attention_forward", K.attention_forward(wq, wk, wv, wo, g, n_heads, n_kv, seq), cf(x)
    yield "attention_forward_dynamic", K.attention_forward_dynamic(dim, n_heads, n_kv, seq), \
        K.pack_dynamic(x, wq.T, wk.T, wv.T, wo)
    yield "sdpa_backward", K.sdpa_backward(dim, n_heads, n_kv, seq), \
        cf(np.concatenate([act(dim), act(kv), act(kv), act(dim, 0.1)]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="small shapes (fast)")
    parser.add_argument("--sim-only", action="store_true", help="compare ane-sim with itself (no ANE needed)")
    args = parser.parse_args(argv)
    if not args.sim_only:
        ok, reason = available()
        if not ok:
            print(f"ANE unavailable: {reason}")
            return 2
    device = AneSim() if args.sim_only else get_runner("ane")
    sizes = (64, 128, 16, 4, 2) if args.small else (768, 2048, 64, 12, 12)
    print(f"device: {device.name}  DIM {sizes[0]} HIDDEN {sizes[1]} SEQ {sizes[2]} heads {sizes[3]}/{sizes[4]}")
    failures = 0
    for name, (program, weights), x in cases(*sizes):
        ref = AneSim().run(program, weights, {"x": x})["y"]
        try:
            t0 = time.perf_counter()
            if hasattr(device, "prepare"):
                device.prepare(program, weights)
            t1 = time.perf_counter()
            got = device.run(program, weights, {"x": x})["y"]
            t2 = time.perf_counter()
        except BackendError as e:
            print(f"{name:30s} FAIL  {e}")
            failures += 1
            continue
        diff, bound = float(np.abs(got - ref).max()), REL_BOUND * float(np.abs(ref).max())
        status = "OK" if diff <= bound else "DIFF"
        failures += status != "OK"
        print(f"{name:30s} {status:4s}  compile {1e3 * (t1 - t0):7.1f} ms  eval {1e3 * (t2 - t1):7.2f} ms  "
              f"max diff vs ane-sim {diff:.6f} (bound {bound:.6f})")
    print("DONE" if not failures else f"{failures} kernel(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
