"""ANE runtime off the Mac: availability, and the real cache/budget code driven by a fake compiler."""
import sys

import numpy as np
import pytest

from fusegrad.backends.ane import AneRuntime, AneSim, CompileBudget, available, get_runner, kernels
from fusegrad.backends.ane.mil import parse
from fusegrad.backends.ane.objc import Objc
from fusegrad.backends.ane.runtime import COMPILE_LIMIT, PROCESS_BUDGET, program_key
from fusegrad.core.errors import BackendError, ShapeError

off_mac = pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")


class FakeCompiler:
    """Stands in for AppleNeuralEngine.framework: 'compiles' by parsing, evaluates with ane-sim."""

    def __init__(self, fail_on=None):
        self.compiled, self.unloaded, self.fail_on = [], [], fail_on

    def compile(self, text, weights):
        if self.fail_on and self.fail_on in text:
            raise BackendError("ANE compile failed: Error Domain=com.apple.appleneuralengine Code=1 (fake)")
        handle = (len(self.compiled), parse(text), dict(weights))
        self.compiled.append(handle)
        return handle

    def evaluate(self, handle, arrays, output_types):
        _, program, weights = handle
        out = AneSim().run(program, weights, {v.name: a for v, a in zip(program.inputs, arrays)})
        return [out[name] for name in program.outputs]

    def unload(self, handle):
        self.unloaded.append(handle[0])


def w13_kernel(seed, dim=16, hidden=32, seq=4):
    rng = np.random.default_rng(seed)
    w1, w3 = rng.standard_normal((2, hidden, dim)).astype(np.float32)
    return kernels.ffn_w13_backward_dx(w1, w3, seq)


def x_for(program):
    return {"x": np.random.default_rng(0).standard_normal(program.inputs[0].type.shape).astype(np.float32)}


@off_mac
def test_unavailable_off_macos_with_reason():
    ok, reason = available()
    assert ok is False and sys.platform in reason and "ane-sim" in reason
    with pytest.raises(BackendError, match="ane-sim"):
        get_runner("ane")
    with pytest.raises(BackendError, match="libobjc"):
        Objc()


def test_cache_compiles_each_program_once_and_matches_sim():
    compiler = FakeCompiler()
    rt = AneRuntime(compiler, CompileBudget(10))
    program, weights = w13_kernel(0)
    first = rt.run(program, weights, x_for(program))
    again = rt.run(program, weights, x_for(program))
    assert len(compiler.compiled) == 1 and rt.budget.used == 1 and rt.cached == 1
    np.testing.assert_array_equal(first["y"], again["y"])
    np.testing.assert_array_equal(first["y"], AneSim().run(program, weights, x_for(program))["y"])
    program2, weights2 = w13_kernel(1)  # same text, new weights: a different kernel
    assert program2 == program
    rt.run(program2, weights2, x_for(program2))
    assert len(compiler.compiled) == 2 and rt.budget.remaining == 8


def test_dynamic_kernel_compiles_once_for_many_weight_updates():
    compiler = FakeCompiler()
    rt = AneRuntime(compiler, CompileBudget(2))
    program, weights = kernels.ffn_w13_backward_dx_dynamic(dim=8, hidden=16, seq=4)
    rng = np.random.default_rng(3)
    for step in range(20):  # a training loop restaging new weights every step
        act, w = rng.standard_normal((32, 4)), rng.standard_normal((32, 8))
        y = rt.run(program, weights, {"x": kernels.pack_dynamic(act, w)})["y"][0, :, 0, :]
        assert np.abs(y - w.T @ act).max() < 5e-3 * np.abs(w.T @ act).max()
    assert len(compiler.compiled) == 1


def test_budget_refuses_compiles_past_the_limit_but_serves_the_cache():
    compiler = FakeCompiler()
    rt = AneRuntime(compiler, CompileBudget(3))
    kernels_ = [w13_kernel(seed) for seed in range(4)]
    for program, weights in kernels_[:3]:
        rt.run(program, weights, x_for(program))
    with pytest.raises(BackendError, match=r"budget exhausted: 3 of 3.*dynamic"):
        rt.run(*kernels_[3], x_for(kernels_[3][0]))
    assert len(compiler.compiled) == 3
    rt.run(*kernels_[0], x_for(kernels_[0][0]))  # cached kernels still run
    rt.close()
    assert sorted(compiler.unloaded) == [0, 1, 2] and rt.cached == 0


def test_failed_compile_is_charged_and_reported_with_the_framework_message():
    compiler = FakeCompiler(fail_on="sigmoid")
    rt = AneRuntime(compiler, CompileBudget(5))
    program, weights = kernels.ffn_forward_dynamic(dim=8, hidden=16, seq=4)
    with pytest.raises(BackendError, match="Error Domain=com.apple.appleneuralengine"):
        rt.run(program, weights, x_for(program))
    assert rt.budget.used == 1 and rt.cached == 0


def test_budget_limits_and_input_checks():
    for bad in (0, COMPILE_LIMIT + 1):
        with pytest.raises(ValueError, match="compile budget"):
            CompileBudget(bad)
    assert PROCESS_BUDGET.limit < COMPILE_LIMIT
    rt = AneRuntime(FakeCompiler(), CompileBudget(1))
    program, weights = w13_kernel(0)
    with pytest.raises(ShapeError, match="input 'x'"):
        rt.run(program, weights, {"x": np.zeros((1, 2, 1, 2), np.float32)})


def test_program_key_covers_text_and_weights():
    program, weights = w13_kernel(0)
    _, weights2 = w13_kernel(1)
    text = "program(1.3)"
    assert program_key(text, weights) == program_key(text, dict(weights))
    assert program_key(text, weights) != program_key(text, weights2)
    assert program_key(text, weights) != program_key(text + " ", weights)
