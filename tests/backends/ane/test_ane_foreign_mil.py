"""ane-sim reads MIL as others write it: the seed's own program rebuilt from its format string, and MIL
programs built with coremltools' MIL builder, translated op by op into Apple's spelling (compact and
spaced), run against float32/float64 NumPy and torch."""
import re
from pathlib import Path

import numpy as np
import pytest

from fusegrad.backends.ane.blob import BlobWriter
from fusegrad.backends.ane.mil import format_program, parse
from fusegrad.backends.ane.sim import AneSim
from fusegrad.core.errors import BackendError, FormatError

SEEDS = Path(__file__).resolve().parents[3] / ".." / "shared" / "seeds"
SEED = SEEDS / "000_04ef03ddd73c0c62.txt"

# The seed file lost everything between < and > (types); these restore them, with the seed's %d
# placeholders, so the seed's own argument list fills them in order.
FP16_4D, INT4 = "tensor<fp16, [1, %d, 1, %d]>", "tensor<int32, [4]>"
SEED_TYPES = {"x16": FP16_4D, "b1": INT4, "s1": INT4, "dh1": FP16_4D, "b3": INT4, "s3": INT4, "dh3": FP16_4D,
              "st": "tensor<int32, [2]>", "pd": INT4, "dl": "tensor<int32, [2]>",
              "W1t": "tensor<fp16, [%d, %d, 1, 1]>", "W3t": "tensor<fp16, [%d, %d, 1, 1]>",
              "dx1": FP16_4D, "dx3": FP16_4D, "sum": FP16_4D, "y": "tensor<fp32, [1, %d, 1, %d]>"}


def seed_program():
    """(MIL text, DIM, HIDDEN, SEQ) from the seed's stringWithFormat: call, types restored."""
    if not SEEDS.is_dir():
        pytest.skip(f"the seed documents are not at {SEEDS.resolve()} (../shared/seeds next to the repository)")
    src = SEED.read_text()
    sizes = {k: int(v) for k, v in re.findall(r"#define (DIM|HIDDEN|SEQ) (\d+)", src)}
    call = src[src.index("stringWithFormat:"):src.index("NSDictionary *wd")]  # the call, up to the next statement
    literals = list(re.finditer(r'"((?:[^"\\]|\\.)*)"', call))
    fmt = "".join(m.group(1) for m in literals).replace('\\"', '"').replace("\\n", "\n")
    args = [eval(a, {}, sizes) for a in re.findall(r"\b(?:HIDDEN\*2|HIDDEN|DIM|SEQ)\b", call[literals[-1].end():])]
    lines = []
    for line in fmt.replace("func main(tensor x)", "func main<ios18>(tensor<fp32, [1, %d, 1, %d]> x)")\
            .replace("dict(", "dict<string, string>(").split("\n"):
        m = re.match(r"(\s*)tensor (\w+) = (.*)", line)
        if m:
            line = f"{m[1]}{SEED_TYPES[m[2]]} {m[2]} = {m[3].replace('val = tensor(', f'val = {SEED_TYPES[m[2]]}(')}"
        lines.append(line)
    text = "\n".join(lines)
    assert text.count("%d") == len(args) == 29  # every placeholder restored, in the seed's order
    return text % tuple(args), sizes["DIM"], sizes["HIDDEN"], sizes["SEQ"]


def test_seed_program_from_its_format_string_runs_against_a_float32_reference():
    text, dim, hidden, seq = seed_program()
    rng = np.random.default_rng(42)
    w1, w3 = (((2 * rng.random((hidden, dim)) - 1) / np.sqrt(hidden)).astype(np.float32) for _ in range(2))

    def build_blob_t(w):  # the seed's: fp16 [cols, rows] = W^T, one blob at offset 64
        blob = BlobWriter()
        assert blob.add(w.T.astype(np.float16)) == 64
        return blob.to_bytes()

    weights = {"@model_path/weights/w1t.bin": build_blob_t(w1), "@model_path/weights/w3t.bin": build_blob_t(w3)}
    i = np.arange(seq * hidden, dtype=np.float32).reshape(seq, hidden)  # dh[t*HIDDEN + c]
    dh1, dh3 = 0.01 * np.sin(i * 0.007), 0.01 * np.cos(i * 0.011)
    x = np.concatenate([dh1.T, dh3.T])[None, :, None, :].astype(np.float32)  # channel-first, as the seed stages it
    program = parse(text)
    assert format_program(parse(format_program(program))) == format_program(program)
    y = AneSim(hw_rules=True).run(text, weights, {"x": x})["y"][0, :, 0, :]  # (DIM, SEQ)
    ref = (dh1 @ w1 + dh3 @ w3).T  # float32, the seed's CPU loop
    diff = float(np.abs(y - ref).max())
    print(f"seed program on ane-sim: max |y - ref| {diff:.3g} (max |ref| {np.abs(ref).max():.3g})")
    assert diff <= 5e-3 * np.abs(ref).max()


