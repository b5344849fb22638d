"""Shape contracts: every bad shape or dtype raises fusegrad.ShapeError (a ValueError) naming the op and
the shapes at fault; no IndexError, broadcast error or bare assert escapes from inside an op."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fusegrad as fg

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


def _broadcasts(a, b):
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


def t(shape, dtype="float32"):
    return fg.tensor(np.ones(shape), dtype=dtype)


def test_shape_error_is_a_value_error():
    assert issubclass(fg.ShapeError, ValueError)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow"])
@given(pair=st.tuples(shapes, shapes).filter(lambda p: not _broadcasts(*p)))
def test_binary_ops_reject_shapes_that_do_not_broadcast(op, pair):
    a, b = pair
    with pytest.raises(fg.ShapeError) as err:
        getattr(fg, op)(t(a), t(b))
    msg = str(err.value)
    assert msg.startswith(f"{op}:") and str(a) in msg and str(b) in msg


@given(m=st.integers(1, 6), k=st.integers(1, 6), k2=st.integers(1, 6), n=st.integers(1, 6))
def test_matmul_inner_dimension_mismatch(m, k, k2, n):
    if k == k2:
        k2 += 1
    with pytest.raises(fg.ShapeError, match=rf"^matmul: inner dimensions differ: a is \({m}, {k}\), b is \({k2}, {n}\)$"):
        t((m, k)) @ t((k2, n))
    with pytest.raises(fg.ShapeError, match=rf"^matmul_nt: inner dimensions differ: a is \({m}, {k}\), b is \({n}, {k2}\)$"):
        fg.matmul_nt(t((m, k)), t((n, k2)))
    with pytest.raises(fg.ShapeError, match=rf"^linear: .*\({m}, {k}\).*\({n}, {k2}\)"):
        fg.linear(t((m, k)), t((n, k2)))


@pytest.mark.parametrize("a, b, words", [
    ((2, 3, 4), (3, 4, 5), "batch dimensions"),
    ((3,), (3, 2), "at least 2-D"),
    ((2, 3), (3,), "at least 2-D"),
])
def test_matmul_bad_ranks_and_batches(a, b, words):
    with pytest.raises(fg.ShapeError, match=words) as err:
        fg.matmul(t(a), t(b))
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_linear_bad_weight_and_bias():
    with pytest.raises(fg.ShapeError, match=r"linear: weight must be 2-D"):
        fg.linear(t((2, 3)), t((4, 3, 1)))
    with pytest.raises(fg.ShapeError, match=r"linear: bias must have shape \(4,\), got \(3,\)"):
        fg.linear(t((2, 3)), t((4, 3)), t((3,)))


@given(a=shapes, b=shapes)
def test_concat_mismatch(a, b):
    axis = 0
    if len(a) == len(b) and a[1:] == b[1:]:
        b = b + (2,)  # make the ranks differ
    with pytest.raises(fg.ShapeError) as err:
        fg.concat([t(a), t(b)], axis=axis)
    msg = str(err.value)
    assert msg.startswith("concat:") and str(a) in msg and str(b) in msg


def test_concat_bad_inputs():
    with pytest.raises(fg.ShapeError, match="concat: need at least one"):
        fg.concat([])
    with pytest.raises(fg.ShapeError, match="concat: dtypes differ"):
        fg.concat([t((2,)), t((2,), "float64")])
    with pytest.raises(fg.ShapeError, match="concat: tensor 1"):
        fg.concat([t((2,)), np.ones(2)])
    with pytest.raises(fg.ShapeError, match="concat: axis 2 is out of range"):
        fg.concat([t((2, 3)), t((2, 3))], axis=2)


@given(shape=shapes, target=shapes)
def test_reshape_to_a_different_size(shape, target):
    if np.prod(shape) == np.prod(target):
        target = target + (2,)
    with pytest.raises(fg.ShapeError) as err:
        fg.reshape(t(shape), target)
    assert err.value.args[0].startswith("reshape:") and str(shape) in str(err.value) and str(target) in str(err.value)


@pytest.mark.parametrize("target", [(-1, -1), (-2, -3), (2.0, 3), (0, -1)])
def test_reshape_bad_targets(target):
    with pytest.raises(fg.ShapeError, match="reshape:"):
        fg.reshape(t((2, 3)), target)


@given(shape=shapes, data=st.data())
def test_getitem_out_of_range(shape, data):
    axis = data.draw(st.integers(0, len(shape) - 1))
    size = shape[axis]
    index = data.draw(st.one_of(st.integers(size, size + 5), st.integers(-size - 5, -size - 1)))
    key = (slice(None),) * axis + (index,)
    with pytest.raises(fg.ShapeError) as err:
        t(shape)[key]
    assert str(shape) in str(err.value)
    with pytest.raises(fg.ShapeError):
        t(shape)[(slice(None),) * axis + (np.array([0, index]),)]  # gathers too


@pytest.mark.parametrize("key", [(0, 0, 0), 1.5, "x", np.array([0.5])])
def test_getitem_bad_keys(key):
    with pytest.raises(fg.ShapeError, match=r"\(2, 3\)"):
        t((2, 3))[key]


@pytest.mark.parametrize("call, words", [
    (lambda x: fg.split(x, 4, axis=1), "split: axis 1 of length 3"),
    (lambda x: fg.split(x, [1, 1], axis=1), r"split: sizes \[1, 1\] do not add up"),
    (lambda x: fg.split(x, 1, axis=3), "split: axis 3 is out of range"),
    (lambda x: fg.permute(x, (0,)), r"permute: need 2 axes for shape \(2, 3\)"),
    (lambda x: fg.permute(x, (0, 0)), "permute: repeated axis"),
    (lambda x: fg.permute(x, (0, 2)), "permute: axis 2 is out of range"),
    (lambda x: fg.transpose(x, 0, 2), "transpose: axis 2 is out of range"),
    (lambda x: fg.transpose(x, 5, 5), "transpose: axis 5 is out of range"),
    (lambda x: fg.transpose(x[0]), r"transpose: .*at least 2-D.*\(3,\)"),
    (lambda x: fg.sum(x, axis=2), "sum: axis 2 is out of range"),
    (lambda x: fg.mean(x, axis=-3), "mean: axis -3 is out of range"),
    (lambda x: fg.max(x, axis=(0, 0)), "max: repeated axis"),
    (lambda x: fg.softmax(x, axis=2), "softmax: axis 2"),
    (lambda x: fg.log_softmax(x, axis=None), "log_softmax: axis must be one integer"),
    (lambda x: fg.permute(x, (0.5, 1)), "permute: axis must be an integer"),
    (lambda x: fg.transpose(x, 0.5, 1), "transpose: axis must be an integer"),
    (lambda x: fg.sum(x, axis=0.5), "sum: axis must be an integer"),
    (lambda x: fg.concat([x, x], axis="0"), "concat: axis must be an integer"),
    (lambda x: fg.matmul(x, "w"), "matmul: b must be a floating tensor"),
    (lambda x: x.backward(), "backward"),
    (lambda x: fg.tensor(x).item(), r"item: .*\(2, 3\)"),
])
def test_other_bad_arguments(call, words):
    with pytest.raises(fg.ShapeError, match=words):
        call(t((2, 3)))


def test_bad_option_values_are_config_errors():
    with pytest.raises(fg.ConfigError, match="gelu: approximate"):
        fg.gelu(t((2, 3)), approximate="fast")


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "matmul", "matmul_nt"])
def test_binary_ops_reject_mixed_dtypes(op):
    with pytest.raises(fg.ShapeError, match=rf"{op}: dtypes differ: a is float32, b is float64"):
        getattr(fg, op)(t((2, 2)), t((2, 2), "float64"))


@pytest.mark.parametrize("op", ["neg", "exp", "log", "sqrt", "relu", "sigmoid", "silu", "gelu", "sum", "mean",
                                "max", "softmax", "log_softmax"])
def test_unary_ops_reject_integer_tensors(op):
    with pytest.raises(fg.ShapeError, match=rf"{op}: a must be a floating tensor, got dtype int64"):
        getattr(fg, op)(fg.tensor([[1, 2]]))


def test_cross_entropy_contract():
    logits = t((3, 4))
    with pytest.raises(fg.ShapeError, match=r"cross_entropy: logits must be \(N, V\), got shape \(3,\)"):
        fg.cross_entropy(t((3,)), fg.tensor([0, 1, 2]))
    with pytest.raises(fg.ShapeError, match=r"cross_entropy: targets must be integers of shape \(3,\), got int64 \(2,\)"):
        fg.cross_entropy(logits, fg.tensor([0, 1]))
    with pytest.raises(fg.ShapeError, match="got float32"):
        fg.cross_entropy(logits, fg.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(fg.ShapeError, match=r"target id 4 is outside \[0, 4\)"):
        fg.cross_entropy(logits, fg.tensor([0, 4, 1]))


def test_python_operands_take_the_tensor_dtype():
    x = fg.tensor(np.ones((2, 3)), dtype="float32", requires_grad=True)
    y = fg.linear(x, [[1.0, 2.0, 3.0]], [0.5]) + [1.0, 2.0, 3.0][:1]
    assert y.dtype == np.float32 and y.tolist() == [[7.5], [7.5]]
    assert (x @ [[1.0], [1.0], [1.0]]).dtype == np.float32
