"""MIL text: builder -> text -> parse -> text round trips, and the seed's hand-written program parses."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusegrad.backends.ane.builder import MilBuilder
from fusegrad.backends.ane.mil import Blobfile, MilType, format_program, parse
from fusegrad.core.errors import FormatError, ShapeError

# The seed's fused W1b+W3b program with its type annotations restored (DIM 8, HIDDEN 16, SEQ 4).
SEED_TEXT = """program(1.3)
[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}, \
{"coremltools-component-milinternal", ""}, {"coremltools-version", "9.0"}})]
{
    func main<ios18>(tensor<fp32, [1, 32, 1, 4]> x) {
        string d1 = const()[name = string("d1"), val = string("fp16")];
        tensor<fp16, [1, 32, 1, 4]> x16 = cast(dtype = d1, x = x)[name = string("cx")];
        tensor<int32, [4]> b1 = const()[name = string("b1"), val = tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [4]> s1 = const()[name = string("s1"), val = tensor<int32, [4]>([1, 16, 1, 4])];
        tensor<fp16, [1, 16, 1, 4]> dh1 = slice_by_size(x = x16, begin = b1, size = s1)[name = string("sl1")];
        tensor<int32, [4]> b3 = const()[name = string("b3"), val = tensor<int32, [4]>([0, 16, 0, 0])];
        tensor<int32, [4]> s3 = const()[name = string("s3"), val = tensor<int32, [4]>([1, 16, 1, 4])];
        tensor<fp16, [1, 16, 1, 4]> dh3 = slice_by_size(x = x16, begin = b3, size = s3)[name = string("sl3")];
        string pt = const()[name = string("pt"), val = string("valid")];
        tensor<int32, [2]> st = const()[name = string("st"), val = tensor<int32, [2]>([1, 1])];
        tensor<int32, [4]> pd = const()[name = string("pd"), val = tensor<int32, [4]>([0, 0, 0, 0])];
        tensor<int32, [2]> dl = const()[name = string("dl"), val = tensor<int32, [2]>([1, 1])];
        int32 gr = const()[name = string("gr"), val = int32(1)];
        tensor<fp16, [8, 16, 1, 1]> W1t = const()[name = string("W1t"), \
val = tensor<fp16, [8, 16, 1, 1]>(BLOBFILE(path = string("@model_path/weights/w1t.bin"), offset = uint64(64)))];
        tensor<fp16, [8, 16, 1, 1]> W3t = const()[name = string("W3t"), \
val = tensor<fp16, [8, 16, 1, 1]>(BLOBFILE(path = string("@model_path/weights/w3t.bin"), offset = uint64(64)))];
        tensor<fp16, [1, 8, 1, 4]> dx1 = conv(dilations = dl, groups = gr, pad = pd, pad_type = pt, \
strides = st, weight = W1t, x = dh1)[name = string("cv1")];
        tensor<fp16, [1, 8, 1, 4]> dx3 = conv(dilations = dl, groups = gr, pad = pd, pad_type = pt, \
strides = st, weight = W3t, x = dh3)[name = string("cv3")];
        tensor<fp16, [1, 8, 1, 4]> sum = add(x = dx1, y = dx3)[name = string("ad")];
        string d2 = const()[name = string("d2"), val = string("fp32")];
        tensor<fp32, [1, 8, 1, 4]> y = cast(dtype = d2, x = sum)[name = string("co")];
    } -> (y);
}
"""


def every_op_program():
    b = MilBuilder()
    x = b.input("x", (1, 8, 1, 6))
    x16 = b.cast(x, "fp16", name="x16")
    h = b.conv(x16, b.weight("W", np.ones((4, 8, 1, 1))), name="h")
    hg = b.conv(x16, b.weight("Wg", np.ones((8, 4, 1, 1))), groups=2, name="hg")
    s = b.slice_by_size(hg, [0, 4, 0, 0], [1, 4, 1, 6], name="s")
    r = b.reshape(b.concat([h, s], axis=1, name="cat"), (1, 2, 4, 6), name="r")
    t = b.transpose(r, [0, 1, 3, 2], name="t")
    m = b.matmul(t, t, transpose_y=True, name="m")
    p = b.softmax(b.pow(b.sigmoid(m), 2.0, name="p2"), axis=-1, name="sm")
    red = b.reduce_sum(b.sub(b.mul(p, 0.5), b.add(p, p)), axes=[-1], keep_dims=False, name="red")
    return b.build([b.cast(red, "fp32", name="y"), b.cast(b.concat([s, s], 1, interleave=True), "fp32", name="z")])


def test_round_trip_every_op():
    program, _ = every_op_program()
    text = format_program(program)
    assert {op.op for op in program.ops} >= {"const", "conv", "matmul", "slice_by_size", "reshape", "transpose",
                                            "concat", "softmax", "reduce_sum", "pow", "mul", "add", "sub",
                                            "sigmoid", "cast"}
    parsed = parse(text)
    assert format_program(parsed) == text
    assert parsed == program
    assert [v.type.text for v in parsed.output_vars] == ["tensor<fp32, [1, 2, 6]>", "tensor<fp32, [1, 8, 1, 6]>"]


def test_text_style_matches_the_seed():
    text = format_program(every_op_program()[0])
    lines = text.splitlines()
    assert lines[0] == "program(1.3)"
    assert lines[1] == SEED_TEXT.splitlines()[1]
    assert lines[3] == "    func main<ios18>(tensor<fp32, [1, 8, 1, 6]> x) {"
    assert '        string pt = const()[name = string("pt"), val = string("valid")];' in lines
    assert any('BLOBFILE(path = string("@model_path/weights/w.bin"), offset = uint64(64))' in ln for ln in lines)
    assert lines[-2:] == ["    } -> (y, z);", "}"]


def test_parse_seed_text():
    seed = SEED_TEXT  # written by hand, in the seed's layout
    program = parse(seed)
    assert format_program(program) == seed
    assert [op.op for op in program.ops].count("conv") == 2
    w1t = next(op for op in program.ops if op.name == "W1t")
    assert w1t.val == Blobfile("@model_path/weights/w1t.bin", 64)
    assert w1t.out.type == MilType("fp16", (8, 16, 1, 1))
    assert program.inputs[0].type == MilType("fp32", (1, 32, 1, 4))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=6),
       st.floats(-65504, 65504, allow_nan=False), st.booleans(), st.text("abcxyz_ 0123", max_size=8))
def test_const_values_round_trip(ints, value, flag, s):
    b = MilBuilder()
    x = b.input("x", (1, 2, 1, 2))
    consts = [b.const(ints, name="i"), b.const(value, name="f"), b.const(value, "fp32", name="g"),
              b.const(flag, name="b"), b.const(s, name="s")]
    program, _ = b.build([x])
    parsed = parse(format_program(program))
    for op, var in zip(parsed.ops, consts):
        assert op.out == var
    assert parsed.ops[0].val.tolist() == ints
    assert parsed.ops[1].val == float(np.float16(value)) or parsed.ops[1].val == value
    assert parsed.ops[2].val == value and parsed.ops[3].val is flag and parsed.ops[4].val == s


@pytest.mark.parametrize("bad, match", [
    ("program(1.3)\n{\n}\n", "only"),
    (SEED_TEXT.replace("program(1.3)", "prog(1.3)"), "program"),
    (SEED_TEXT.replace("val = int32(1)", "val = bool(1)"), "does not match"),
    (SEED_TEXT.replace(" -> (y);", ";"), "outputs"),
    (SEED_TEXT.replace('[name = string("ad")]', ""), "cannot parse"),
])
def test_bad_text_names_the_fault(bad, match):
    with pytest.raises(FormatError, match=match):
        parse(bad)


def test_builder_shape_errors_name_the_op():
    b = MilBuilder()
    x = b.cast(b.input("x", (1, 8, 1, 4)), "fp16")
    with pytest.raises(ShapeError, match="conv cv"):
        b.conv(x, b.weight("W", np.ones((4, 6, 1, 1))), name="cv")
    with pytest.raises(ShapeError, match="slice_by_size"):
        b.slice_by_size(x, [0, 4, 0, 0], [1, 8, 1, 4])
    with pytest.raises(ShapeError, match="matmul mm"):
        b.matmul(x, x, name="mm")