# ---- coremltools' MIL builder as the oracle for what MIL programs look like -----------------------
ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

TARGET = ct.target.iOS18


def literal(var, blob):
    """A coremltools const value in Apple's verbose spelling; large float tensors as BLOBFILE, hex floats."""
    dtype, val = types.builtin_to_string(var.dtype), var.val
    if dtype == "string":
        return f'tensor<string, []>("{val}")'
    arr = np.asarray(val)
    shape = f"tensor<{dtype}, [{', '.join(str(d) for d in arr.shape)}]>"

    def one(v):
        if dtype == "bool":
            return "true" if v else "false"
        return float(v).hex() if dtype.startswith("fp") else str(int(v))
    if arr.ndim == 0:
        return f"{shape}({one(arr)})"
    if arr.size > 8 and dtype.startswith("fp"):
        offset = blob.add(arr.astype(np.float16 if dtype == "fp16" else np.float32))
        return (f'{shape}(BLOBFILE(path = tensor<string, []>("@model_path/weights/weight.bin"), '
                f"offset = tensor<uint64, []>({offset})))")
    return f"{shape}([{', '.join(one(v) for v in arr.reshape(-1))}])"


def translate(prog, compact: bool):
    """MIL text (and weights) for a coremltools program, op by op; constexpr ops with bracket attributes."""
    func, blob, body = prog.functions["main"], BlobWriter(), []

    def typ(v):
        return f"tensor<{types.builtin_to_string(v.dtype)}, [{', '.join(str(d) for d in v.shape)}]>"

    for op in func.operations:
        out, name = op.outputs[0], f'name = tensor<string, []>("{op.name}")'
        if op.op_type == "const":
            body.append(f"{typ(out)} {out.name} = const()[{name}, val = {literal(out, blob)}];")
        elif op.op_type.startswith("constexpr_"):
            attrs = ", ".join(f"{k} = {literal(v, blob)}" for k, v in op.inputs.items())
            body.append(f"{typ(out)} {out.name} = {op.op_type}()[{attrs}, {name}];")
        else:
            args = ", ".join(f"{k} = ({', '.join(x.name for x in v)})" if isinstance(v, (tuple, list))
                             else f"{k} = {v.name}" for k, v in op.inputs.items())
            body.append(f"{typ(out)} {out.name} = {op.op_type}({args})[{name}];")
    params = ", ".join(f"{typ(v)} {n}" for n, v in func.inputs.items())
    info = '[buildInfo = dict<tensor<string, []>, tensor<string, []>>({{"coremltools-version", "9.0"}})]'
    text = "\n".join(["program(1.3)", info, "{", f"    func main<ios18>({params}) {{", *("        " + s for s in body),
                      f"    }} -> ({', '.join(v.name for v in func.outputs)});", "}"])
    if compact:
        text = re.sub(r"\s*([=,()\[\]<>{};])\s*", r"\1", text)  # one line: "...}->(y);}"
    return text, ({"@model_path/weights/weight.bin": blob.to_bytes()} if len(blob) else {})


def run_both_spellings(prog, inputs):
    outs = []
    for compact in (False, True):
        text, weights = translate(prog, compact)
        assert ("\n" in text) != compact
        outs.append(AneSim().run(text, weights, inputs))
    for k in outs[0]:
        np.testing.assert_array_equal(outs[0][k], outs[1][k])
    return [outs[0][v.name].astype(np.float64) for v in prog.functions["main"].outputs]


def close(got, ref, rel=3e-3):
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= rel * max(np.abs(ref).max(), 1e-3), np.abs(got - ref).max()


rng = np.random.default_rng(5)


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)


CONVS = [  # kernel, strides, pad_type, pad, dilations, groups
    ((3, 3), [1, 1], "valid", None, [1, 1], 1),
    ((3, 3), [2, 2], "custom", [1, 2, 0, 1], [1, 1], 1),
    ((3, 1), [1, 2], "same", None, [2, 1], 2),
    ((2, 2), [2, 2], "same", None, [1, 1], 4),
    ((3, 3), [1, 1], "same_lower", None, [1, 1], 1),
    ((1, 1), [1, 1], "valid", None, [1, 1], 1),
]


