"""ane-sim: op semantics vs float64 NumPy, fp16 rounding after every op, errors that name the op."""
import numpy as np
import pytest

from fusegrad.backends.ane.builder import MilBuilder
from fusegrad.backends.ane.mil import format_program
from fusegrad.backends.ane.sim import AneSim
from fusegrad.core.errors import BackendError, FormatError, ShapeError

rng = np.random.default_rng(7)


def run(b, outputs, **inputs):
    program, weights = b.build(outputs)
    # run the printed text, so the parser is on the path the runtime takes
    return AneSim().run(format_program(program), weights, inputs)


def within_fp16(got, ref64, ulps=2.0):
    """|got - ref| <= ulps fp16 ulps of |ref| (plus the smallest normal, for values near zero)."""
    tol = ulps * np.maximum(np.abs(ref64), 6.1e-5) * 2.0 ** -10
    assert np.all(np.abs(got.astype(np.float64) - ref64) <= tol), np.abs(got - ref64).max()


def test_conv_with_groups_and_matmul_match_float64():
    x = rng.standard_normal((1, 8, 1, 5)).astype(np.float32)
    w = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    b = MilBuilder()
    x16 = b.cast(b.input("x", x.shape), "fp16")
    conv = b.cast(b.conv(x16, b.weight("W", w), groups=2), "fp32", name="y_conv")
    xr = b.reshape(x16, (1, 2, 4, 5))
    mm = b.cast(b.matmul(xr, xr, transpose_x=True), "fp32", name="mm")  # (1, 2, 5, 5)
    out = run(b, [conv, mm], x=x)
    x16n, w16 = x.astype(np.float16).astype(np.float64), w.astype(np.float16).astype(np.float64)
    ref = np.zeros((1, 6, 1, 5))
    for oc in range(6):
        g = oc // 3
        ref[0, oc, 0] = w16[oc, :, 0, 0] @ x16n[0, 4 * g:4 * g + 4, 0]
    within_fp16(out["y_conv"], ref)
    xr64 = x16n.reshape(1, 2, 4, 5)
    within_fp16(out["mm"], np.swapaxes(xr64, -1, -2) @ xr64)


def test_every_fp16_op_output_is_rounded():
    # fp32 would keep 1 + 2**-12; an fp16 add rounds it away, then the sub sees exactly 1.0
    b = MilBuilder()
    x16 = b.cast(b.input("x", (1, 1, 1, 1)), "fp16")
    y = b.cast(b.sub(b.add(x16, 2.0 ** -12), x16), "fp32", name="y")
    assert run(b, [y], x=np.ones((1, 1, 1, 1), np.float32))["y"].item() == 0.0


def test_elementwise_softmax_reduce_match_float64():
    x = rng.standard_normal((1, 4, 2, 6)).astype(np.float32)
    b = MilBuilder()
    x16 = b.cast(b.input("x", x.shape), "fp16")
    names = {}
    names["sig"] = b.sigmoid(x16)
    names["pow"] = b.pow(b.add(b.mul(x16, x16), 1.0), -0.5)
    names["soft"] = b.softmax(x16, axis=-1)
    names["red"] = b.reduce_sum(x16, axes=[1, 3])
    out = run(b, [b.cast(v, "fp32", name="y_" + k) for k, v in names.items()], x=x)
    out = {k[2:]: v for k, v in out.items()}
    xd = x.astype(np.float16).astype(np.float64)
    within_fp16(out["sig"], 1 / (1 + np.exp(-xd)))
    within_fp16(out["pow"], (np.float16(xd * xd).astype(np.float64) + 1) ** -0.5, ulps=3)
    e = np.exp(xd - xd.max(-1, keepdims=True))
    within_fp16(out["soft"], e / e.sum(-1, keepdims=True))
    within_fp16(out["red"], xd.sum(axis=(1, 3), keepdims=True), ulps=4)


def test_shape_ops_match_numpy():
    x = rng.standard_normal((1, 6, 1, 4)).astype(np.float32)
    b = MilBuilder()
    x16 = b.cast(b.input("x", x.shape), "fp16")
    a = b.slice_by_size(x16, [0, 2, 0, 1], [1, 3, 1, 2])
    t = b.transpose(b.reshape(x16, (1, 2, 3, 4)), [0, 3, 1, 2])
    inter = b.concat([x16, b.mul(x16, 2.0)], axis=1, interleave=True)
    out = run(b, [b.cast(v, "fp32", name=n) for v, n in ((a, "a"), (t, "t"), (inter, "i"))], x=x)
    x16n = x.astype(np.float16)
    np.testing.assert_array_equal(out["a"], x16n[:, 2:5, :, 1:3])
    np.testing.assert_array_equal(out["t"], x16n.reshape(1, 2, 3, 4).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(out["i"][:, 0::2], x16n)
    np.testing.assert_array_equal(out["i"][:, 1::2], x16n * 2)


def small_text():
    b = MilBuilder()
    x16 = b.cast(b.input("x", (1, 2, 1, 3)), "fp16")
    program, weights = b.build([b.cast(b.sigmoid(x16, name="sg"), "fp32", name="y")])
    return format_program(program), weights


def test_errors_name_the_op():
    text, _ = small_text()
    x = np.zeros((1, 2, 1, 3), np.float32)
    with pytest.raises(BackendError, match="op tanh 'sg': unknown op"):
        AneSim().run(text.replace("sigmoid(", "tanh("), {}, {"x": x})
    with pytest.raises(ShapeError, match="op sigmoid 'sg'.*declares"):
        AneSim().run(text.replace("[1, 2, 1, 3]> sg =", "[1, 3, 1, 2]> sg ="),
                     {}, {"x": x})
    with pytest.raises(ShapeError, match="input 'x'"):
        AneSim().run(text, {}, {"x": np.zeros((1, 3, 1, 2), np.float32)})


def test_missing_weight_file_is_named():
    b = MilBuilder()
    x16 = b.cast(b.input("x", (1, 2, 1, 1)), "fp16")
    program, _ = b.build([b.cast(b.conv(x16, b.weight("W", np.ones((2, 2, 1, 1)))), "fp32", name="y")])
    with pytest.raises(FormatError, match="w.bin"):
        AneSim().run(program, {}, {"x": np.zeros((1, 2, 1, 1), np.float32)})
