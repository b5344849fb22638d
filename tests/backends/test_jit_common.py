"""jit_common's Kernel: the parallel kernel on numba's threads, its serial twin on a thread that has one (a
worker's slice), the same numbers from both."""
import numpy as np
import pytest

numba = pytest.importorskip("numba")

from fusegrad.backends import jit_common  # noqa: E402
from fusegrad.backends.cpu_jit import JitBackend  # noqa: E402
from fusegrad.parallel.workers import one_core  # noqa: E402


@jit_common.jit
def _row_sums(x, out):
    for i in numba.prange(x.shape[0]):
        s = np.float32(0.0)
        for j in range(x.shape[1]):
            s += x[i, j]
        out[i] = s


def _spied(monkeypatch, kernel):
    ran = []
    for twin, compiled in (("parallel", kernel.parallel), ("_serial", kernel.serial)):
        monkeypatch.setattr(kernel, twin, lambda *a, k=compiled, n=twin: ran.append(n) or k(*a))
    return ran


def test_one_thread_runs_the_serial_twin_with_the_same_numbers(monkeypatch):
    x = np.random.default_rng(0).standard_normal((300, 77)).astype(np.float32)
    ran = _spied(monkeypatch, _row_sums)
    on_all, on_one = np.empty(300, np.float32), np.empty(300, np.float32)
    _row_sums(x, on_all)
    with one_core():
        _row_sums(x, on_one)
    assert ran == ["parallel" if numba.get_num_threads() > 1 else "_serial", "_serial"]
    np.testing.assert_array_equal(on_one, on_all)
    np.testing.assert_allclose(on_one, x.sum(axis=1, dtype=np.float64), rtol=1e-5, atol=1e-5)


def test_the_serial_twin_is_compiled_once_under_its_own_name():
    assert _row_sums.serial is _row_sums.serial
    assert _row_sums.serial.py_func.__name__ == "_row_sums_serial"
    assert _row_sums.parallel.py_func.__name__ == "_row_sums"


def test_a_workers_attention_runs_serial_twins_and_matches(monkeypatch):
    from fusegrad.backends import cpu_jit_attention
    from fusegrad.backends.base import rope_tables
    ran = _spied(monkeypatch, cpu_jit_attention._causal_softmax)
    qkv = np.random.default_rng(1).standard_normal((2, 70, 3 * 4 * 8)).astype(np.float32)
    cos, sin = rope_tables(70, 8, 10000.0)
    y_all, _ = JitBackend().attention_forward(qkv, 4, 4, cos, sin)
    with one_core():
        y_one, _ = JitBackend().attention_forward(qkv, 4, 4, cos, sin)
    assert ran[-2:] == ["_serial", "_serial"]  # 70 rows: two 64-row query blocks, each one softmax call
    np.testing.assert_allclose(y_one, y_all, rtol=1e-6, atol=1e-6)


def test_the_optimizer_and_grad_sums_run_a_small_tensor_serially(monkeypatch):
    """The main process updates every parameter on all its threads; a norm's or an adapter's few weights are not
    worth a parallel launch. Both twins give the reference's numbers."""
    from fusegrad.backends import cpu_jit
    from fusegrad.backends.numpy_backend import NumpyBackend

    adamw, add = _spied(monkeypatch, cpu_jit._adamw), _spied(monkeypatch, cpu_jit._add_into)
    rng = np.random.default_rng(2)
    for n in (288, jit_common.SERIAL_MAX_WORK + 1):
        p, g, m, v = (rng.standard_normal(n).astype(np.float32) for _ in range(4))
        v = np.abs(v)
        want = [a.copy() for a in (p, m, v)]
        NumpyBackend().adamw_update(*want[:1], g, *want[1:], 1e-2, 0.9, 0.95, 1e-8, 0.1, 3)
        JitBackend().adamw_update(p, g, m, v, 1e-2, 0.9, 0.95, 1e-8, 0.1, 3)
        for got, ref in zip((p, m, v), want):
            np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-7)
        total = p + g
        JitBackend().accumulate(p, g)
        np.testing.assert_array_equal(p, total)
    big = "parallel" if numba.get_num_threads() > 1 else "_serial"
    assert adamw == ["_serial", big] and add == ["_serial", big]
