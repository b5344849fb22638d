"""Apple Neural Engine backend: MIL programs, MILBlob weights, the ane-sim interpreter, the macOS runtime.

Layout: `mil` (program structure, printer, parser), `builder` (MilBuilder, dialects), `blob` (MILBlob
v2), `kernels` (program generators), `sim` (AneSim, NumPy fp16), `runtime` (AneRuntime, ctypes, macOS),
`objc` (Objective-C / IOSurface bindings), `backend` (AneBackend: training), `doctor` (`fusegrad doctor`).

Kernel runner API (what training calls; both runners implement it):

    runner = get_runner("ane-sim")          # or "ane" on an Apple Silicon Mac
    outputs = runner.run(program, weights, {"x": array})   # -> {"y": array}

A kernel is `(program, weights)` from `fusegrad.backends.ane.kernels`; tensors are channel-first
fp32 `[1, C, 1, S]` (a (C, S) matrix `a` is `a[None, :, None, :]`). Runnable example:

>>> import numpy as np
>>> from fusegrad.backends.ane import get_runner, kernels
>>> rng = np.random.default_rng(0)
>>> w1, w3 = rng.standard_normal((2, 128, 96)).astype(np.float32) * 0.1    # (hidden, dim) each
>>> dh = rng.standard_normal((256, 128)).astype(np.float32)                 # concat(dh1, dh3): (2*hidden, S)
>>> program, weights = kernels.ffn_w13_backward_dx(w1, w3, seq=128)   # I/O >= 49,152 bytes, as the ANE needs
>>> dx = get_runner("ane-sim").run(program, weights, {"x": dh[None, :, None, :]})["y"][0, :, 0, :]
>>> bool(np.abs(dx - (w1.T @ dh[:128] + w3.T @ dh[128:])).max() < 2e-2)
True
>>> packed = kernels.pack_dynamic(dh, np.concatenate([w1, w3]))             # weights ride in the input
>>> dyn = kernels.ffn_w13_backward_dx_dynamic(dim=96, hidden=128, seq=128)  # compiled once, any weights
>>> bool(np.abs(get_runner("ane-sim").run(*dyn, {"x": packed})["y"][0, :, 0, :] - dx).max() < 2e-2)
True

`available()` says whether the real ANE can be used here, and why not.
"""
from fusegrad.backends.ane.runtime import AneRuntime, CompileBudget, available
from fusegrad.backends.ane.sim import AneSim
from fusegrad.core.errors import BackendError

RUNNERS = ("ane-sim", "ane")


def get_runner(name: str = "ane-sim"):
    """A kernel runner: "ane-sim" (any OS; it enforces the ANE's reported padding rules, see sim.py) or "ane"
    (macOS on Apple Silicon; BackendError elsewhere, with the reason and the ane-sim alternative)."""
    if name == "ane-sim":
        return AneSim(hw_rules=True)
    if name == "ane":
        return AneRuntime()
    raise BackendError(f"unknown ANE runner {name!r}; choose one of {', '.join(RUNNERS)}")


__all__ = ["AneRuntime", "AneSim", "CompileBudget", "available", "get_runner"]
