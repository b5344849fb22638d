"""`fusegrad doctor`: compile and run every ANE kernel once and report what happened, for a bug report.

On a Mac with a usable Neural Engine each kernel (in this chip's MIL dialect) is compiled, loaded and
evaluated on the ANE and compared with ane-sim. Elsewhere the report says why the ANE is absent and
runs the kernels on ane-sim alone (with the hardware's padding rules), which checks fusegrad itself.

>>> report = doctor(sizes=(256, 512, 96, 8, 4))
>>> report["ok"], len(report["kernels"]) == len(KERNELS)
(True, True)
>>> "ane-sim" in format_report(report)
True
"""
from __future__ import annotations

import platform
import time

import numpy as np

from fusegrad.backends.ane import kernels as K
from fusegrad.backends.ane.kernels import KERNELS
from fusegrad.backends.ane.runtime import AneRuntime, available, chip_name, dialect_for
from fusegrad.backends.ane.sim import AneSim

# dim, hidden, seq, heads, kv heads: every I/O surface >= 49,152 bytes in both dialects (fp16 too) and every
# matmul inner dimension (head size 32, seq 96, dims) a multiple of 32, as the ANE is reported to need
SIZES = (256, 512, 96, 8, 4)
STORIES110M = (768, 2048, 64, 12, 12)  # the seed's DIM / HIDDEN / SEQ
REL_BOUND = 2e-2  # |ANE - ane-sim| <= 2% of max|ane-sim|: accumulation order and exp/pow approximations differ
GEMM_DIMS = (172, 344)  # stories260K's hidden and 2*hidden: the training GEMM, padded (172 -> 192)


def cases(dim: int, hidden: int, seq: int, n_heads: int, n_kv: int, dialect: str = "m3"):
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
    (k, n), a = GEMM_DIMS, act(GEMM_DIMS[0]).T
    m2, k2 = K.gemm_padding(seq, k, n, 2 if dialect == "m1" else 4)
    yield "matmul_dynamic", K.matmul_dynamic(k2, n, m2, dialect), K.pack_gemm(a, w(k, n), m2, k2)
    yield "ffn_w13_backward_dx", K.ffn_w13_backward_dx(w1, w3, seq, dialect), dh[None, :, None, :]
    yield "ffn_w13_backward_dx_dynamic", K.ffn_w13_backward_dx_dynamic(dim, hidden, seq, dialect), \
        K.pack_dynamic(dh, np.concatenate([w1, w3]))
    yield "qkv_backward_dx", K.qkv_backward_dx(wq, wk, wv, seq, dialect), dqkv[None, :, None, :]
    yield "qkv_backward_dx_dynamic", K.qkv_backward_dx_dynamic(dim, kv, seq, dialect), \
        K.pack_dynamic(dqkv, np.concatenate([wq, wk, wv]))
    yield "ffn_forward", K.ffn_forward(w1, w2, w3, seq, dialect), x[None, :, None, :]
    yield "ffn_forward_dynamic", K.ffn_forward_dynamic(dim, hidden, seq, dialect), K.pack_dynamic(x, w1.T, w3.T, w2)
    yield "attention_forward", K.attention_forward(wq, wk, wv, wo, g, n_heads, n_kv, seq, dialect=dialect), \
        x[None, :, None, :]
    yield "attention_forward_dynamic", K.attention_forward_dynamic(dim, n_heads, n_kv, seq, dialect=dialect), \
        K.pack_dynamic(x, wq.T, wk.T, wv.T, wo)
    yield "sdpa_backward", K.sdpa_backward(dim, n_heads, n_kv, seq, dialect), \
        np.concatenate([act(dim), act(kv), act(kv), act(dim, 0.1)])[None, :, None, :]


