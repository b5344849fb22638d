"""Training on the ANE backend: GEMM offload vs float64, loss curve vs the CPU, compile once, fallback,
loss scaling, and the clear error for --backend ane off a Mac."""
import contextlib
import logging
import sys

import numpy as np
import pytest

import fusegrad.backends as backends
from fusegrad.backends.ane import AneRuntime, AneSim, CompileBudget, kernels
from fusegrad.backends.ane.backend import AneBackend
from fusegrad.backends.ane.kernels import matmul_dynamic
from fusegrad.backends.ane.mil import format_program, parse
from fusegrad.cli.main import main
from fusegrad.core.errors import BackendError
from fusegrad.core.trace import TRACER
from fusegrad.train.trainer import Trainer, TrainConfig

FP16_LOSS_TOL = 2e-3  # |loss(ane-sim) - loss(cpu fp32)| per step; fp16 rounding of GEMM operands (~1e-3 relative)


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """CPU-side kernels: the numpy reference (fast on tiny shapes); the default backend restored after."""
    monkeypatch.setenv("FUSEGRAD_JIT", "0")
    yield
    if hasattr(backends, "set_default_backend"):  # the trainer sets a process-wide default (until use_backend)
        backends.set_default_backend("numpy")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return Trainer(tiny(tmp_path_factory.mktemp("prep"), backend="numpy")).data_dir


def tiny(out, **kw):
    base = dict(preset="tiny", batch_size=4, seq_len=16, max_steps=20, warmup_steps=2, eval_interval=0,
                ckpt_interval=0, out_dir=str(out), progress=False, plot=False, sample_tokens=0, quiet=True, seed=3)
    return TrainConfig(**{**base, **kw})


def on(backend):
    """A registry name that serves `backend` (the instance) for this test."""
    name = f"{backend.name}-test-{id(backend)}"
    backends.register_backend(name, lambda: backend)
    return name


def run_steps(trainer, n):
    per_step = []
    for _ in range(n):
        before = TRACER.counters.copy()
        trainer.train_step()
        per_step.append({k: v - before[k] for k, v in TRACER.counters.items()
                         if k.startswith(("dispatch:", "fallback:")) and v != before[k]})
    return np.array(trainer.history["loss"]), per_step


class FakeCompiler:
    """AppleNeuralEngine.framework stand-in for AneRuntime: compiles by parsing, evaluates on ane-sim."""

    def compile(self, text, weights):
        return parse(text), dict(weights)

    def evaluate(self, handle, arrays, output_types):
        program, weights = handle
        out = AneSim().run(program, weights, {v.name: a for v, a in zip(program.inputs, arrays)})
        return [out[name] for name in program.outputs]

    def unload(self, handle):
        pass


class FlakyRunner:
    """ane-sim that raises on the given call numbers (1-based)."""

    def __init__(self, fail_calls):
        self.sim, self.calls, self.fail_calls = AneSim(), 0, set(fail_calls)

    def run(self, program, weights, inputs):
        self.calls += 1
        if self.calls in self.fail_calls:
            raise BackendError(f"injected ANE failure on call {self.calls}")
        return self.sim.run(program, weights, inputs)


class WrongRunner(AneSim):
    """ane-sim with the hardware rules whose results are 50% off: wrong values, never an exception."""

    def run(self, program, weights, inputs):
        return {"y": super().run(program, weights, inputs)["y"] * 1.5}


def test_wrong_kernel_values_disable_each_shape_and_the_loss_equals_the_cpu_loss(tmp_path, data_dir):
    cpu = AneBackend("ane-sim", min_flops=float("inf"))  # every GEMM on the CPU, the same fp16 loss scaling
    cpu.name = "cpu-scaled"
    cpu_losses, _ = run_steps(Trainer(tiny(tmp_path / "cpu", data=data_dir, backend=on(cpu))), 4)
    be = AneBackend("ane-sim", runner=WrongRunner(hw_rules=True))
    name = on(be)
    with pytest.warns(RuntimeWarning, match=r"ane-sim computed GEMM \(64, \d+, \d+\) wrong") as record:
        losses, steps = run_steps(Trainer(tiny(tmp_path / "ane", data=data_dir, backend=name)), 4)
    np.testing.assert_array_equal(losses, cpu_losses)  # every wrong result was replaced by the CPU's
    assert sum("computed GEMM" in str(w.message) for w in record) == 1 and len(be.disabled) == 5
    assert steps[0] == {"dispatch:ane-sim": 5, "dispatch:numpy": 19}  # each shape's first call ran (and was caught)
    assert all(s == {"dispatch:numpy": 24} for s in steps[1:])  # then the CPU only


