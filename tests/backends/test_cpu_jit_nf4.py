"""The numba NF4 kernel equals the reference dequantization (fusegrad.quant.nf4) bit for bit, and through it
bitsandbytes' own: every part of every fused projection (q/k rows permuted), odd sizes, every block size,
with and without double quantization; the buffer contract of `dequantize_nf4(q, code, out)` on each backend."""
import pickle

import numpy as np
import pytest

from fusegrad.backends import cpu_jit_nf4
from fusegrad.backends.base import Backend
from fusegrad.backends.cpu_jit import JitBackend
from fusegrad.backends.numpy_backend import NumpyBackend
from fusegrad.core.errors import ShapeError
from fusegrad.finetune.qlora import quantize_projections
from fusegrad.models import Llama
from fusegrad.models.llama import LlamaConfig
from fusegrad.quant.nf4 import NF4_CODE, NF4Tensor, quantize_nf4


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)  # -0.0 and 0.0 differ here


def kernel(q) -> np.ndarray:
    out = np.full(q.shape, np.nan, np.float32)  # every element must be written
    assert cpu_jit_nf4.dequantize_nf4(q, NF4_CODE, out) is out
    return out


SHAPES = [(1, 1), (7,), (3, 5), (2, 63), (33, 65), (5, 64 * 3 + 1), (257, 129), (2, 3, 64), (64, 4096 + 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_kernel_equals_the_reference_bit_for_bit(rng, shape, double_quant):
    w = (rng.standard_normal(shape) * rng.uniform(0.001, 3.0)).astype(np.float32)
    w.reshape(-1)[: min(w.size, 64)] = 0.0  # a whole-zero block (and the zero code)
    q = quantize_nf4(w, double_quant=double_quant)
    np.testing.assert_array_equal(bits(kernel(q)), bits(q.dequantize()))


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_every_blocksize(rng, blocksize):
    for shape in [(9, 100), (3, 4097)]:  # blocks across row ends, a short last block
        q = quantize_nf4(rng.standard_normal(shape).astype(np.float32), blocksize=blocksize)
        np.testing.assert_array_equal(bits(kernel(q)), bits(q.dequantize()))


def test_kernel_equals_bitsandbytes_dequantize(rng):
    torch = pytest.importorskip("torch")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = (rng.standard_normal((300, 192)) * 0.02).astype(np.float32)  # > 256 blocks: two nested groups
    packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    q = NF4Tensor.from_dict({  # bitsandbytes' own double-quantized state
        "packed": packed.numpy().reshape(-1), "absmax": state.absmax.numpy(),
        "nested_absmax": state.state2.absmax.numpy(), "nested_offset": state.offset.numpy().reshape(1),
        "shape": np.array(w.shape), "blocksize": np.array([64])})
    expect = bnbf.dequantize_4bit(packed, state, quant_type="nf4").numpy()
    np.testing.assert_array_equal(bits(kernel(q)), bits(expect))


@pytest.fixture(scope="module")
def quantized():
    """{fused name: FusedNF4} of a GQA model: q and k parts have permuted rows, v/o/gate/up/down do not."""
    model = Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=32,
                              max_seq_len=16), seed=1)
    return quantize_projections(model)[0]


def test_every_part_of_every_fused_projection(quantized):
    kinds = set()
    for name, q in quantized.items():
        kinds.add(tuple(f is not None for _, f in q.parts))
        np.testing.assert_array_equal(bits(kernel(q)), bits(q.dequantize()), err_msg=name)
    assert kinds == {(True, True, False), (False,), (False, False)}  # wqkv; wo, w2; w13


def test_row_map_is_the_permutation(quantized):
    q, unpermute = quantized["layers.0.wqkv"].parts[0]
    rows = np.arange(q.shape[0] * 3, dtype=np.float32).reshape(q.shape[0], 3)
    np.testing.assert_array_equal(rows[cpu_jit_nf4.row_map(unpermute, q.shape[0])], unpermute(rows))


def test_a_pickled_weight_dequantizes_the_same(quantized):
    q = quantized["layers.1.wqkv"]
    back = pickle.loads(pickle.dumps(q))
    assert "scale_code" not in vars(back.parts[0][0])  # class constants, not pickled state
    np.testing.assert_array_equal(bits(kernel(back)), bits(kernel(q)))


@pytest.mark.parametrize("backend", [JitBackend(), NumpyBackend()], ids=["jit", "reference"])
def test_dequantize_nf4_writes_into_out_or_returns_a_new_array(quantized, backend):
    q = quantized["layers.0.w13"]
    expect = q.dequantize()
    fresh = backend.dequantize_nf4(q, NF4_CODE)
    np.testing.assert_array_equal(bits(fresh), bits(expect))
    out = np.full(q.shape, np.nan, np.float32)
    assert backend.dequantize_nf4(q, NF4_CODE, out) is out
    np.testing.assert_array_equal(bits(out), bits(expect))
    strided = np.full((q.shape[1], q.shape[0]), np.nan, np.float32).T  # not C-contiguous: the reference writes it
    assert backend.dequantize_nf4(q, NF4_CODE, strided) is strided
    np.testing.assert_array_equal(bits(strided), bits(expect))


def test_a_buffer_off_8_byte_alignment(quantized):
    q = quantized["layers.0.wqkv"]
    out = np.full(q.size + 1, np.nan, np.float32)[1:].reshape(q.shape)  # rows 4 bytes off the words
    assert out.ctypes.data % 8 == 4
    np.testing.assert_array_equal(bits(cpu_jit_nf4.dequantize_nf4(q, NF4_CODE, out)), bits(q.dequantize()))


def test_kernel_rejects_a_bad_buffer(quantized):
    q = quantized["layers.0.wo"]
    for bad in (np.empty((3, 3), np.float32), np.empty(q.shape, np.float64), np.empty(q.shape[::-1], np.float32).T):
        with pytest.raises(ShapeError, match="dequantize_nf4: out must be C-contiguous float32"):
            cpu_jit_nf4.dequantize_nf4(q, NF4_CODE, bad)


def test_torch_dequantize_nf4_into_out(quantized):
    torch = pytest.importorskip("torch")
    pytest.importorskip("array_api_compat")
    from fusegrad.backends import get_backend

    be = get_backend("torch:cpu")
    for name in ("layers.0.wqkv", "layers.1.w2"):
        q = quantized[name]
        out = torch.full(q.shape, float("nan"))
        assert be.dequantize_nf4(q, NF4_CODE, out) is out
        np.testing.assert_array_equal(bits(out.numpy()), bits(q.dequantize()), err_msg=name)
        np.testing.assert_array_equal(bits(be.dequantize_nf4(q, NF4_CODE).numpy()), bits(q.dequantize()))
        np.testing.assert_array_equal(bits(Backend.dequantize_nf4(be, q, NF4_CODE, out).numpy()), bits(q.dequantize()))
