"""MilBuilder: write MIL programs op by op, with shape inference, named consts and BLOBFILE weights.

Small consts (conv params, axes, dtypes) are declared once and reused, like the seed's `pt`, `st`, `pd`.

Two dialects (`DIALECTS`): "m3" (M3 and later, the seed's spelling: `string("x")`, all weights as
blobs of one MILBlob file `@model_path/weights/w.bin`) and "m1" for the M1/M2 compilers, which are
reported to reject `string("x")` and several weights at different offsets of one file: the verbose
spelling `tensor<string, []>("x")` and one file per weight (`@model_path/weights/<name>.bin`).

>>> import numpy as np
>>> b = MilBuilder()
>>> x = b.input("x", (1, 4, 1, 2))                  # fp32 in, like the seed
>>> y = b.conv(b.cast(x, "fp16"), b.weight("W", np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1)))
>>> program, weights = b.build([b.cast(y, "fp32", name="y")])
>>> y.type.text, list(weights)
('tensor<fp16, [1, 4, 1, 2]>', ['@model_path/weights/w.bin'])
"""
from __future__ import annotations

import functools
import re

import numpy as np

from fusegrad.backends.ane.blob import BlobWriter
from fusegrad.backends.ane.mil import Blobfile, MilType, Op, Program, Var
from fusegrad.core.errors import ConfigError, ShapeError

WEIGHTS_FILE = "@model_path/weights/w.bin"
DIALECTS = ("m3", "m1")


def broadcast_shape(op: str, a: tuple, b: tuple) -> tuple:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        raise ShapeError(f"MIL {op}: shapes {a} and {b} do not broadcast") from None


