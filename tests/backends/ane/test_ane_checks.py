"""The ANE backend checks itself: hardware padding rules (enforced by ane-sim), results compared with the
CPU at run time, compile/load retried then dropped, and the per-chip MIL dialect."""
import numpy as np
import pytest

from fusegrad.backends.ane import AneRuntime, AneSim, CompileBudget, get_runner, kernels as K
from fusegrad.backends.ane.backend import AneBackend
from fusegrad.backends.ane.mil import format_program, parse
from fusegrad.backends.ane.runtime import dialect_for
from fusegrad.backends.ane.sim import INNER_MULTIPLE, MIN_IO_BYTES
from fusegrad.core.errors import BackendError
from fusegrad.core.trace import trace

CHIPS = ["Apple M4 Pro", "Apple M1"]  # the "m3" and the "m1" dialect


def rand(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def fp16_close(got, ref, k):
    """fp16 operands: each product is off by ~2**-10 relative; allow that over sqrt(k) terms, and more."""
    ref = np.asarray(ref, np.float64)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() <= 5e-3 * np.abs(ref).max(), np.abs(got - ref).max()


class CountingSim(AneSim):
    """ane-sim with the hardware rules, counting prepares and runs; `wrong(calls, y)` may corrupt results."""

    def __init__(self, wrong=None, fail_prepares=0):
        super().__init__(hw_rules=True)
        self.prepares = self.runs = 0
        self.wrong, self.fail_prepares = wrong, fail_prepares

    def prepare(self, program, weights=None):
        self.prepares += 1
        if self.prepares <= self.fail_prepares:
            raise BackendError(f"ANE compile failed: Error Domain=com.apple.appleneuralengine.compiler Code=3 "
                               f"(fake #{self.prepares})")
        return super().prepare(program, weights)

    def run(self, program, weights, inputs):
        self.runs += 1
        out = super().run(program, weights, inputs)
        return {"y": self.wrong(self.runs, out["y"])} if self.wrong else out


# ---- padding --------------------------------------------------------------------------------------
def test_ane_sim_refuses_unpadded_programs_with_a_clear_error():
    sim = get_runner("ane-sim")
    program, weights = K.matmul_dynamic(172, 344, 64)  # stories260K's hidden 172: not a multiple of 32
    with pytest.raises(BackendError, match=r"op matmul 'dx_mm' \(MIL line \d+\): inner dimension 172 is not a "
                                           r"multiple of 32.*pad it"):
        sim.run(format_program(program), weights, {"x": np.zeros((1, 172, 1, 64 + 344), np.float32)})
    program, weights = K.matmul_dynamic(32, 32, 64)  # the tiny preset: 32 x 64 x 4 bytes = 8,192
    with pytest.raises(BackendError, match="input 'x' tensor<fp32, \\[1, 32, 1, 96\\]> is 12288 bytes.*49152"):
        sim.run(program, weights, {"x": np.zeros((1, 32, 1, 96), np.float32)})
    assert AneSim().run(program, weights, {"x": np.zeros((1, 32, 1, 96), np.float32)})["y"].shape == (1, 32, 1, 64)


@pytest.mark.parametrize("chip", CHIPS)
def test_stories260k_dims_are_padded_and_give_right_results(chip):
    be = AneBackend("ane-sim", chip=chip)
    x, w, dy = rand(64, 64, seed=1), rand(344, 172, seed=2, scale=0.1), rand(64, 344, seed=3)
    h = rand(64, 172, seed=4)
    y = be.gemm(h, w, trans_b=True)  # w13 forward: (64 tokens, 172) x (172, 344)
    dx = be.gemm(dy, w)  # its dx: (64, 344) x (344, 172)
    y2 = be.gemm(x, rand(172, 64, seed=5), trans_b=True)  # w1 forward: (64, 64) x (64, 172)
    fp16_close(y, h.astype(np.float64) @ w.T.astype(np.float64), 172)
    fp16_close(dx, dy.astype(np.float64) @ w.astype(np.float64), 344)
    fp16_close(y2, x.astype(np.float64) @ rand(172, 64, seed=5).T.astype(np.float64), 64)
    itemsize = 2 if be.dialect == "m1" else 4
    for (m, k, n), g in be._kernels.items():
        (inp,), (out,) = g.program.inputs, g.program.output_vars
        assert g.k2 % INNER_MULTIPLE == 0 and g.k2 - k < INNER_MULTIPLE and g.m2 >= m
        assert inp.type.shape == (1, g.k2, 1, g.m2 + n)
        assert min(np.prod(inp.type.shape), np.prod(out.type.shape)) * itemsize >= MIN_IO_BYTES
    assert {key: g.k2 for key, g in be._kernels.items()} == {(64, 172, 344): 192, (64, 344, 172): 352,
                                                             (64, 64, 172): 64}
    assert not be.disabled


# ---- run-time checks --------------------------------------------------------------------------------
def test_wrong_values_disable_the_shape_warn_once_and_return_the_cpu_result():
    runner = CountingSim(wrong=lambda calls, y: y * 0)  # silent zeros, no exception
    be = AneBackend("ane-sim", runner=runner)
    a, b, c = rand(64, 96, seed=1), rand(128, 96, seed=2), rand(64, 128, seed=3)
    with trace() as t, pytest.warns(RuntimeWarning, match=r"computed GEMM \(64, 96, 128\) wrong") as record:
        y1 = be.gemm(a, b, trans_b=True)
        y2 = be.gemm(a, b, trans_b=True)
        dx = be.gemm(c, b)  # another shape, also wrong: logged, not warned again
    np.testing.assert_array_equal(y1, np.matmul(a, b.T))  # exactly the CPU's result
    np.testing.assert_array_equal(y2, np.matmul(a, b.T))
    np.testing.assert_array_equal(dx, np.matmul(c, b))
    assert sum("computed GEMM" in str(w.message) for w in record) == 1
    assert set(be.disabled) == {(64, 96, 128), (64, 128, 96)} and runner.runs == 2  # the second call: CPU only
    assert t.counters["ane-mismatch:ane-sim"] == 2 and t.counters["ane-check:ane-sim"] == 2
    events = [e for e in t.chrome_events() if e.get("name") == "ane-mismatch"]
    assert [tuple(e["args"]["shape"]) for e in events[-2:]] == [(64, 96, 128), (64, 128, 96)]


def test_sampled_checks_catch_a_runner_that_goes_wrong_later():
    runner = CountingSim(wrong=lambda calls, y: y if calls <= 5 else y * 1.5)
    be = AneBackend("ane-sim", runner=runner, check_every=4)
    a, b = rand(64, 96, seed=1), rand(128, 96, seed=2)
    ref = np.matmul(a, b.T)
    with pytest.warns(RuntimeWarning, match="wrong"):
        outs = [be.gemm(a, b, trans_b=True) for _ in range(12)]
    # checked calls: 1, 5, 9. Calls 6-8 returned unchecked wrong values; call 9 caught it
    assert all(np.abs(o - ref).max() < 0.02 * np.abs(ref).max() for o in outs[:5] + outs[8:])
    assert all(np.abs(o - ref).max() > 0.3 * np.abs(ref).max() for o in outs[5:8])
    assert runner.runs == 9 and (64, 96, 128) in be.disabled


def test_values_beyond_fp16_are_left_to_the_loss_scaler_not_called_a_mismatch():
    be = AneBackend("ane-sim")
    a, b = rand(64, 96, seed=1, scale=1e5), rand(128, 96, seed=2)
    with np.errstate(over="ignore", invalid="ignore"):
        y = be.gemm(a, b, trans_b=True)
    assert not np.isfinite(y).all() and not be.disabled  # inf, as on the ANE: the trainer skips the step
    assert be._kernels[(64, 96, 128)].next_check == 1  # the next call is checked instead
    be.gemm(a / 1e5, b, trans_b=True)
    assert be._kernels[(64, 96, 128)].next_check > 1 and not be.disabled


def test_compile_failure_is_retried_once():
    runner = CountingSim(fail_prepares=1)
    be = AneBackend("ane-sim", runner=runner)
    a, b = rand(64, 96, seed=1), rand(128, 96, seed=2)
    fp16_close(be.gemm(a, b, trans_b=True), a.astype(np.float64) @ b.T, 96)
    assert runner.prepares == 2 and runner.runs == 1 and not be.disabled


def test_compile_failing_twice_falls_back_with_the_compilers_message():
    runner = CountingSim(fail_prepares=99)
    be = AneBackend("ane-sim", runner=runner)
    a, b = rand(64, 96, seed=1), rand(128, 96, seed=2)
    with pytest.warns(RuntimeWarning, match=r"GEMM \(64, 96, 128\) on ane-sim failed.*tried twice.*"
                                            r"Error Domain=com.apple.appleneuralengine.compiler Code=3"):
        outs = [be.gemm(a, b, trans_b=True) for _ in range(3)]
    assert all(np.array_equal(o, np.matmul(a, b.T)) for o in outs)
    assert runner.prepares == 2 and runner.runs == 0 and "compile/load failed twice" in be.disabled[(64, 96, 128)]
    assert be.chain.offloads[0].failures == 1  # one failure counted; later calls skip the shape


def test_a_runtime_compile_failure_is_retried_through_the_compile_budget():
    class FailOnce:
        def __init__(self):
            self.compiles = 0

        def compile(self, text, weights):
            self.compiles += 1
            if self.compiles == 1:
                raise BackendError("ANE load failed: Error Domain=com.apple.appleneuralengine Code=5 (fake)")
            return parse(text), dict(weights)

        def evaluate(self, handle, arrays, output_types):
            program, weights = handle
            return [AneSim(hw_rules=True).run(program, weights, {"x": arrays[0]})["y"]]

        def unload(self, handle):
            pass

    runtime = AneRuntime(FailOnce(), CompileBudget(5))
    be = AneBackend("ane", runner=runtime, chip="Apple M2 Pro")
    a, b = rand(64, 96, seed=1), rand(128, 96, seed=2)
    fp16_close(be.gemm(a, b, trans_b=True), a.astype(np.float64) @ b.T, 96)
    assert runtime.compiler.compiles == 2 and runtime.budget.used == 2 and runtime.cached == 1


# ---- dialects ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("chip, dialect", [("Apple M1", "m1"), ("Apple M1 Pro", "m1"), ("Apple M2 Max", "m1"),
                                           ("Apple M3", "m3"), ("Apple M4 Pro", "m3"), ("x86_64", "m3"), ("", "m3")])
