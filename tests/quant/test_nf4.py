"""NF4: code values, packing and round-trip bounds, checked against bitsandbytes (the oracle) where installed."""
import doctest

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.quant import nf4
from fusegrad.quant.nf4 import DYNAMIC_CODE, NF4_CODE, NF4Tensor, create_dynamic_map, quantize_nf4

torch = pytest.importorskip("torch")


def bnb_quantize(bnbf, w, double_quant):
    packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                       compress_statistics=double_quant)
    return packed, state


def weight(rng, shape, scale=0.02):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# QLoRA paper / bitsandbytes: NF4 code i is a quantile of N(0, 1), normalised to [-1, 1].
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


def test_code_values_are_the_published_ones(bnbf):
    assert NF4_CODE.dtype == np.float32
    assert NF4_CODE.tolist() == np.float32(PUBLISHED_NF4).tolist()
    assert NF4_CODE.tolist() == bnbf.get_4bit_type("nf4", device="cpu").tolist()


@pytest.mark.parametrize("args", [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 5, 6)])
def test_dynamic_map_matches_bitsandbytes_bit_for_bit(bnbf, args):
    ours, theirs = create_dynamic_map(*args), bnbf.create_dynamic_map(*args).numpy()
    assert ours.view(np.uint32).tolist() == theirs.view(np.uint32).tolist()


@pytest.mark.parametrize("shape", [(768, 2048), (96, 130), (7, 9), (3,), (2, 3, 64), (1, 1)])
def test_packing_is_bit_identical_to_bitsandbytes(bnbf, rng, shape):
    w = weight(rng, shape)
    w.reshape(-1)[0] = 0.0  # exact zeros and a whole-zero block must agree too
    if w.size >= 128:
        w.reshape(-1)[64:128] = 0.0
    packed, state = bnb_quantize(bnbf, w, double_quant=False)
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.tobytes() == packed.numpy().tobytes()
    assert q.absmax.tobytes() == state.absmax.numpy().tobytes()
    assert q.dequantize().tobytes() == bnbf.dequantize_4bit(packed, state, quant_type="nf4").numpy().tobytes()
    # double quantization changes only the scales, never the packed codes
    assert quantize_nf4(w).packed.tobytes() == packed.numpy().tobytes()


def test_first_element_is_the_high_nibble():
    w = np.zeros(64, np.float32)
    w[0], w[1] = -1.0, 1.0                     # codes 0 and 15
    q = quantize_nf4(w, double_quant=False)
    assert q.packed[0] == 0x0F and q.packed[1] == 0x77  # 0.0 is code 7


def test_dequantize_formula_is_bit_identical_given_bitsandbytes_double_quant_state(bnbf, rng):
    # load bitsandbytes' own nested state into an NF4Tensor: every float32 op must match
    w = weight(rng, (300, 192))
    packed, state = bnb_quantize(bnbf, w, double_quant=True)
    q = NF4Tensor.from_dict({
        "packed": packed.numpy().reshape(-1), "absmax": state.absmax.numpy(),
        "nested_absmax": state.state2.absmax.numpy(), "nested_offset": state.offset.numpy().reshape(1),
        "shape": np.array(w.shape), "blocksize": np.array([64])})
    expect = bnbf.dequantize_4bit(packed, state, quant_type="nf4").numpy()
    assert q.dequantize().tobytes() == expect.tobytes()