class MilBuilder:
    def __init__(self, target: str = "ios18", dialect: str = "m3"):
        if dialect not in DIALECTS:
            raise ConfigError(f"MIL dialect {dialect!r}: choose one of {', '.join(DIALECTS)}")
        self.target, self.dialect = target, dialect
        self.inputs, self.ops = [], []
        self._names = set()
        self._consts = {}  # (role, type, value) -> Var, so a repeated small const is declared once
        self._blobs = {}  # weight file path -> BlobWriter

    # ---- naming and consts ----------------------------------------------------------------------
    def _fresh(self, base: str) -> str:
        if not re.fullmatch(r"[A-Za-z_]\w*", base):
            raise ShapeError(f"MIL: {base!r} is not a valid identifier (letters, digits, _; no leading digit)")
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}_{n}"
        self._names.add(name)
        return name

    def _emit(self, op: str, dtype: str, shape, args: dict, name: str | None) -> Var:
        out = Var(self._fresh(name or op), MilType(dtype, None if shape is None else tuple(int(d) for d in shape)))
        self.ops.append(Op(out, op, out.name, args))
        return out

    def input(self, name: str, shape, dtype: str = "fp32") -> Var:
        var = Var(self._fresh(name), MilType(dtype, tuple(shape)))
        self.inputs.append(var)
        return var

    def const(self, value, dtype: str | None = None, name: str = "c") -> Var:
        """A named small const: str -> string, bool, int -> int32, float -> fp16 (or `dtype`), list -> tensor."""
        if isinstance(value, str):
            type_ = MilType("string")
        elif isinstance(value, bool):
            type_ = MilType("bool")
        elif isinstance(value, int):
            type_ = MilType(dtype or "int32")
        elif isinstance(value, float):
            type_ = MilType(dtype or "fp16")
            value = float(np.float16(value)) if type_.dtype == "fp16" else value  # print what the ANE uses
        else:
            arr = np.asarray(value)
            type_ = MilType(dtype or ("int32" if arr.dtype.kind in "iu" else "fp16"), arr.shape)
            value = arr
        key = (name, type_.text, repr(value.tolist() if isinstance(value, np.ndarray) else value))
        if key not in self._consts:
            out = Var(self._fresh(name), type_)
            self.ops.append(Op(out, "const", out.name, val=value))
            self._consts[key] = out
        return self._consts[key]

    def weight(self, name: str, array: np.ndarray, dtype: str = "fp16") -> Var:
        """A BLOBFILE const holding `array` (rounded to fp16 by default), in the dialect's weight file."""
        data = np.asarray(array, {"fp16": np.float16, "fp32": np.float32}[dtype])
        out = Var(self._fresh(name), MilType(dtype, data.shape))
        path = WEIGHTS_FILE if self.dialect == "m3" else f"@model_path/weights/{out.name}.bin"
        offset = self._blobs.setdefault(path, BlobWriter()).add(data)
        self.ops.append(Op(out, "const", out.name, val=Blobfile(path, offset)))
        return out

    def rename(self, var: Var, name: str) -> Var:
        """Give the value `var` (an op's output, not used yet) the name `name`."""
        op = next(op for op in self.ops if op.out == var)
        op.out = Var(self._fresh(name), var.type)
        return op.out

    # ---- ops (argument order follows the seed / coremltools printing) ---------------------------
    def cast(self, x: Var, dtype: str, name: str | None = None) -> Var:
        return self._emit("cast", dtype, x.type.shape, {"dtype": self.const(dtype, name="to_" + dtype).name,
                                                       "x": x.name}, name)

    def conv(self, x: Var, weight: Var, groups: int = 1, name: str | None = None) -> Var:
        """1x1 conv, pad_type valid: x (1, IC, 1, S), weight (OC, IC/groups, 1, 1) -> (1, OC, 1, S)."""
        (n, ic, h, s), (oc, wic, kh, kw) = x.type.shape, weight.type.shape
        if (kh, kw) != (1, 1) or wic * groups != ic or oc % groups:
            raise ShapeError(f"MIL conv {name or 'conv'}: weight {weight.type.shape} with groups {groups} "
                             f"does not fit x {x.type.shape} (1x1 kernels only)")
        args = {"dilations": self.const([1, 1], name="dl").name, "groups": self.const(groups, name="gr").name,
                "pad": self.const([0, 0, 0, 0], name="pd").name, "pad_type": self.const("valid", name="pt").name,
                "strides": self.const([1, 1], name="st").name, "weight": weight.name, "x": x.name}
        return self._emit("conv", x.type.dtype, (n, oc, h, s), args, name)

    def matmul(self, x: Var, y: Var, transpose_x: bool = False, transpose_y: bool = False,
               name: str | None = None) -> Var:
        a, b = list(x.type.shape), list(y.type.shape)
        if transpose_x:
            a[-1], a[-2] = a[-2], a[-1]
        if transpose_y:
            b[-1], b[-2] = b[-2], b[-1]
        if a[-1] != b[-2]:
            raise ShapeError(f"MIL matmul {name or 'matmul'}: inner dims differ: {tuple(a)} @ {tuple(b)}")
        shape = broadcast_shape("matmul", tuple(a[:-2]), tuple(b[:-2])) + (a[-2], b[-1])
        args = {"transpose_x": self.const(transpose_x, name="tx" if transpose_x else "fx").name,
                "transpose_y": self.const(transpose_y, name="ty" if transpose_y else "fy").name,
                "x": x.name, "y": y.name}
        return self._emit("matmul", x.type.dtype, shape, args, name)

    def slice_by_size(self, x: Var, begin, size, name: str | None = None) -> Var:
        shape = x.type.shape
        if len(begin) != len(shape) or len(size) != len(shape) or any(
                b < 0 or b + s > d for b, s, d in zip(begin, size, shape)):
            raise ShapeError(f"MIL slice_by_size {name or 'slice'}: begin {list(begin)} size {list(size)} "
                             f"outside {shape}")
        args = {"x": x.name, "begin": self.const(list(begin), name="b").name,
                "size": self.const(list(size), name="s").name}
        return self._emit("slice_by_size", x.type.dtype, size, args, name)

    def reshape(self, x: Var, shape, name: str | None = None) -> Var:
        if int(np.prod(shape)) != int(np.prod(x.type.shape)):
            raise ShapeError(f"MIL reshape {name or 'reshape'}: {x.type.shape} cannot become {tuple(shape)}")
        return self._emit("reshape", x.type.dtype, shape, {"shape": self.const(list(shape), name="sh").name,
                                                          "x": x.name}, name)

    def transpose(self, x: Var, perm, name: str | None = None) -> Var:
        shape = tuple(x.type.shape[p] for p in perm)
        return self._emit("transpose", x.type.dtype, shape, {"perm": self.const(list(perm), name="pm").name,
                                                            "x": x.name}, name)

    def concat(self, values: list, axis: int, interleave: bool = False, name: str | None = None) -> Var:
        first = values[0].type.shape
        axis_n = axis % len(first)
        if any(len(v.type.shape) != len(first) or any(d != e for i, (d, e) in enumerate(zip(v.type.shape, first))
                                                      if i != axis_n) for v in values):
            raise ShapeError(f"MIL concat {name or 'concat'}: shapes {[v.type.shape for v in values]} "
                             f"differ off axis {axis}")
        shape = list(first)
        shape[axis_n] = sum(v.type.shape[axis_n] for v in values)
        args = {"axis": self.const(axis, name="ax").name, "interleave": self.const(interleave, name="il").name,
                "values": tuple(v.name for v in values)}
        return self._emit("concat", values[0].type.dtype, shape, args, name)

    def softmax(self, x: Var, axis: int = -1, name: str | None = None) -> Var:
        return self._emit("softmax", x.type.dtype, x.type.shape, {"axis": self.const(axis, name="ax").name,
                                                                 "x": x.name}, name)

    def reduce_sum(self, x: Var, axes, keep_dims: bool = True, name: str | None = None) -> Var:
        axes_n = [a % len(x.type.shape) for a in axes]
        shape = [1 if i in axes_n else d for i, d in enumerate(x.type.shape) if keep_dims or i not in axes_n]
        args = {"axes": self.const(list(axes), name="rax").name, "keep_dims": self.const(keep_dims, name="kd").name,
                "x": x.name}
        return self._emit("reduce_sum", x.type.dtype, shape, args, name)

    def _binary(self, op: str, x: Var, y, name: str | None = None) -> Var:
        if not isinstance(y, Var):
            y = self.const(float(y), dtype=x.type.dtype, name=op[0] + "k")
        shape = broadcast_shape(op, x.type.shape, y.type.shape or ())
        return self._emit(op, x.type.dtype, shape, {"x": x.name, "y": y.name}, name)

    # x (op) y, y a Var or a number: add(x, y, name=None) and so on
    add = functools.partialmethod(_binary, "add")
    sub = functools.partialmethod(_binary, "sub")
    mul = functools.partialmethod(_binary, "mul")
    pow = functools.partialmethod(_binary, "pow")

    def sigmoid(self, x: Var, name: str | None = None) -> Var:
        return self._emit("sigmoid", x.type.dtype, x.type.shape, {"x": x.name}, name)

    def build(self, outputs: list):
        """(Program, weights) where weights maps each BLOBFILE path to the file's bytes."""
        program = Program(list(self.inputs), list(self.ops), [v.name for v in outputs], target=self.target,
                          verbose=self.dialect == "m1")
        return program, {path: blob.to_bytes() for path, blob in self._blobs.items()}
