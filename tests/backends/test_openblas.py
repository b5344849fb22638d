"""numpy's OpenBLAS as fusegrad reaches it: the kernel family it runs follows OPENBLAS_CORETYPE."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fusegrad.backends import openblas

pytestmark = pytest.mark.skipif(openblas.LIB is None, reason="numpy is not on its bundled OpenBLAS")


def corename_in_child(coretype: str) -> dict:
    # OpenBLAS picks its kernels once, when numpy loads it: a child process per setting
    code = "import json; from fusegrad.backends import openblas; print(json.dumps(openblas.blas_info()))"
    env = dict(os.environ, OPENBLAS_CORETYPE=coretype)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def cpu_has(*flags) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(flag in have for flag in flags)


@pytest.mark.parametrize("coretype, needs", [("Haswell", ("avx2", "fma")),
                                             ("SkylakeX", ("avx512f", "avx512dq", "avx512bw", "avx512vl"))])
def test_blas_info_names_the_kernels_openblas_runs(coretype, needs):
    if not cpu_has(*needs):
        pytest.skip(f"this CPU cannot run OpenBLAS's {coretype} kernels")
    info = corename_in_child(coretype)
    assert info == {"blas_core": coretype, "openblas_coretype_env": coretype}


def test_cblas_sgemm_adds_into_c(rng):
    a, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((4, 3)).astype(np.float32)
    c = np.ones((5, 4), np.float32)
    # C = 2 A B^T + 1 C, row-major
    openblas.CBLAS_SGEMM(openblas.ROW_MAJOR, openblas.NO_TRANS, openblas.TRANS, 5, 4, 3, 2.0, a.ctypes.data, 3,
                         b.ctypes.data, 3, 1.0, c.ctypes.data, 4)
    np.testing.assert_allclose(c, 2 * a.astype(np.float64) @ b.T.astype(np.float64) + 1, rtol=1e-5, atol=1e-5)


def test_sgemm_accumulate_takes_views_with_a_unit_stride_and_refuses_the_rest(rng):
    a, b = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    y = np.zeros((6, 10), np.float32)
    run = openblas.sgemm_accumulate(y[:, 3:7], np.ascontiguousarray(a.T).T, b)  # a column slice, a transposed view
    assert run is not None
    run()
    np.testing.assert_allclose(y[:, 3:7], a.astype(np.float64) @ b, rtol=1e-5, atol=1e-6)
    assert not y[:, :3].any() and not y[:, 7:].any()
    assert openblas.sgemm_accumulate(y[:, 3:7], a.astype(np.float64), b) is None  # not float32
    assert openblas.sgemm_accumulate(np.zeros((4, 6), np.float32).T, a, b) is None  # c a transposed view
    assert openblas.sgemm_accumulate(y[:, 3:7], a[:, ::2], b[:2]) is None  # no unit stride
    assert openblas.sgemm_accumulate(y[:, 3:6], a, b) is None  # shapes do not chain


def test_threads_sets_the_count_inside_and_restores_it_after_an_error():
    if openblas.THREAD_COUNT is None:
        pytest.skip("OpenBLAS's thread count is out of reach")
    get = openblas.THREAD_COUNT[0]
    before = get()
    with pytest.raises(RuntimeError, match="inside"):
        with openblas.threads(1):
            assert get() == 1
            raise RuntimeError("inside")
    assert get() == before


AFTER_A_THREADED_GEMM = """
import sys, time
import numpy as np
from fusegrad.backends import openblas
a = np.ones((1024, 1024), np.float32)
assert ((a @ a) == 1024).all()
if sys.argv[1] == "stop":
    openblas.stop_idle_threads()
c0 = time.process_time()
time.sleep(0.3)
print(time.process_time() - c0)
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS runs one thread on one core: no pool to spin")
def test_stop_idle_threads_leaves_no_openblas_thread_spinning():
    def cpu_seconds_while_asleep(how):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="2")
        out = subprocess.run([sys.executable, "-c", AFTER_A_THREADED_GEMM, how], env=env, capture_output=True,
                             text=True, check=True).stdout
        return float(out)

    assert cpu_seconds_while_asleep("spin") > 0.03  # the pool's threads spin on after the GEMM (~0.1 s)...
    assert cpu_seconds_while_asleep("stop") < 0.02  # ...and not once stopped
    a = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
    openblas.stop_idle_threads()
    np.testing.assert_allclose(a @ a, a.astype(np.float64) @ a, rtol=1e-4, atol=1e-3)  # the pool starts again