@pytest.mark.parametrize("shape", [(768, 2048), (300, 192), (64, 4096 + 64)])
def test_double_quant_state_matches_bitsandbytes(bnbf, rng, shape):
    w = weight(rng, shape)
    packed, state = bnb_quantize(bnbf, w, double_quant=True)
    q = quantize_nf4(w)
    ours_scales, bnb_scales = q.block_scales(), bnbf.dequantize_blockwise(state.absmax, state.state2).numpy() + state.offset.item()
    # offset: we accumulate the mean in float64, torch sums in float32 -> at most an ulp apart
    np.testing.assert_allclose(q.offset, state.offset.item(), rtol=1e-6)
    np.testing.assert_allclose(q.nested_absmax, state.state2.absmax.numpy(), rtol=1e-6)
    # 8-bit scale codes: ours are the exact nearest DYNAMIC_CODE value; bitsandbytes' CPU kernel
    # (binary search "Direct2") rounds some values just below a midpoint up. Where they differ it is by
    # one code step and only near the midpoint.
    diff = q.absmax.astype(int) - state.absmax.numpy().astype(int)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01
    true_scales = np.abs(w.reshape(-1, 64)).max(axis=1)
    err_ours, err_bnb = np.abs(ours_scales - true_scales), np.abs(bnb_scales - true_scales)
    assert (err_ours <= err_bnb + 1e-6 * true_scales).all()      # never worse than bitsandbytes
    np.testing.assert_allclose(q.dequantize(), bnbf.dequantize_4bit(packed, state, quant_type="nf4").numpy(),
                               atol=float(0.01 * np.abs(w).max()), rtol=0)


def test_double_quant_scale_error_is_within_half_a_dynamic_code_gap(rng):
    w = weight(rng, (256, 512))
    q = quantize_nf4(w)
    true_scales = np.abs(w.reshape(-1, 64)).max(axis=1)
    normed = (true_scales - q.offset).reshape(-1, 256) / q.nested_absmax[:, None]  # (n_nested, 256) in [-1, 1]
    right = np.clip(np.searchsorted(DYNAMIC_CODE, normed, side="left"), 1, 255)
    half_gap = (DYNAMIC_CODE[right] - DYNAMIC_CODE[right - 1]) / 2                   # around each value
    err = np.abs(q.block_scales() - true_scales).reshape(-1, 256) / q.nested_absmax[:, None]
    assert (err <= half_gap + 1e-6).all()


def test_roundtrip_error_per_block_is_at_most_half_the_largest_code_gap(rng):
    w = weight(rng, (128, 320))
    w[3] *= 100.0  # blocks of very different scale
    q = quantize_nf4(w, double_quant=False)
    half_gap = np.diff(NF4_CODE).max() / 2
    err = np.abs(q.dequantize() - w).reshape(-1, 64).max(axis=1)
    assert (err <= half_gap * q.absmax * (1 + 1e-6)).all()
    # the element holding the absmax is exact (code +-1)
    blocks = w.reshape(-1, 64)
    at = np.abs(blocks).argmax(axis=1)
    np.testing.assert_array_equal(q.dequantize().reshape(-1, 64)[np.arange(len(at)), at], blocks[np.arange(len(at)), at])


