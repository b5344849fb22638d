"""The NumPy backend: GEMM with transpose flags against explicit float64 products, without copies."""
import itertools
import tracemalloc

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.backends import available_backends, backend_for_array, get_backend


@pytest.fixture
def cpu():
    return get_backend("numpy")


@pytest.mark.parametrize("trans_a, trans_b", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("batch_a, batch_b", [((), ()), ((3,), (3,)), ((2, 1), (4,)), ((), (2,))])
def test_gemm_flags_match_explicit_transposes(cpu, rng, trans_a, trans_b, batch_a, batch_b):
    m, k, n = 3, 5, 4
    a = rng.standard_normal(batch_a + ((k, m) if trans_a else (m, k)))
    b = rng.standard_normal(batch_b + ((n, k) if trans_b else (k, n)))
    ref = np.matmul(np.swapaxes(a, -1, -2).copy() if trans_a else a, np.swapaxes(b, -1, -2).copy() if trans_b else b)
    out = cpu.gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    assert out.shape == np.broadcast_shapes(batch_a, batch_b) + (m, n)
    np.testing.assert_allclose(out, ref, rtol=1e-12)


@pytest.mark.parametrize("trans_a, trans_b", list(itertools.product([False, True], repeat=2)))
def test_gemm_allocates_only_its_output(cpu, trans_a, trans_b):
    a = np.ones((768, 512), np.float32)
    b = np.ones((512, 768), np.float32)
    a, b = (a.T.copy() if trans_a else a), (b.T.copy() if trans_b else b)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = cpu.gemm(a, b, trans_a, trans_b)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert out.shape == (768, 768) and peak <= out.nbytes + 64 * 1024


def test_gemm_rejects_mismatched_operands(cpu):
    with pytest.raises(fg.ShapeError, match="gemm: inner dimensions differ"):
        cpu.gemm(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(fg.ShapeError, match="at least 2-D"):
        cpu.gemm(np.ones(3), np.ones((3, 2)))


def test_array_helpers(cpu):
    x = cpu.full((2, 3), 1.5, np.float32)
    assert x.dtype == np.float32 and x.shape == (2, 3) and (x == 1.5).all()
    assert (cpu.zeros((2,), np.float64) == 0).all()
    assert cpu.to_numpy(x) is x and cpu.asarray([1, 2], np.float32).dtype == np.float32
    assert cpu.owns(x) and not cpu.owns([1.0])


def test_registry(cpu):
    assert "numpy" in available_backends() and get_backend() is cpu
    assert backend_for_array(np.zeros(1)) is cpu and fg.tensor([1.0]).backend is cpu
    with pytest.raises(fg.BackendError, match="unknown backend 'nope'"):
        get_backend("nope")
    with pytest.raises(fg.BackendError, match="no backend owns an array of type list"):
        backend_for_array([1.0])


def test_use_backend_is_scoped_and_restored_on_error(cpu):
    sim = get_backend("ane-sim")
    with pytest.raises(RuntimeError, match="inside"):
        with fg.use_backend("ane-sim") as be:
            assert be is sim and get_backend() is sim and fg.tensor([1.0]).backend is sim
            with fg.use_backend(cpu):
                assert fg.tensor([1.0]).backend is cpu
            assert get_backend() is sim
            raise RuntimeError("inside")
    assert get_backend() is cpu and fg.tensor([1.0]).backend is cpu


def test_gemm_offload_is_scoped_and_restored_on_error(cpu, rng):
    a, b = rng.standard_normal((32, 64)).astype(np.float32), rng.standard_normal((64, 48)).astype(np.float32)
    exact = np.matmul(a, b)
    with pytest.raises(RuntimeError, match="inside"):
        with fg.gemm_offload("ane-sim", min_flops=0) as entry:
            sim = (fg.tensor(a) @ fg.tensor(b)).numpy()  # fp16 operands on the simulator
            assert entry.calls == 1 and not np.array_equal(sim, exact)
            raise RuntimeError("inside")
    assert cpu.chain.offloads == []
    np.testing.assert_array_equal((fg.tensor(a) @ fg.tensor(b)).numpy(), exact)  # float32 on numpy, exactly
