"""ane-sim: a NumPy interpreter of MIL programs that rounds like the ANE.

Every op computes in float32 from its (already rounded) inputs, then rounds its result to the
declared output dtype: fp16-typed values are stored as float16, so GEMM/conv accumulate in float32
and round once, elementwise ops round after each op. BLOBFILE consts are read from the weight bytes.
Declared output shapes are checked, so a wrong program fails here rather than on a Mac.

>>> import numpy as np
>>> from fusegrad.backends.ane.builder import MilBuilder
>>> b = MilBuilder(); x = b.input("x", (1, 2, 1, 3))
>>> p, w = b.build([b.cast(b.mul(b.cast(x, "fp16"), 1.0 / 3), "fp32", name="y")])
>>> float(AneSim().run(p, w, {"x": np.ones((1, 2, 1, 3), np.float32)})["y"][0, 0, 0, 0])  # fp16(1/3)
0.333251953125
"""
from __future__ import annotations

import numpy as np

from fusegrad.backends.ane.blob import read_blob
from fusegrad.backends.ane.mil import NUMPY_DTYPES, Blobfile, Op, parse
from fusegrad.core.errors import BackendError, FormatError, ShapeError


def _f32(a):
    return np.asarray(a, np.float32)


def _cast(a, op):
    if a("dtype") != op.out.type.dtype:
        raise ShapeError(f"ane-sim cast {op.name!r}: dtype {a('dtype')!r} but output declared {op.out.type.text}")
    return a("x")


def _conv(a, op, env):
    x, w = _f32(a("x")), _f32(a("weight"))
    groups = int(a("groups")) if "groups" in op.args else 1
    if w.shape[2:] != (1, 1) or list(a("strides")) != [1, 1] or np.any(a("pad")) or a("pad_type") != "valid":
        raise BackendError(f"ane-sim conv {op.name!r}: only 1x1 kernels, stride 1, pad_type valid are modelled")
    n, ic, h, s = x.shape
    oc = w.shape[0]
    if w.shape[1] * groups != ic:
        raise ShapeError(f"ane-sim conv {op.name!r}: weight {w.shape} with groups {groups} vs x {x.shape}")
    xg = x.reshape(n, groups, ic // groups, h * s)
    wg = w.reshape(groups, oc // groups, ic // groups)
    return np.einsum("goi,ngip->ngop", wg, xg).reshape(n, oc, h, s)


def _matmul(a, op, env):
    x, y = _f32(a("x")), _f32(a("y"))
    if a("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _concat(a, op, env):
    values = [env[name] for name in op.args["values"]]
    axis = int(a("axis"))
    if a("interleave"):  # out[i * n + j] = values[j][i] along axis
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _slice(a, op, env):
    x, begin, size = a("x"), list(a("begin")), list(a("size"))
    index = tuple(slice(b, x.shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))
    return x[index]


def _softmax(a, op, env):
    x = _f32(a("x"))
    e = np.exp(x - x.max(axis=int(a("axis")), keepdims=True))
    return e / e.sum(axis=int(a("axis")), keepdims=True)


OPS = {
    "cast": lambda a, op, env: _cast(a, op),
    "conv": _conv,
    "matmul": _matmul,
    "slice_by_size": _slice,
    "reshape": lambda a, op, env: a("x").reshape([int(d) for d in a("shape")]),
    "transpose": lambda a, op, env: np.transpose(a("x"), [int(p) for p in a("perm")]),
    "concat": _concat,
    "softmax": _softmax,
    "reduce_sum": lambda a, op, env: _f32(a("x")).sum(axis=tuple(int(i) for i in a("axes")),
                                                      keepdims=bool(a("keep_dims"))),
    "pow": lambda a, op, env: np.power(_f32(a("x")), _f32(a("y"))),
    "mul": lambda a, op, env: _f32(a("x")) * _f32(a("y")),
    "add": lambda a, op, env: _f32(a("x")) + _f32(a("y")),
    "sub": lambda a, op, env: _f32(a("x")) - _f32(a("y")),
    "sigmoid": lambda a, op, env: 1.0 / (1.0 + np.exp(-_f32(a("x")))),
}


class AneSim:
    """Runs a Program (or MIL text) on NumPy with ANE-like fp16 rounding; same `run` API as the runtime."""

    name = "ane-sim"

    def run(self, program, weights: dict, inputs: dict) -> dict:
        program = parse(program) if isinstance(program, str) else program
        env = {}
        for var in program.inputs:
            if var.name not in inputs:
                raise ShapeError(f"ane-sim: missing input {var.name!r} {var.type.text}")
            value = np.asarray(inputs[var.name])
            if value.shape != var.type.shape:
                raise ShapeError(f"ane-sim: input {var.name!r} has shape {value.shape}, program wants {var.type.text}")
            env[var.name] = value.astype(NUMPY_DTYPES[var.type.dtype])
        for op in program.ops:
            env[op.out.name] = self._eval(op, env, weights)
        return {name: env[name] for name in program.outputs}

    def _eval(self, op: Op, env: dict, weights: dict):
        where = f"ane-sim op {op.op} {op.name!r}"
        if op.op == "const":
            return self._const(op, weights, where)
        if op.op not in OPS:
            raise BackendError(f"{where}: unknown op (known: {', '.join(sorted(OPS))})")

        def arg(key):
            if key not in op.args:
                raise FormatError(f"{where}: missing argument {key!r}")
            if op.args[key] not in env:
                raise FormatError(f"{where}: argument {key} = {op.args[key]} is not defined before use")
            return env[op.args[key]]

        try:
            result = np.asarray(OPS[op.op](arg, op, env))
        except (ValueError, IndexError) as e:
            raise ShapeError(f"{where}: {e}") from None
        type_ = op.out.type
        if type_.shape is not None and result.shape != type_.shape:
            raise ShapeError(f"{where}: computes shape {result.shape}, text declares {type_.text}")
        if type_.dtype not in NUMPY_DTYPES:
            raise BackendError(f"{where}: unsupported output dtype {type_.dtype}")
        return result.astype(NUMPY_DTYPES[type_.dtype])  # the fp16 rounding the ANE does

    @staticmethod
    def _const(op: Op, weights: dict, where: str):
        val = op.val
        if isinstance(val, Blobfile):
            if val.path not in weights:
                raise FormatError(f"{where}: weight file {val.path!r} not given (have {sorted(weights)})")
            array = read_blob(weights[val.path], val.offset, op.out.type.shape, where=f"{where} {val.path}")
            expected = np.dtype(NUMPY_DTYPES[op.out.type.dtype])
            if array.dtype != expected:
                raise FormatError(f"{where}: blob holds {array.dtype}, text declares {op.out.type.text}")
            return array
        if isinstance(val, np.ndarray):
            return val.astype(NUMPY_DTYPES[op.out.type.dtype])
        if op.out.type.dtype in ("fp16", "fp32"):
            return NUMPY_DTYPES[op.out.type.dtype](val)
        return val
