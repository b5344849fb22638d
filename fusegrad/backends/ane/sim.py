"""ane-sim: a NumPy interpreter of MIL programs that rounds like the ANE.

Every op computes in float32 from its (already rounded) inputs, then rounds its result to the
declared output dtype: fp16-typed values are stored as float16, so GEMM/conv accumulate in float32
and round once, elementwise ops round after each op. BLOBFILE consts are read from the weight bytes.
Declared output shapes are checked, so a wrong program fails here rather than on a Mac.

`AneSim(hw_rules=True)` (what `get_runner("ane-sim")` returns) also refuses what the ANE is reported
to get wrong (maderix/ANE issues, unverified): a matmul whose inner dimension is not a multiple of
32 (silent zeros) and program inputs/outputs under 49,152 bytes (evaluation fails).

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
from fusegrad.backends.ane.mil import NUMPY_DTYPES, Blobfile, Op, Program, parse
from fusegrad.core.errors import BackendError, FormatError, ShapeError

MIN_IO_BYTES = 49152  # I/O surfaces below this are reported to fail to evaluate
INNER_MULTIPLE = 32  # matmul inner dimensions that are not a multiple of this are reported to give zeros
_MISSING = object()


def _f32(a):
    return np.asarray(a, np.float32)


def _ints(v) -> list:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _cast(a, op):
    if a("dtype") != op.out.type.dtype:
        raise ShapeError(f"dtype {a('dtype')!r} but output declared {op.out.type.text}")
    return a("x")


def _conv_pads(a, x, k, strides, dil) -> list:
    pad_type, pad, spatial = a("pad_type", "valid"), a("pad", None), x.shape[2:]
    if pad_type == "custom":
        p = _ints(pad)
        return [(p[2 * i], p[2 * i + 1]) for i in range(len(k))]
    if pad_type == "valid":
        return [(0, 0)] * len(k)
    if pad_type not in ("same", "same_lower"):
        raise BackendError(f"conv pad_type {pad_type!r} (known: valid, same, same_lower, custom)")
    total = [max((-(-n // s) - 1) * s + (kk - 1) * d + 1 - n, 0) for n, kk, s, d in zip(spatial, k, strides, dil)]
    return [(t // 2, t - t // 2) if pad_type == "same" else (t - t // 2, t // 2) for t in total]


def _conv(a, op):
    """x (N, C, *spatial), weight (OC, C/groups, *kernel): strides, dilations, groups, pad_type, pad, bias."""
    x, w = _f32(a("x")), _f32(a("weight"))
    k, groups = w.shape[2:], int(a("groups", 1))
    strides, dil = _ints(a("strides", [1] * len(k))), _ints(a("dilations", [1] * len(k)))
    x = np.pad(x, [(0, 0), (0, 0)] + _conv_pads(a, x, k, strides, dil))
    (n, ic), oc = x.shape[:2], w.shape[0]
    if w.shape[1] * groups != ic or oc % groups:
        raise ShapeError(f"weight {w.shape} with groups {groups} does not fit x {x.shape}")
    out_sp = [(size - (kk - 1) * d - 1) // s + 1 for size, kk, s, d in zip(x.shape[2:], k, strides, dil)]
    xg = x.reshape(n, groups, ic // groups, *x.shape[2:])
    wg = w.reshape(groups, oc // groups, ic // groups, *k)
    out = np.zeros((n, groups, oc // groups, int(np.prod(out_sp))), np.float32)
    for idx in np.ndindex(*k):  # one GEMM per kernel tap, over the strided, dilated window it sees
        window = tuple(slice(i * d, i * d + (o - 1) * s + 1, s) for i, d, o, s in zip(idx, dil, out_sp, strides))
        out += wg[(...,) + idx] @ xg[(..., *window)].reshape(n, groups, ic // groups, -1)
    out = out.reshape(n, oc, *out_sp)
    bias = a("bias", None)
    return out if bias is None else out + _f32(bias).reshape(1, oc, *[1] * len(k))


def _matmul(a, op):
    x, y = _f32(a("x")), _f32(a("y"))
    if a("transpose_x", False):
        x = np.swapaxes(x, -1, -2)
    if a("transpose_y", False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _concat(a, op):
    values, axis = a("values"), int(a("axis"))
    if a("interleave", False):  # out[i * n + j] = values[j][i] along axis
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _slice(a, op):
    x, begin, size = a("x"), _ints(a("begin")), _ints(a("size"))
    return x[tuple(slice(b, x.shape[i] if s == -1 else b + s) for i, (b, s) in enumerate(zip(begin, size)))]


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _sdpa(a, op):
    """softmax(Q K^T / sqrt(E) + mask) V; a bool mask keeps True entries."""
    q, k = _f32(a("query")), _f32(a("key"))
    scores = q @ np.swapaxes(k, -1, -2) / np.float32(np.sqrt(q.shape[-1]))
    mask = a("attn_mask", None)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if np.asarray(mask).dtype == bool else scores + _f32(mask)
    return _softmax(scores, -1) @ _f32(a("value"))


def _reduce(fn):
    def run(a, op):
        axes = a("axes", None)
        return fn(_f32(a("x")), axis=None if axes is None else tuple(_ints(axes)), keepdims=bool(a("keep_dims", False)))
    return run


def _affine(a, op, key):
    """(x - zero_point) * scale; scale and zero_point scalars or vectors along `axis`."""
    x, axis = _f32(a(key)), int(a("axis", 0))

    def along(v):
        v = _f32(v)
        return v.reshape([-1 if i == axis % x.ndim else 1 for i in range(x.ndim)]) if v.ndim == 1 else v
    return (x - along(a("zero_point", 0))) * along(a("scale"))


def _quantize(a, op):
    if a("output_dtype", op.out.type.dtype) != op.out.type.dtype:
        raise ShapeError(f"output_dtype {a('output_dtype')!r} but output declared {op.out.type.text}")
    info = np.iinfo(NUMPY_DTYPES[op.out.type.dtype])
    x, scale, zp, axis = _f32(a("input")), _f32(a("scale")), _f32(a("zero_point", 0)), int(a("axis", 0))
    if scale.ndim == 1:
        shape = [-1 if i == axis % x.ndim else 1 for i in range(x.ndim)]
        scale, zp = scale.reshape(shape), zp.reshape(shape) if zp.ndim == 1 else zp
    return np.clip(np.round(x / scale + zp), info.min, info.max)


OPS = {
    "cast": _cast,
    "conv": _conv,
    "matmul": _matmul,
    "linear": lambda a, op: _f32(a("x")) @ _f32(a("weight")).T + _f32(a("bias", 0)),
    "slice_by_size": _slice,
    "reshape": lambda a, op: a("x").reshape(_ints(a("shape"))),
    "transpose": lambda a, op: np.transpose(a("x"), _ints(a("perm"))),
    "concat": _concat,
    "softmax": lambda a, op: _softmax(_f32(a("x")), int(a("axis", -1))),
    "scaled_dot_product_attention": _sdpa,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "constexpr_affine_dequantize": lambda a, op: _affine(a, op, "quantized_data"),
    "dequantize": lambda a, op: _affine(a, op, "input"),
    "quantize": _quantize,
    "pow": lambda a, op: np.power(_f32(a("x")), _f32(a("y"))),
    "mul": lambda a, op: _f32(a("x")) * _f32(a("y")),
    "add": lambda a, op: _f32(a("x")) + _f32(a("y")),
    "sub": lambda a, op: _f32(a("x")) - _f32(a("y")),
    "real_div": lambda a, op: _f32(a("x")) / _f32(a("y")),
    "sigmoid": lambda a, op: 1.0 / (1.0 + np.exp(-_f32(a("x")))),
    "exp": lambda a, op: np.exp(_f32(a("x"))),
    "rsqrt": lambda a, op: 1.0 / np.sqrt(_f32(a("x")) + _f32(a("epsilon", 1e-12))),
    "relu": lambda a, op: np.maximum(_f32(a("x")), 0),
}


def _at(op: Op) -> str:
    return f" (MIL line {op.line})" if op.line else ""


def _const(type_, val, weights: dict, where: str):
    if isinstance(val, Blobfile):
        if val.path not in weights:
            raise FormatError(f"{where}: weight file {val.path!r} not given (have {sorted(weights)})")
        array = read_blob(weights[val.path], val.offset, type_.shape, where=f"{where} {val.path}")
        if array.dtype != np.dtype(NUMPY_DTYPES.get(type_.dtype, object)):
            raise FormatError(f"{where}: blob holds {array.dtype}, text declares {type_.text}")
        return array
    if isinstance(val, np.ndarray):
        return val.astype(NUMPY_DTYPES[type_.dtype])
    return NUMPY_DTYPES[type_.dtype](val) if type_.dtype in ("fp16", "fp32") else val


class AneSim:
    """Runs a Program (or MIL text) on NumPy with ANE-like fp16 rounding; same `run` API as the runtime."""

    name = "ane-sim"

    def __init__(self, hw_rules: bool = False):
        self.hw_rules = hw_rules

    def prepare(self, program, weights: dict | None = None) -> Program:
        """The sim's 'compile': parse, refuse unknown ops and, with hw_rules, matmul inner dimensions that are
        not a multiple of INNER_MULTIPLE and I/O under MIN_IO_BYTES."""
        return self._validate(program)

    def _validate(self, program) -> Program:
        program = parse(program) if isinstance(program, str) else program
        shapes = {v.name: v.type.shape for v in program.inputs} | {op.out.name: op.out.type.shape for op in program.ops}
        consts = {op.out.name: op.val for op in program.ops if op.op == "const"}
        for var in program.inputs:
            if var.type.dtype not in NUMPY_DTYPES:
                raise BackendError(f"ane-sim: input {var.name!r} has dtype {var.type.dtype}, which is not modelled")
        for op in program.ops:
            if op.op != "const" and op.op not in OPS:
                raise BackendError(f"ane-sim op {op.op} {op.name!r}: unknown op{_at(op)} (known: {', '.join(OPS)})")
            if op.out.type.dtype not in NUMPY_DTYPES and not (op.op == "const" and op.out.type.dtype == "string"):
                raise BackendError(f"ane-sim op {op.op} {op.name!r}: dtype {op.out.type.dtype} is not modelled{_at(op)}")
            if self.hw_rules and op.op == "matmul" and shapes.get(op.args.get("x")):
                x = shapes[op.args["x"]]
                tx = op.attrs.get("transpose_x", (None, consts.get(op.args.get("transpose_x"))))[1]
                inner = x[-2] if tx else x[-1]
                if inner % INNER_MULTIPLE:
                    raise BackendError(f"ane-sim op matmul {op.name!r}{_at(op)}: inner dimension {inner} is not a "
                                       f"multiple of {INNER_MULTIPLE} (the ANE is reported to return zeros): pad it")
        if self.hw_rules:
            for kind, var in [("input", v) for v in program.inputs] + [("output", v) for v in program.output_vars]:
                size = int(np.prod(var.type.shape or ())) * np.dtype(NUMPY_DTYPES[var.type.dtype]).itemsize
                if size < MIN_IO_BYTES:
                    raise BackendError(f"ane-sim: {kind} {var.name!r} {var.type.text} is {size} bytes; the ANE is "
                                       f"reported to fail on I/O surfaces under {MIN_IO_BYTES} bytes: pad it")
        return program

    def run(self, program, weights: dict, inputs: dict) -> dict:
        program, env = self._validate(program), {}
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
            return _const(op.out.type, op.val, weights, where)

        asked = set()

        def arg(key, default=_MISSING):
            asked.add(key)
            if key in op.attrs:
                return _const(*op.attrs[key], weights, where)
            if key not in op.args:
                if default is _MISSING:
                    raise FormatError(f"{where}: missing argument {key!r}{_at(op)}")
                return default
            names = op.args[key]
            for name in names if isinstance(names, tuple) else (names,):
                if name not in env:
                    raise FormatError(f"{where}: argument {key} = {name} is not defined before use{_at(op)}")
            return [env[n] for n in names] if isinstance(names, tuple) else env[names]

        try:
            result = np.asarray(OPS[op.op](arg, op))
        except (ValueError, IndexError, KeyError) as e:
            raise ShapeError(f"{where}: {e}{_at(op)}") from None
        except (BackendError, ShapeError) as e:
            raise type(e)(f"{where}: {e}{_at(op)}") from None
        unread = (set(op.args) | set(op.attrs)) - asked
        if unread:  # never ignore what a program says
            raise BackendError(f"{where}: argument {', '.join(sorted(unread))} is not modelled{_at(op)}")
        type_ = op.out.type
        if type_.shape is not None and result.shape != type_.shape:
            raise ShapeError(f"{where}: computes shape {result.shape}, text declares {type_.text}{_at(op)}")
        return result.astype(NUMPY_DTYPES[type_.dtype])  # the fp16 rounding the ANE does