@pytest.mark.parametrize("kernel, strides, pad_type, pad, dilations, groups", CONVS)
def test_coremltools_conv_matches_torch(kernel, strides, pad_type, pad, dilations, groups):
    torch = pytest.importorskip("torch")
    x, w = rng.standard_normal((1, 4, 7, 9)), rng.standard_normal((8, 4 // groups, *kernel)) * 0.3
    bias = rng.standard_normal(8)
    extra = {"pad": pad} if pad else {}

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=TARGET)
    def prog(x_in):
        y = mb.conv(x=mb.cast(x=x_in, dtype="fp16"), weight=w.astype(np.float16), bias=bias.astype(np.float16),
                    strides=strides, pad_type=pad_type, dilations=dilations, groups=groups, **extra)
        return mb.cast(x=y, dtype="fp32")

    (got,) = run_both_spellings(prog, {"x_in": x.astype(np.float32)})
    if pad_type == "custom":
        lr = (pad[2], pad[3], pad[0], pad[1])
    else:  # same: total padding so that out = ceil(in / stride), the odd pixel after (same) or before (same_lower)
        lr = []
        for n, k, s, d in reversed(list(zip(x.shape[2:], kernel, strides, dilations))):
            t = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0) if pad_type != "valid" else 0
            lr += [t // 2, t - t // 2] if pad_type != "same_lower" else [t - t // 2, t // 2]
    xt = torch.nn.functional.pad(torch.tensor(f16(x)), tuple(lr))
    ref = torch.nn.functional.conv2d(xt, torch.tensor(f16(w)), torch.tensor(f16(bias)), stride=strides,
                                     dilation=dilations, groups=groups).numpy()
    close(got, ref)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_coremltools_sdpa_matches_torch(mask):
    torch = pytest.importorskip("torch")
    q, k, v = (rng.standard_normal((2, 5, 8)) for _ in range(3))
    m = {"bool": np.tril(np.ones((5, 5), bool)), "float": rng.standard_normal((5, 5))}.get(mask)

    @mb.program(input_specs=[mb.TensorSpec(shape=q.shape) for _ in range(3)], opset_version=TARGET)
    def prog(q_in, k_in, v_in):
        kw = {} if m is None else {"attn_mask": m if m.dtype == bool else m.astype(np.float16)}
        y = mb.scaled_dot_product_attention(query=mb.cast(x=q_in, dtype="fp16"), key=mb.cast(x=k_in, dtype="fp16"),
                                            value=mb.cast(x=v_in, dtype="fp16"), **kw)
        return mb.cast(x=y, dtype="fp32")

    (got,) = run_both_spellings(prog, {"q_in": q.astype(np.float32), "k_in": k.astype(np.float32),
                                       "v_in": v.astype(np.float32)})
    tm = None if m is None else torch.tensor(m if m.dtype == bool else f16(m))
    ref = torch.nn.functional.scaled_dot_product_attention(*(torch.tensor(f16(a)) for a in (q, k, v)), attn_mask=tm)
    close(got, ref.numpy())


def test_coremltools_reductions_quantization_and_elementwise_match_numpy():
    x = rng.standard_normal((2, 4, 6)) * 2
    qdata = rng.integers(-128, 127, (4, 6)).astype(np.int8)
    scale, zero = (rng.random(4) * 0.05 + 0.01).astype(np.float16), rng.integers(-3, 3, 4).astype(np.int8)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=TARGET)
    def prog(x_in):
        h = mb.cast(x=x_in, dtype="fp16")
        w = mb.constexpr_affine_dequantize(quantized_data=qdata, zero_point=zero, scale=scale, axis=0)  # (4, 6)
        q = mb.quantize(input=h, scale=np.float16(0.05), zero_point=np.int8(3), output_dtype="int8")
        qa = mb.quantize(input=h, scale=np.array([0.02, 0.05, 0.1, 0.2], np.float16), axis=1, output_dtype="uint8",
                         zero_point=np.array([128, 100, 90, 80], np.uint8))
        outs = [mb.reduce_mean(x=h, axes=[1], keep_dims=True), mb.reduce_max(x=h, axes=[-1]),
                mb.reduce_sum(x=h, axes=[0, 2], keep_dims=False), mb.linear(x=h, weight=w),
                mb.dequantize(input=q, scale=np.float16(0.05), zero_point=np.int8(3)),
                mb.dequantize(input=qa, scale=np.array([0.02, 0.05, 0.1, 0.2], np.float16), axis=1,
                              zero_point=np.array([128, 100, 90, 80], np.uint8)),
                mb.real_div(x=mb.exp(x=mb.mul(x=h, y=np.float16(0.5))), y=mb.add(x=mb.relu(x=h), y=np.float16(1.0))),
                mb.rsqrt(x=mb.add(x=mb.mul(x=h, y=h), y=np.float16(0.25))),
                mb.softmax(x=h, axis=1)]
        return tuple(mb.cast(x=o, dtype="fp32") for o in outs)

    got = run_both_spellings(prog, {"x_in": x.astype(np.float32)})
    h = f16(x)
    w = (qdata.astype(np.float64) - zero[:, None]) * scale.astype(np.float64)[:, None]
    q = np.clip(np.round(h / f16(0.05) + 3), -128, 127)
    sa, za = f16([0.02, 0.05, 0.1, 0.2])[None, :, None], np.array([128, 100, 90, 80])[None, :, None]
    qa = np.clip(np.round(h / sa + za), 0, 255)
    e = np.exp(h - h.max(1, keepdims=True))
    refs = [h.mean(1, keepdims=True), h.max(-1), h.sum((0, 2)), h @ w.T, (q - 3) * f16(0.05), (qa - za) * sa,
            np.exp(h * 0.5) / (np.maximum(h, 0) + 1), 1 / np.sqrt(h * h + 0.25), e / e.sum(1, keepdims=True)]
    for g, r in zip(got, refs):
        close(g, r)