def _kernel(name, program, weights, x, runner, reference) -> dict:
    row = dict(name=name, compile="-", load="-", eval="-", compile_ms=None, eval_ms=None, max_diff=None,
               bound=None, error="", ok=False)
    device, stage = runner or reference, "compile"
    try:
        t0 = time.perf_counter()
        if hasattr(device, "prepare"):
            device.prepare(program, weights)
        t1 = time.perf_counter()
        row.update(compile="ok", load="ok", compile_ms=1e3 * (t1 - t0))
        stage = "eval"
        got = device.run(program, weights, {"x": x})["y"].astype(np.float32)
        row.update(eval="ok", eval_ms=1e3 * (time.perf_counter() - t1))
        stage = "ane-sim reference"
        ref = reference.run(program, weights, {"x": x})["y"].astype(np.float32) if runner else got
    except Exception as e:  # report every failure, whatever raised it: that is what the report is for
        if stage == "compile" and "load failed" in str(e):
            row.update(compile="ok", load="FAIL")
        elif stage in ("compile", "eval"):
            row[stage] = "FAIL"
        row["error"] = f"{stage}: {type(e).__name__}: {e}"
        return row
    bound = REL_BOUND * float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max()) if runner else None
    row.update(max_diff=diff, bound=bound, ok=bool(np.isfinite(got).all()) and (diff is None or diff <= bound))
    if not row["ok"]:
        row["error"] = "non-finite output" if diff is None else f"max diff {diff:.3g} > bound {bound:.3g}"
    return row


def doctor(runner=None, chip: str | None = None, sizes: tuple = SIZES) -> dict:
    """Run every kernel once on `runner` (default: the real ANE when available, else none) against ane-sim.
    Returns chip, macos, python, numpy, dialect, ane, device, sizes, kernels (a row per kernel: compile,
    load, eval ("ok" / "FAIL" / "-"), compile_ms, eval_ms, max_diff, bound, error, ok) and ok."""
    chip = chip or chip_name()
    present, why = available()
    if runner is None and present:
        runner = AneRuntime()
    reference = AneSim(hw_rules=True)
    rows = [_kernel(name, program, weights, x, runner, reference)
            for name, (program, weights), x in cases(*sizes, dialect_for(chip))]
    return dict(chip=chip, macos=platform.mac_ver()[0] or f"none ({platform.system()} {platform.release()})",
                python=platform.python_version(), numpy=np.__version__, dialect=dialect_for(chip),
                ane="present" if present else f"absent: {why}", device=runner.name if runner else "ane-sim only",
                sizes=dict(zip(("dim", "hidden", "seq", "heads", "kv_heads"), sizes)), kernels=rows,
                ok=all(r["ok"] for r in rows))


def format_report(report: dict) -> str:
    """The report as text to paste into a bug report."""
    s = report["sizes"]
    lines = ["fusegrad doctor: Apple Neural Engine report",
             f"chip     {report['chip']} (MIL dialect {report['dialect']})",
             f"macOS    {report['macos']}",
             f"python   {report['python']}, numpy {report['numpy']}",
             f"ANE      {report['ane']}" + ("" if report["ane"] == "present" else "; kernels checked on ane-sim only"),
             f"device   {report['device']}",
             f"sizes    dim {s['dim']}, hidden {s['hidden']}, seq {s['seq']}, heads {s['heads']}/{s['kv_heads']}",
             "",
             f"{'kernel':30s} {'result':6s} compile load eval  {'compile ms':>10s} {'eval ms':>8s}  max diff (bound)"]

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in report["kernels"]:
        result = "OK" if r["ok"] else "DIFF" if r["max_diff"] is not None else "FAIL"
        lines.append(f"{r['name']:30s} {result:6s} {r['compile']:7s} {r['load']:4s} {r['eval']:4s}  "
                     f"{num(r['compile_ms'], '10.1f')} {num(r['eval_ms'], '8.2f')}  "
                     + ("-" if r["max_diff"] is None else f"{r['max_diff']:.3g} ({r['bound']:.3g})"))
    lines += [f"  {r['name']}: {r['error']}" for r in report["kernels"] if r["error"]]
    failed = [r["name"] for r in report["kernels"] if not r["ok"]]
    n = len(report["kernels"])
    lines.append(f"{len(failed)} of {n} kernels FAILED: {', '.join(failed)}" if failed
                 else f"{n} of {n} kernels passed: DONE")
    return "\n".join(lines)
