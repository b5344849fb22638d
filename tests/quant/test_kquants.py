"""fusegrad's K-quant blocks are the bytes llama.cpp's own reference quantizers write (ggml's
quantize_row_q2_K_ref / q3_K / q4_K / q5_K / q6_K, called through ctypes), and so are the 32-value blocks they fall
back to (quantize_row_q4_0_ref / q5_0 / q5_1 / q8_0), on random rows of many scales, degenerate rows and the real
SmolLM2-135M's weights; the gguf package dequantizes them as ggml does."""
import numpy as np
import pytest

import fusegrad as fg
from fusegrad.models import Llama
from fusegrad.quant.kquants import dequantize_k, quantize_k
from tests.llamacpp_lib import ggml_dequantize, ggml_quantize
from tests.real_checkpoint import smollm2_dir

KINDS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
FALLBACKS = ("Q4_0", "Q5_0", "Q5_1", "Q8_0")


def rows(case: str) -> np.ndarray:
    rng = np.random.default_rng(len(case))
    normal = rng.standard_normal((16, 512))
    made = {
        "normal": normal,
        "many-scales": normal * np.exp(rng.uniform(-25, 25, (16, 1))),  # each row its own magnitude
        "tiny": normal * 1e-30,  # fp16 d and dmin underflow to 0
        "huge": normal * 1e15,  # fp16 d overflows to inf
        "beyond-x2": normal * 1e19,  # x * x overflows float32: ggml's sums go inf and NaN
        "near-max": np.clip(normal * 1e38, -3.4e38, 3.4e38),
        "negative-only": -np.abs(normal),
        "positive-only": np.abs(normal) + 1,
        "zeros": np.zeros((2, 512)),
        "constant": np.full((2, 512), 0.37),
        "half-zero": np.where(np.arange(512) % 256 < 128, 0.0, normal),
        "sparse": normal * (rng.random((16, 512)) < 0.05),
        "heavy-tailed": rng.standard_t(1.5, (16, 512)),
        "ties": np.round(normal * 4) / 4,  # values on the grid: halves to round
    }
    return made[case].astype(np.float32)


CASES = ("normal", "many-scales", "tiny", "huge", "beyond-x2", "near-max", "negative-only", "positive-only", "zeros",
         "constant", "half-zero", "sparse", "heavy-tailed", "ties")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", CASES)
def test_blocks_are_the_bytes_ggml_writes(kind, case):
    x = rows(case)
    with np.errstate(all="ignore"):
        ours, theirs = quantize_k(x, kind), ggml_quantize(x, kind.lower().replace("_k", "_K"))
    assert ours.shape == (x.shape[0], 2 * BYTES[kind])
    np.testing.assert_array_equal(ours.reshape(-1), theirs)


@pytest.mark.parametrize("kind", FALLBACKS)
@pytest.mark.parametrize("case", CASES)
def test_32_value_blocks_are_the_bytes_ggml_writes(kind, case):
    x = rows(case)
    with np.errstate(all="ignore"):
        ours, theirs = quantize_k(x, kind), ggml_quantize(x, kind.lower())
    assert ours.shape == (x.shape[0], 16 * {"Q4_0": 18, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[kind])
    np.testing.assert_array_equal(ours.reshape(-1), theirs)


@pytest.fixture(scope="module")
def smollm2():
    return Llama.from_pretrained(smollm2_dir())


@pytest.mark.parametrize("kind", KINDS)
def test_real_weights_are_the_bytes_ggml_writes(smollm2, kind):
    """SmolLM2-135M: ffn_down (rows of 1536) as it is, and every other kind of weight (rows of 576) cut to runs of
    256 values as ggml's row quantizer takes any multiple of 256."""
    p = smollm2.params
    for name in ("layers.0.w2", "layers.29.w2", "layers.7.wqkv", "layers.13.wo", "layers.21.w13", "tok_embeddings"):
        x = p[name].numpy().reshape(-1)[:256 * 2048]
        np.testing.assert_array_equal(quantize_k(x, kind), ggml_quantize(x, kind.lower().replace("_k", "_K")),
                                      err_msg=name)


@pytest.mark.parametrize("kind", FALLBACKS)
def test_real_weights_are_the_32_value_bytes_ggml_writes(smollm2, kind):
    """SmolLM2-135M's rows of 576, which the K-quant file types write as these."""
    for name in ("layers.0.wqkv", "layers.13.wo", "layers.21.w13", "tok_embeddings"):
        x = smollm2.params[name].numpy()[:2048]
        np.testing.assert_array_equal(quantize_k(x, kind).reshape(-1), ggml_quantize(x, kind.lower()), err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_dequantizes_the_blocks_as_ggml_does(kind):
    x = np.concatenate([rows("normal"), rows("negative-only"), rows("sparse"), rows("heavy-tailed")])
    q = quantize_k(x, kind)
    ours = dequantize_k(q, kind)
    np.testing.assert_array_equal(ours.reshape(-1), ggml_dequantize(q, kind.lower().replace("_k", "_K")))
    err = np.abs(ours - x).max(axis=1) / np.abs(x).max(axis=1)  # relative to each row's largest value
    assert err.max() < {"Q2_K": 0.5, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[kind]


def test_rows_of_no_whole_super_block_are_refused():
    with pytest.raises(fg.ShapeError, match=r"Q4_K: rows must be a whole number of 256-value super-blocks, got "
                                            r"shape \(4, 576\)"):
        quantize_k(np.zeros((4, 576), np.float32), "Q4_K")
    with pytest.raises(fg.ShapeError, match=r"Q8_0: rows must be a whole number of 32-value blocks, got shape "
                                            r"\(4, 200\)"):
        quantize_k(np.zeros((4, 200), np.float32), "Q8_0")