# ---- spelling and errors ----------------------------------------------------------------------
def test_hex_exponent_and_comment_spellings():
    text = """program(1.3) {func main<ios18>(tensor<fp32, [1, 3]> x) { // a comment
        tensor<fp32, [1, 3]> a = const()[name = string("a"), val = tensor<fp32, [1, 3]>([0x1.8p+1, 2.5e-1, -1E2])];
        tensor<fp32, []> b = const()[name = tensor<string, []>("b"), val = tensor<fp32, []>(-0x1p-2)];
        tensor<fp32, [1, 3]> y = mul(x = x, y = a)[name = string("m")];
        tensor<fp32, [1, 3]> z = add(x = y, y = b)[name = string("z")];
    } -> (z); }"""
    z = AneSim().run(text, {}, {"x": np.ones((1, 3), np.float32)})["z"]
    np.testing.assert_array_equal(z, [[2.75, 0.0, -100.25]])


def test_unknown_op_and_construct_name_their_line():
    text = 'program(1.3)\n{\n func main<ios18>(tensor<fp32, [2]> x) {\n  tensor<fp32, [2]> y = gelu2(x = x)' \
           '[name = string("g")];\n } -> (y);\n}\n'
    with pytest.raises(BackendError, match=r"op gelu2 'g': unknown op \(MIL line 4\)"):
        AneSim().run(text, {}, {"x": np.zeros(2, np.float32)})
    with pytest.raises(BackendError, match=r"op relu 'g': dtype bf16 is not modelled \(MIL line 4\)"):
        AneSim().run(text.replace("gelu2", "relu").replace("fp32, [2]> y", "bf16, [2]> y"), {}, {"x": np.zeros(2)})
    with pytest.raises(BackendError, match=r"op relu 'g': argument beta is not modelled \(MIL line 4\)"):
        AneSim().run(text.replace("gelu2(x = x)", "relu(x = x, beta = x)"), {}, {"x": np.zeros(2)})
    with pytest.raises(FormatError, match="MIL line 3: cannot parse a fixed dimension: got 'n'"):
        parse(text.replace("[2]> x", "[n]> x"))
    with pytest.raises(FormatError, match="MIL line 4: cannot parse ';' after a statement: got 'junk'"):
        parse(text.replace(';\n }', ' junk;\n }'))
    with pytest.raises(FormatError, match="MIL line 6: cannot parse more than one function"):
        parse(text.replace("\n}\n", "\n func f() {} -> ();\n}\n"))
    conv = text.replace("gelu2(x = x)", "conv(x = x, weight = x, pad_type = p)").replace(
        "  tensor<fp32, [2]> y",
        '  string p = const()[name = string("p"), val = string("reflect")];\n  tensor<fp32, [2]> y')
    with pytest.raises(BackendError, match=r"op conv 'g'.*pad_type 'reflect'.*\(MIL line 5\)"):
        AneSim().run(conv, {}, {"x": np.zeros(2, np.float32)})
