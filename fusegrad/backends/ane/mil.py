"""MIL text programs: the data structure, the printer, and a parser that reads the printed text back.

The text is the dialect the ANE's in-memory compiler takes (see FORMATS.md and the seed):

    program(1.3)
    [buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, ...})]
    {
        func main<ios18>(tensor<fp32, [1, 8, 1, 4]> x) {
            string d1 = const()[name = string("d1"), val = string("fp16")];
            tensor<fp16, [1, 8, 1, 4]> x16 = cast(dtype = d1, x = x)[name = string("cx")];
        } -> (x16);
    }

`parse(format_program(p)) == p` and `format_program(parse(text)) == text` for any printed text.

>>> p = parse(format_program(Program(inputs=[Var("x", MilType("fp32", (1, 8, 1, 4)))], ops=[], outputs=["x"])))
>>> p.inputs[0].type.text
'tensor<fp32, [1, 8, 1, 4]>'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from fusegrad.core.errors import FormatError

BUILD_INFO = (("coremlc-component-MIL", "3510.2.1"), ("coremlc-version", "3505.4.1"),
              ("coremltools-component-milinternal", ""), ("coremltools-version", "9.0"))
NUMPY_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int8": np.int8,
                "uint8": np.uint8, "bool": np.bool_}


@dataclass(frozen=True)
class MilType:
    """A MIL value type: `tensor<fp16, [1, 768, 1, 64]>` (shape a tuple) or a scalar `int32` (shape None)."""
    dtype: str
    shape: tuple | None = None

    @property
    def text(self) -> str:
        if self.shape is None:
            return self.dtype
        return f"tensor<{self.dtype}, [{', '.join(str(d) for d in self.shape)}]>"


@dataclass(frozen=True)
class Var:
    name: str
    type: MilType


@dataclass(frozen=True)
class Blobfile:
    """A const's value stored in a weight file: `BLOBFILE(path = string(path), offset = uint64(offset))`."""
    path: str
    offset: int


@dataclass
class Op:
    """One statement. For `const`, `val` holds the value (str, bool, int, float, np.ndarray or Blobfile)
    and `args` is empty; otherwise `args` maps parameter -> var name (or a tuple of names)."""
    out: Var
    op: str
    name: str
    args: dict = field(default_factory=dict)
    val: object = None

    def __eq__(self, other):
        return isinstance(other, Op) and format_op(self) == format_op(other)


@dataclass
class Program:
    inputs: list
    ops: list
    outputs: list
    version: str = "1.3"
    target: str = "ios18"
    build_info: tuple = BUILD_INFO

    def __eq__(self, other):
        return isinstance(other, Program) and format_program(self) == format_program(other)

    @property
    def output_vars(self) -> list:
        by_name = {v.name: v for v in self.inputs} | {op.out.name: op.out for op in self.ops}
        return [by_name[name] for name in self.outputs]


# ---- printing -----------------------------------------------------------------------------------
def _scalar_text(dtype: str, v) -> str:
    if dtype == "bool":
        return "true" if v else "false"
    if dtype in ("fp16", "fp32"):
        return repr(float(v))
    return str(int(v))


def format_value(type_: MilType, val) -> str:
    if isinstance(val, Blobfile):
        return f'{type_.text}(BLOBFILE(path = string("{val.path}"), offset = uint64({val.offset})))'
    if type_.dtype == "string":
        return f'string("{val}")'
    if type_.shape is None:
        return f"{type_.dtype}({_scalar_text(type_.dtype, val)})"
    flat = np.asarray(val).reshape(-1)
    return f"{type_.text}([{', '.join(_scalar_text(type_.dtype, v) for v in flat)}])"


def format_op(op: Op) -> str:
    if op.op == "const":
        return (f'{op.out.type.text} {op.out.name} = const()[name = string("{op.name}"), '
                f'val = {format_value(op.out.type, op.val)}];')
    args = ", ".join(f"{k} = ({', '.join(v)})" if isinstance(v, tuple) else f"{k} = {v}"
                     for k, v in op.args.items())
    return f'{op.out.type.text} {op.out.name} = {op.op}({args})[name = string("{op.name}")];'


def format_program(p: Program) -> str:
    info = ", ".join(f'{{"{k}", "{v}"}}' for k, v in p.build_info)
    params = ", ".join(f"{v.type.text} {v.name}" for v in p.inputs)
    lines = [f"program({p.version})", f"[buildInfo = dict<string, string>({{{info}}})]", "{",
             f"    func main<{p.target}>({params}) {{"]
    lines += ["        " + format_op(op) for op in p.ops]
    lines += [f"    }} -> ({', '.join(p.outputs)});", "}", ""]
    return "\n".join(lines)