def test_m1_dialect_trains_on_ane_sim_like_the_cpu(tmp_path, data_dir):
    cpu_losses, _ = run_steps(Trainer(tiny(tmp_path / "cpu", data=data_dir, backend="numpy")), 6)
    be = AneBackend("ane-sim", chip="Apple M1")
    name = on(be)
    losses, steps = run_steps(Trainer(tiny(tmp_path / "ane", data=data_dir, backend=name)), 6)
    assert be.dialect == "m1" and not be.disabled and steps[-1]["dispatch:ane-sim"] == 16
    assert all(p.inputs[0].type.dtype == "fp16" for p in (g.program for g in be._kernels.values()))
    assert np.abs(losses - cpu_losses).max() <= FP16_LOSS_TOL


def test_gemms_forward_and_dx_on_ane_within_fp16_of_float64_dw_on_cpu(rng):
    be = AneBackend("ane-sim")
    x, w, dy = rng.standard_normal((24, 32)), rng.standard_normal((48, 32)) * 0.1, rng.standard_normal((24, 48))
    x, w, dy = (a.astype(np.float32) for a in (x, w, dy))
    before = TRACER.counters.copy()
    y, dx = be.gemm(x, w, trans_b=True), be.gemm(dy, w)
    for got, ref in ((y, x.astype(np.float64) @ w.T), (dx, dy.astype(np.float64) @ w)):
        err = np.abs(got - ref).max()
        assert got.dtype == np.float32 and 0 < err <= 5e-3 * np.abs(ref).max(), err  # fp16, not fp32
    dw = be.gemm(dy, x, trans_a=True)  # dW = dy^T x stays fp32 on the CPU
    np.testing.assert_allclose(dw, dy.astype(np.float64).T @ x, rtol=1e-5, atol=1e-5)
    assert TRACER.counters["dispatch:ane-sim"] - before["dispatch:ane-sim"] == 2
    assert TRACER.counters["dispatch:numpy"] - before["dispatch:numpy"] == 1


def test_fused_qkv_and_w13_dx_kernels_are_the_offloaded_program():
    dim, kv, hidden, seq = 32, 16, 64, 8
    assert format_program(matmul_dynamic(dim + 2 * kv, dim, seq)[0]) == \
        format_program(kernels.qkv_backward_dx_dynamic(dim, kv, seq)[0])
    assert format_program(matmul_dynamic(2 * hidden, dim, seq)[0]) == \
        format_program(kernels.ffn_w13_backward_dx_dynamic(dim, hidden, seq)[0])


def test_ane_sim_tracks_the_cpu_fp32_loss_curve_for_20_steps(tmp_path, data_dir):
    cpu_losses, cpu_steps = run_steps(Trainer(tiny(tmp_path / "cpu", data=data_dir, backend="numpy")), 20)
    name = on(AneBackend("ane-sim"))
    ane_losses, ane_steps = run_steps(Trainer(tiny(tmp_path / "ane", data=data_dir, backend=name)), 20)
    diff = np.abs(ane_losses - cpu_losses)
    print(f"\nloss cpu {cpu_losses[0]:.4f} -> {cpu_losses[-1]:.4f}; max |ane-sim - cpu| {diff.max():.2e}")
    assert cpu_losses[-1] < cpu_losses[0] - 0.5  # it learns
    assert diff.max() <= FP16_LOSS_TOL and diff[1:].max() > 0  # fp16 GEMMs: close, not bitwise
    layers = 2  # tiny preset: 4 projections per layer; forward + dx on the ANE, dW on the CPU
    assert all(s == {"dispatch:ane-sim": 8 * layers, "dispatch:numpy": 4 * layers} for s in ane_steps), ane_steps[0]
    assert all("dispatch:ane-sim" not in s for s in cpu_steps)


def test_weights_restaged_every_step_without_recompiling(tmp_path, data_dir):
    runtime = AneRuntime(FakeCompiler(), CompileBudget(20))
    name = on(AneBackend("ane", runner=runtime))
    trainer = Trainer(tiny(tmp_path, data=data_dir, backend=name))
    run_steps(trainer, 1)
    compiled = runtime.budget.used
    wqkv = trainer.model.params["layers.0.wqkv"].numpy().copy()
    losses, _ = run_steps(trainer, 3)
    shapes = {w.shape for w in trainer.model.params.values() if w.ndim == 2} - {trainer.model.classifier.shape}
    kernel_shapes = shapes | {(i, o) for o, i in shapes}  # forward (in -> out) and dx (out -> in) per projection
    assert compiled == runtime.cached == len(kernel_shapes) == 5  # layers share them; qkv fwd == w2 dx, wo fwd == dx
    assert runtime.budget.used == compiled  # the optimizer changed the weights; nothing recompiled
    assert not np.array_equal(trainer.model.params["layers.0.wqkv"].numpy(), wqkv) and losses[-1] < losses[0]