@given(n=st.integers(1, 700), scale=st.floats(1e-4, 1e3), double_quant=st.booleans(), seed=st.integers(0, 99))
def test_any_size_roundtrips_within_bounds(n, scale, double_quant, seed):
    w = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    q = quantize_nf4(w, double_quant=double_quant)
    out = q.dequantize()
    assert out.shape == w.shape and out.dtype == np.float32 and q.packed.shape == ((n + 1) // 2,)
    # codes are chosen with the true absmax s; dequantizing uses the stored s' (= s without double quant):
    # |x - code * s'| <= half_gap * s + |s - s'|
    true_s = np.repeat(np.abs(np.pad(w, (0, -n % 64))).reshape(-1, 64).max(axis=1), 64)[:n]
    used_s = np.repeat(q.block_scales(), 64)[:n]
    bound = true_s * np.diff(NF4_CODE).max() / 2 + np.abs(true_s - used_s)
    assert (np.abs(out - w) <= bound * (1 + 1e-6)).all()


def test_quantized_bytes_are_at_most_0_16_of_fp32(rng):
    w = weight(rng, (768, 2048))
    q, plain = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    packed_bytes = w.size // 2
    assert q.nbytes == packed_bytes + w.size // 64 + 4 * (w.size // 64 // 256) + 4
    assert plain.nbytes == packed_bytes + 4 * (w.size // 64)
    assert q.fp32_ratio() <= 0.16 and plain.fp32_ratio() <= 0.16
    assert q.fp32_ratio() < plain.fp32_ratio()
    print(f"NF4 768x2048: {q.fp32_ratio():.4f}x fp32 with double quant, {plain.fp32_ratio():.4f}x without")


def test_dequantize_into_reuses_the_buffer_and_checks_it(rng):
    w = weight(rng, (33, 65))
    q = quantize_nf4(w)
    out = np.full(w.shape, np.nan, np.float32)
    assert q.dequantize_into(out) is out
    np.testing.assert_array_equal(out, q.dequantize())
    for bad in (np.empty((65, 33), np.float32), np.empty(w.shape, np.float64), np.empty((65, 33), np.float32).T):
        with pytest.raises(ShapeError, match="dequantize_into"):
            q.dequantize_into(bad)


@pytest.mark.parametrize("double_quant", [True, False])
def test_dict_roundtrip_through_safetensors(tmp_path, rng, double_quant):
    from safetensors.numpy import load_file, save_file

    w = weight(rng, (40, 70))
    q = quantize_nf4(w, double_quant=double_quant)
    save_file({f"layer.{k}": v for k, v in q.to_dict().items()}, tmp_path / "q.safetensors")
    loaded = load_file(tmp_path / "q.safetensors")
    back = NF4Tensor.from_dict({k.removeprefix("layer."): v for k, v in loaded.items()}, where="q.safetensors")
    assert back.shape == w.shape and back.blocksize == 64 and back.double_quant == double_quant
    assert back.dequantize().tobytes() == q.dequantize().tobytes()


def test_from_dict_rejects_bad_entries(rng):
    d = quantize_nf4(weight(rng, (8, 64))).to_dict()
    with pytest.raises(FormatError, match="ckpt.safetensors.*missing.*packed"):
        NF4Tensor.from_dict({k: v for k, v in d.items() if k != "packed"}, where="ckpt.safetensors")
    with pytest.raises(FormatError, match="packed is uint8 \\(255,\\)"):
        NF4Tensor.from_dict({**d, "packed": d["packed"][:-1]})
    with pytest.raises(FormatError, match="absmax is float32"):
        NF4Tensor.from_dict({**d, "absmax": d["absmax"].astype(np.float32)})
    with pytest.raises(FormatError, match="nested_offset missing"):
        NF4Tensor.from_dict({k: v for k, v in d.items() if k != "nested_offset"})
    with pytest.raises(FormatError, match="blocksize 63"):
        NF4Tensor.from_dict({**d, "blocksize": np.array([63])})


def test_bad_input_raises_clear_errors():
    with pytest.raises(ShapeError, match="floating-point.*int64"):
        quantize_nf4(np.arange(64))
    with pytest.raises(ShapeError, match="empty"):
        quantize_nf4(np.zeros((0, 64), np.float32))
    w = np.zeros(64, np.float32)
    w[5] = np.nan
    with pytest.raises(ShapeError, match="non-finite value nan at flat index 5"):
        quantize_nf4(w)
    with pytest.raises(ConfigError, match="blocksize.*got 48"):
        quantize_nf4(np.ones(96, np.float32), blocksize=48)


def test_other_blocksizes_match_bitsandbytes(bnbf, rng):
    w = weight(rng, (16, 300))
    for bs in (32, 128, 256):
        packed, state = bnbf.quantize_4bit(torch.from_numpy(w), blocksize=bs, quant_type="nf4")
        q = quantize_nf4(w, blocksize=bs, double_quant=False)
        assert q.packed.tobytes() == packed.numpy().tobytes() and q.absmax.tobytes() == state.absmax.numpy().tobytes()


def test_docstring_examples():
    assert doctest.testmod(nf4).failed == 0