# ---- parsing ------------------------------------------------------------------------------------
_TYPE = r"tensor<\w+, \[[-\d, ]*\]>|\w+"
_RE_TYPE = re.compile(r"tensor<(\w+), \[([-\d, ]*)\]>|(\w+)$")
_RE_HEADER = re.compile(r"program\(([\d.]+)\)$")
_RE_INFO = re.compile(r'\{"([^"]*)", "([^"]*)"\}')
_RE_FUNC = re.compile(r"func main<(\w+)>\((.*)\) \{$")
_RE_PARAM = re.compile(rf"({_TYPE}) (\w+)$")
_RE_RETURN = re.compile(r"\} -> \(([\w, ]*)\);$")
_RE_STMT = re.compile(rf"({_TYPE}) (\w+) = (\w+)\((.*)\)\[name = string\(\"([^\"]*)\"\)(?:, val = (.*))?\];$")
_RE_BLOB = re.compile(r'BLOBFILE\(path = string\("([^"]*)"\), offset = uint64\((\d+)\)\)$')


def parse_type(text: str) -> MilType:
    m = _RE_TYPE.match(text.strip())
    if not m:
        raise FormatError(f"MIL: cannot read type {text!r}")
    if m.group(3):
        return MilType(m.group(3))
    dims = m.group(2).strip()
    return MilType(m.group(1), tuple(int(d) for d in dims.split(",")) if dims else ())


def _parse_scalar(dtype: str, text: str):
    if dtype == "bool":
        if text not in ("true", "false"):
            raise FormatError(f"MIL: bad bool literal {text!r}")
        return text == "true"
    if dtype in ("fp16", "fp32"):
        return float.fromhex(text) if "0x" in text else float(text)
    return int(text)


def parse_value(type_: MilType, text: str, where: str):
    if type_.dtype == "string":
        m = re.fullmatch(r'string\("([^"]*)"\)', text)
        if not m:
            raise FormatError(f"MIL {where}: bad string value {text!r}")
        return m.group(1)
    m = re.fullmatch(r"(" + _TYPE + r")\((.*)\)", text)
    if not m or parse_type(m.group(1)) != type_:
        raise FormatError(f"MIL {where}: value {text!r} does not match declared type {type_.text}")
    body = m.group(2)
    blob = _RE_BLOB.match(body)
    if blob:
        return Blobfile(blob.group(1), int(blob.group(2)))
    if type_.shape is None:
        return _parse_scalar(type_.dtype, body)
    items = body.strip("[]").split(",") if body.strip("[]").strip() else []
    values = [_parse_scalar(type_.dtype, s.strip()) for s in items]
    try:
        return np.array(values, NUMPY_DTYPES[type_.dtype]).reshape(type_.shape)
    except (KeyError, ValueError) as e:
        raise FormatError(f"MIL {where}: literal of {len(values)} values does not fit {type_.text}: {e}") from None


def _split_top(text: str) -> list:
    """Split on commas that are not inside (), [] or <>."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "([<"
        depth -= ch in ")]>"
        if ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        parts.append(text[start:].strip())
    return parts


def _parse_args(text: str, where: str) -> dict:
    args = {}
    for part in _split_top(text):
        key, sep, value = part.partition(" = ")
        if not sep:
            raise FormatError(f"MIL {where}: bad argument {part!r}")
        if value.startswith("("):
            args[key] = tuple(s.strip() for s in value[1:-1].split(","))
        else:
            args[key] = value
    return args


def parse(text: str) -> Program:
    """Read MIL text (as printed by `format_program`, or hand-written in the same style) into a Program."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 5:
        raise FormatError(f"MIL: program has only {len(lines)} lines")
    m = _RE_HEADER.match(lines[0])
    if not m:
        raise FormatError(f"MIL line 1: expected 'program(<version>)', got {lines[0]!r}")
    version = m.group(1)
    build_info = tuple(_RE_INFO.findall(lines[1])) if lines[1].startswith("[buildInfo") else ()
    body = lines[2:] if build_info else lines[1:]
    if body[0] != "{" or body[-1] != "}":
        raise FormatError("MIL: program body must be enclosed in '{' ... '}'")
    m = _RE_FUNC.match(body[1])
    if not m:
        raise FormatError(f"MIL: expected 'func main<target>(...) {{', got {body[1]!r}")
    target, inputs = m.group(1), []
    for param in _split_top(m.group(2)):
        pm = _RE_PARAM.match(param)
        if not pm:
            raise FormatError(f"MIL: bad function parameter {param!r}")
        inputs.append(Var(pm.group(2), parse_type(pm.group(1))))
    m = _RE_RETURN.match(body[-2])
    if not m:
        raise FormatError(f"MIL: expected '}} -> (outputs);', got {body[-2]!r}")
    outputs = [s.strip() for s in m.group(1).split(",")]
    ops = []
    for line in body[2:-2]:
        sm = _RE_STMT.match(line)
        if not sm:
            raise FormatError(f"MIL: cannot parse statement {line!r}")
        type_text, out, opname, args, name, val = sm.groups()
        out_var, where = Var(out, parse_type(type_text)), f"op {opname} {name!r}"
        if opname == "const":
            if val is None:
                raise FormatError(f"MIL {where}: const without val")
            ops.append(Op(out_var, "const", name, val=parse_value(out_var.type, val, where)))
        else:
            ops.append(Op(out_var, opname, name, _parse_args(args, where)))
    return Program(inputs, ops, outputs, version, target, build_info)