def test_dialect_from_the_chip_name(chip, dialect):
    assert dialect_for(chip) == dialect
    assert AneBackend("ane-sim", chip=chip).dialect == dialect


def dialect_cases():
    rng = np.random.default_rng(0)
    d, h, kv, s = 256, 512, 128, 96  # every I/O >= 49,152 bytes in fp16 too, head size 32
    w = {n: (rng.standard_normal(shape) * 0.1).astype(np.float32)
         for n, shape in dict(w1=(h, d), w2=(d, h), w3=(h, d), wq=(d, d), wk=(kv, d), wv=(kv, d), wo=(d, d)).items()}
    return {
        "ffn_w13_backward_dx": lambda dl: K.ffn_w13_backward_dx(w["w1"], w["w3"], s, dl),
        "qkv_backward_dx": lambda dl: K.qkv_backward_dx(w["wq"], w["wk"], w["wv"], s, dl),
        "ffn_forward": lambda dl: K.ffn_forward(w["w1"], w["w2"], w["w3"], s, dl),
        "attention_forward": lambda dl: K.attention_forward(w["wq"], w["wk"], w["wv"], w["wo"], np.ones(d), 8, 4,
                                                            s, dialect=dl),
        "matmul_dynamic": lambda dl: K.matmul_dynamic(d, h, s, dl),
        "sdpa_backward": lambda dl: K.sdpa_backward(d, 8, 4, s, dl),
    }