def test_failing_kernel_calls_fall_back_to_the_cpu_and_training_continues(tmp_path, data_dir):
    runner = FlakyRunner(fail_calls={2, 5})
    name = on(AneBackend("ane-sim", runner=runner))
    trainer = Trainer(tiny(tmp_path, data=data_dir, backend=name))
    with pytest.warns(RuntimeWarning, match="injected ANE failure on call 2") as record:
        losses, steps = run_steps(trainer, 3)
    assert sum("fusegrad: GEMM" in str(w.message) for w in record) == 1  # warned once
    assert steps[0] == {"dispatch:ane-sim": 14, "fallback:ane-sim": 2, "dispatch:numpy": 10}  # 8 dW + 2 fallbacks
    assert steps[1] == steps[2] == {"dispatch:ane-sim": 16, "dispatch:numpy": 8}  # still on the ANE
    assert np.isfinite(losses).all() and trainer.step == 3


def test_overflow_skips_the_step_and_halves_the_scale_then_scale_grows(tmp_path, monkeypatch, data_dir, caplog):
    name = on(AneBackend("ane-sim"))
    trainer = Trainer(tiny(tmp_path, data=data_dir, backend=name))
    assert trainer.loss_scale == [AneBackend.loss_scale, 0]
    trainer.loss_scale = [2.0 ** 40, 0]  # scaled grads pass fp16's 65504 inside the ANE GEMMs -> inf
    params = {n: t.numpy().copy() for n, t in trainer.model.params.items()}
    overflows = TRACER.counters["loss_scale:overflow"]
    with caplog.at_level(logging.WARNING, logger="fusegrad.train"), np.errstate(over="ignore", invalid="ignore"):
        trainer.train_step()
    assert trainer.loss_scale == [2.0 ** 39, 0] and trainer.step == 1
    assert all(np.array_equal(t.numpy(), params[n]) for n, t in trainer.model.params.items())  # step skipped
    assert TRACER.counters["loss_scale:overflow"] == overflows + 1
    assert "overflow at loss scale 1.09951e+12; step skipped" in caplog.text

    loop_module = sys.modules[Trainer.train_step.__module__]  # where the training step (and its scaler) lives
    monkeypatch.setattr(loop_module, "LOSS_SCALE_GROWTH_INTERVAL", 2)
    trainer.loss_scale = [256.0, 0]
    trainer.train_step()
    assert trainer.loss_scale == [256.0, 1]
    assert not np.array_equal(trainer.model.params["layers.0.w13"].numpy(), params["layers.0.w13"])
    trainer.train_step()
    assert trainer.loss_scale == [512.0, 0]


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")
def test_backend_ane_off_a_mac_says_why_and_points_at_ane_sim(tmp_path, capsys):
    with pytest.raises(BackendError, match=f"{sys.platform}.*--backend ane-sim"):
        backends.get_backend("ane")
    assert main(["train", "--backend", "ane", "--preset", "tiny", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Apple Neural Engine needs macOS" in err and "ane-sim" in err
    assert not (tmp_path / "data").exists()  # refused before preparing any data


@contextlib.contextmanager
def offloaded_to(spec):
    """The GEMMs of numpy arrays go to `spec`, even the tiny preset's small ones, inside the block."""
    if hasattr(backends, "gemm_offload"):  # the scoped API that replaces the process-wide chain
        with backends.gemm_offload(spec, min_flops=0):
            yield
        return
    from fusegrad.backends.dispatch import GEMM_CHAIN  # the Trainer added the offload when it was made

    GEMM_CHAIN.offloads[-1].min_flops = 0
    try:
        yield
    finally:
        GEMM_CHAIN.remove_offload(spec)


def test_offload_gemm_ane_sim_sends_projection_gemms_of_a_numpy_model(data_dir, tmp_path):
    """--offload_gemm ane-sim: the model stays numpy fp32; forward and dx GEMMs go to ane-sim, dW stays
    on the CPU, the loss scale switches on, and the losses track the plain CPU run."""
    cpu = Trainer(tiny(tmp_path / "cpu", data=data_dir, max_steps=4))
    cpu_losses = [cpu.train_step() for _ in range(4)]
    off = Trainer(tiny(tmp_path / "off", data=data_dir, max_steps=4, offload_gemm="ane-sim"))
    with offloaded_to("ane-sim"):
        assert off.loss_scale is not None and off.model.params["norm"].backend.name == "numpy"
        before = dict(TRACER.counters)
        losses = [off.train_step() for _ in range(4)]
    sent = TRACER.counters["dispatch:ane-sim"] - before.get("dispatch:ane-sim", 0)
    assert sent == 4 * 16  # per step: 8 projections forward + 8 backward dx; the 8 dW GEMMs stay on the CPU
    np.testing.assert_allclose(losses, cpu_losses, atol=FP16_LOSS_TOL)


def test_offload_to_an_unknown_target_is_a_clear_error():
    with pytest.raises(BackendError, match="unknown target 'npu'"):
        if hasattr(backends, "gemm_offload"):  # the context manager that replaces enable_gemm_offload
            with backends.gemm_offload("npu"):
                pass
        else:
            backends.enable_gemm_offload("npu")
