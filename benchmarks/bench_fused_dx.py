"""Fused backward dx (ONE GEMM on the packed grads) vs separate GEMMs + adds, at the seed's shapes.

W1/W3:  dx = [dh1, dh3] @ [W1; W3]           vs  dh1 @ W1 + dh3 @ W3           (DIM 768, HIDDEN 2048)
QKV:    dx = [dq, dk, dv] @ [Wq; Wk; Wv]     vs  dq @ Wq + dk @ Wk + dv @ Wv   (768 x 3*768)

Row-major (SEQ, C) activations, so `dh @ W` is the seed's `W^T dh`. Both run through the numpy
backend's GEMM (what training uses); the two variants alternate within each repetition so drift in
machine load hits both alike. Reports the median per call and separate / fused.

    python benchmarks/bench_fused_dx.py              # a small table
    python benchmarks/bench_fused_dx.py --json       # one JSON object
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fusegrad.backends import get_backend

DIM, HIDDEN = 768, 2048


def cases(seqs):
    """(name, seq, [(rows_i, DIM) weight parts]) for W1/W3 and QKV at each sequence length."""
    for seq in seqs:
        yield f"w1w3 {DIM}x{HIDDEN}", seq, [HIDDEN, HIDDEN]
        yield f"qkv {DIM}x3*{DIM}", seq, [DIM, DIM, DIM]


def time_calls(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def bench_case(seq: int, parts: list, reps: int, inner: int, rng) -> dict:
    gemm = get_backend("numpy").gemm
    weights = [(rng.uniform(-1, 1, (rows, DIM)) / np.sqrt(rows)).astype(np.float32) for rows in parts]
    grads = [(0.01 * rng.standard_normal((seq, rows))).astype(np.float32) for rows in parts]
    w_cat = np.concatenate(weights)  # (sum rows, DIM): the fused weight as the model stores it
    g_cat = np.concatenate(grads, axis=1)  # (seq, sum rows): the packed grad the fused op's backward emits

    def fused():
        return gemm(g_cat, w_cat)

    def separate():
        out = gemm(grads[0], weights[0])
        for g, w in zip(grads[1:], weights[1:]):
            out += gemm(g, w)
        return out

    max_diff = float(np.abs(fused() - separate()).max())  # also warms both paths up
    t_fused, t_sep = [], []
    for r in range(reps):
        order = [(fused, t_fused), (separate, t_sep)]
        for fn, times in (order if r % 2 == 0 else order[::-1]):
            times.append(time_calls(fn, inner))
    med_f, med_s = statistics.median(t_fused), statistics.median(t_sep)
    return {"seq": seq, "parts": parts, "fused_ms": 1e3 * med_f, "separate_ms": 1e3 * med_s,
            "separate_over_fused": med_s / med_f, "max_abs_diff": max_diff, "reps": reps, "inner": inner}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[64, 256], help="sequence lengths (rows of dx)")
    ap.add_argument("--reps", type=int, default=5, help="alternating repetitions (median taken)")
    ap.add_argument("--inner", type=int, default=10, help="calls per timed repetition")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = [dict(case=name, **bench_case(seq, parts, args.reps, args.inner, rng))
            for name, seq, parts in cases(args.seq)]
    report = {"benchmark": "fused_dx", "dtype": "float32", "results": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'case':<18}{'seq':>5}{'fused ms':>11}{'separate ms':>13}{'sep/fused':>11}{'max|diff|':>12}")
        for r in rows:
            print(f"{r['case']:<18}{r['seq']:>5}{r['fused_ms']:>11.3f}{r['separate_ms']:>13.3f}"
                  f"{r['separate_over_fused']:>11.2f}{r['max_abs_diff']:>12.2e}")
    return report


if __name__ == "__main__":
    main()