@pytest.mark.parametrize("name", list(dialect_cases()))
def test_m1_variant_has_fp16_io_no_cast_verbose_spelling_one_file_per_weight_and_same_results(name):
    make = dialect_cases()[name]
    (p3, w3), (p1, w1) = make("m3"), make("m1")
    text = format_program(p1)
    assert "cast(" not in text and 'string("' not in text and 'tensor<string, []>("' in text
    assert [v.type.dtype for v in p1.inputs + p1.output_vars] == ["fp16", "fp16"]
    blobs = [op.val for op in p1.ops if op.op == "const" and hasattr(op.val, "path")]
    assert sorted(b.path for b in blobs) == sorted(w1) and {b.offset for b in blobs} <= {64}  # one file per weight
    assert parse(text) == p1 and format_program(parse(text)) == text
    x = np.random.default_rng(1).standard_normal(p3.inputs[0].type.shape).astype(np.float32)
    if name == "matmul_dynamic":
        x[0, :, 0, 96:] *= 0.1
    sim = get_runner("ane-sim")
    y3, y1 = sim.run(p3, w3, {"x": x})["y"], sim.run(p1, w1, {"x": x})["y"]
    assert y1.dtype == np.float16 and y3.dtype == np.float32
    assert np.abs(y1 - y3).max() <= 2 ** -10 * np.abs(y3).max()  # the same fp16 program, one rounding apart
