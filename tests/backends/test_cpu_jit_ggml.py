"""The numba ggml kernel equals the gguf package's own `gguf.quants.dequantize` bit for bit for every type it keeps
(random blocks: every bit pattern of codes, scales and mins; real quantizers' output), rows permuted through a row
map, fused parts of different types; the buffer contract of `dequantize_ggml(q, out)` on each backend; the
FormatErrors of blocks that cannot be kept."""
import pickle

import gguf
import numpy as np
import pytest

from fusegrad.backends import cpu_jit_ggml
from fusegrad.backends.base import Backend
from fusegrad.backends.cpu_jit import JitBackend
from fusegrad.backends.numpy_backend import NumpyBackend
from fusegrad.core.errors import FormatError, ShapeError
from fusegrad.models.hf_names import permute_from_hf
from fusegrad.quant.ggml import FLOATS, TYPES, FusedGGML, GGMLTensor
from fusegrad.quant.kquants import quantize_k

QUANTIZED = [t for t in TYPES if t not in FLOATS]


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)  # -0.0 and 0.0 differ here


def oracle(raw, qtype) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(qtype)), np.float32)


def random_blocks(rng, qtype, rows, cols) -> np.ndarray:
    """(rows, bytes) of random blocks: every code and 6-bit scale pattern, finite fp16 scales of any size
    (subnormal, zero, negative zero, the largest)."""
    _, block, size, scales = TYPES[qtype]
    if qtype in FLOATS:
        values = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
        values.reshape(-1)[:3] = [0.0, -0.0, 1e-40]
        if qtype == 0:
            return values.view(np.uint8)
        return (values.astype(np.float16).view(np.uint8) if qtype == 1 else
                (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    raw = rng.integers(0, 256, (rows * (cols // block), size), dtype=np.uint8)
    special = np.float16([0.0, -0.0, 6e-8, 65504.0, -1.5e-5])
    for o in scales:
        d = (rng.standard_normal(raw.shape[0]) * 0.05).astype(np.float16)
        d[:special.size] = special[:d.size]
        raw[:, o:o + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def kernel(t, src=None) -> np.ndarray:
    rows = t.shape[0] if src is None else len(src)
    out = np.full((rows, t.shape[1]), np.nan, np.float32)  # every element must be written
    cpu_jit_ggml.dequantize_part(t, np.arange(rows) if src is None else np.asarray(src, np.int64), out)
    return out


def test_the_type_table_is_ggmls():
    for qtype, (name, block, size, _) in TYPES.items():
        assert gguf.GGMLQuantizationType(qtype).name == name
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)] == (block, size)
    names = {n: getattr(cpu_jit_ggml, n) for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                                   "Q4_K", "Q5_K", "Q6_K")}
    assert {n: int(gguf.GGMLQuantizationType[n]) for n in names} == names


@pytest.mark.parametrize("qtype", list(TYPES), ids=[t[0] for t in TYPES.values()])
def test_random_blocks_equal_gguf_bit_for_bit(rng, qtype):
    rows, cols = 7, 3 * TYPES[qtype][1] * (1 if TYPES[qtype][1] > 1 else 96)
    raw = random_blocks(rng, qtype, rows, cols)
    t = GGMLTensor(raw, qtype, (rows, cols))
    np.testing.assert_array_equal(bits(kernel(t)), bits(oracle(raw, qtype).reshape(rows, cols)))


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_quantized_weights_equal_gguf_bit_for_bit(rng, name):
    """What quantizers write (gguf's own for the 32-value types, fusegrad's llama-quantize-exact K-quants)."""
    qtype = gguf.GGMLQuantizationType[name]
    w = (rng.standard_normal((5, 512)) * 0.02).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    raw = quantize_k(w, name) if name.endswith("_K") else gguf.quants.quantize(w, qtype)
    t = GGMLTensor(raw, int(qtype), w.shape)
    np.testing.assert_array_equal(bits(kernel(t)), bits(oracle(raw, qtype)))
    assert np.abs(kernel(t) - w).max() < 0.01


def test_rows_through_a_row_map(rng):
    raw = random_blocks(rng, 12, 8, 256)
    t = GGMLTensor(raw, 12, (8, 256))
    src = permute_from_hf(np.arange(8).reshape(8, 1), 2).reshape(8)
    np.testing.assert_array_equal(bits(kernel(t, src)), bits(oracle(raw, 12)[src]))


@pytest.fixture(scope="module")
def fused():
    """q (Q4_K, rows permuted as a qwen2 file's are), k (F16, permuted), v (Q6_K): one fused q/k/v."""
    rng = np.random.default_rng(3)
    parts = []
    for qtype, rows, heads in ((12, 64, 4), (1, 32, 2), (14, 32, None)):
        t = GGMLTensor(random_blocks(rng, qtype, rows, 256), qtype, (rows, 256))
        parts.append((t, None if heads is None else lambda a, h=heads: permute_from_hf(a, h)))
    return FusedGGML(parts)


def test_fused_parts_of_different_types(fused):
    out = np.full(fused.shape, np.nan, np.float32)
    assert cpu_jit_ggml.dequantize_ggml(fused, out) is out
    want = np.concatenate([oracle(t.raw, t.qtype).reshape(t.shape) if f is None else
                           f(oracle(t.raw, t.qtype).reshape(t.shape)) for t, f in fused.parts])
    np.testing.assert_array_equal(bits(out), bits(want))
    np.testing.assert_array_equal(bits(fused.dequantize()), bits(want))
    assert fused.formats() == {"Q4_K": 64 * 144, "F16": 32 * 256 * 2, "Q6_K": 32 * 210}


@pytest.mark.parametrize("backend", [JitBackend(), NumpyBackend()], ids=["jit", "reference"])
def test_dequantize_ggml_writes_into_out_or_returns_a_new_array(fused, backend):
    expect = fused.dequantize()
    np.testing.assert_array_equal(bits(fused.dequantize_on(backend)), bits(expect))
    out = np.full(fused.shape, np.nan, np.float32)
    assert backend.dequantize_ggml(fused, out) is out
    np.testing.assert_array_equal(bits(out), bits(expect))
    strided = np.full(fused.shape[::-1], np.nan, np.float32).T  # not C-contiguous: the reference writes it
    assert backend.dequantize_ggml(fused, strided) is strided
    np.testing.assert_array_equal(bits(strided), bits(expect))


def test_torch_dequantize_ggml_into_out(fused):
    torch = pytest.importorskip("torch")
    pytest.importorskip("array_api_compat")
    from fusegrad.backends import get_backend

    be = get_backend("torch:cpu")
    out = torch.full(fused.shape, float("nan"))
    assert be.dequantize_ggml(fused, out) is out
    np.testing.assert_array_equal(bits(out.numpy()), bits(fused.dequantize()))
    np.testing.assert_array_equal(bits(Backend.dequantize_ggml(be, fused).numpy()), bits(fused.dequantize()))


def test_a_pickled_weight_dequantizes_the_same(rng):
    t = GGMLTensor(random_blocks(rng, 3, 4, 64), 3, (4, 64))
    np.testing.assert_array_equal(bits(kernel(pickle.loads(pickle.dumps(t)))), bits(kernel(t)))


def test_kernel_rejects_a_bad_buffer(fused):
    for bad in (np.empty((3, 3), np.float32), np.empty(fused.shape, np.float64)):
        with pytest.raises(ShapeError, match="dequantize_ggml: out must be C-contiguous float32"):
            cpu_jit_ggml.dequantize_ggml(fused, bad)


def test_blocks_that_cannot_be_kept_name_the_tensor(rng):
    raw = random_blocks(rng, 2, 2, 64)
    with pytest.raises(FormatError, match=r"f.gguf: tensor 'x': Q4_0 data uint8 \(2, 35\) is not the whole blocks"):
        GGMLTensor(raw[:, :-1], 2, (2, 64), "f.gguf: tensor 'x'")  # a truncated block
    with pytest.raises(FormatError, match=r"tensor 'x': ggml type 10 cannot be kept"):
        GGMLTensor(raw, 10, (2, 64), "f.gguf: tensor 'x'")  # Q2_K: no kernel
    raw[1, 18:20] = np.float16([np.inf]).view(np.uint8)  # the second block's scale
    with pytest.raises(FormatError, match=r"tensor 'x': Q4_0 data holds NaN or inf"):
        GGMLTensor(raw, 2, (2, 64), "f.gguf: tensor 'x'")
    nan = np.full((2, 4), np.nan, np.float16).view(np.uint8)
    with pytest.raises(FormatError, match=r"F16 data holds NaN or inf"):
        GGMLTensor(nan, 1, (2, 4))
