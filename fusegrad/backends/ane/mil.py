"""MIL text programs: the data structure, the printer, and a parser for MIL as Apple's tools write it.

The text is the dialect the ANE's in-memory compiler takes (see FORMATS.md and the seed):

    program(1.3)
    [buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, ...})]
    {
        func main<ios18>(tensor<fp32, [1, 8, 1, 4]> x) {
            string d1 = const()[name = string("d1"), val = string("fp16")];
            tensor<fp16, [1, 8, 1, 4]> x16 = cast(dtype = d1, x = x)[name = string("cx")];
        } -> (x16);
    }

The parser reads any whitespace (a whole program on one line too), `//` comments, both scalar
spellings (`string("x")` and the verbose `tensor<string, []>("x")` Apple's compiler writes; a rank-0
tensor is a scalar), attributes inside the brackets (`constexpr_*()[name = ..., scale = ...]`),
decimal, exponent and hex float literals (`0x1.8p-3`), and a function without a `<target>`.
Errors are FormatErrors that name the line. The printer writes one canonical layout, short or
verbose (`Program.verbose`), so `format_program(parse(t)) == t` for any printed text.

>>> p = parse('program(1.0){func main(tensor<fp32,[1,8,1,4]>x){}->(x);}')
>>> p.inputs[0].type.text, p.target
('tensor<fp32, [1, 8, 1, 4]>', '')
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from fusegrad.core.errors import FormatError

BUILD_INFO = (("coremlc-component-MIL", "3510.2.1"), ("coremlc-version", "3505.4.1"),
              ("coremltools-component-milinternal", ""), ("coremltools-version", "9.0"))
NUMPY_DTYPES = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
                "uint8": np.uint8, "uint16": np.uint16, "uint64": np.uint64, "bool": np.bool_}


@dataclass(frozen=True)
class MilType:
    """A MIL value type: `tensor<fp16, [1, 768, 1, 64]>` (shape a tuple) or a scalar `int32` (shape None)."""
    dtype: str
    shape: tuple | None = None

    @property
    def text(self) -> str:
        return self.spell(False)

    def spell(self, verbose: bool) -> str:
        if self.shape is None:
            return f"tensor<{self.dtype}, []>" if verbose else self.dtype
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
    """One statement. For `const`, `val` holds the value (str, bool, int, float, np.ndarray or Blobfile).
    `args` maps parameter -> var name (or a tuple of names); `attrs` maps the other bracket attributes
    (besides name and val) -> (MilType, value). `line` is where the parser found it (0: built)."""
    out: Var
    op: str
    name: str
    args: dict = field(default_factory=dict)
    val: object = None
    attrs: dict = field(default_factory=dict)
    line: int = 0

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
    verbose: bool = False  # scalars spelled tensor<string, []>("x") (what M1/M2 compilers accept)

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


def format_value(type_: MilType, val, verbose: bool = False) -> str:
    if isinstance(val, Blobfile):
        path, offset = MilType("string").spell(verbose), MilType("uint64").spell(verbose)
        return f'{type_.spell(verbose)}(BLOBFILE(path = {path}("{val.path}"), offset = {offset}({val.offset})))'
    if type_.dtype == "string":
        return f'{type_.spell(verbose)}("{val}")'
    if type_.shape is None:
        return f"{type_.spell(verbose)}({_scalar_text(type_.dtype, val)})"
    flat = np.asarray(val).reshape(-1)
    return f"{type_.text}([{', '.join(_scalar_text(type_.dtype, v) for v in flat)}])"


def format_op(op: Op, verbose: bool = False) -> str:
    attrs = [f'name = {format_value(MilType("string"), op.name, verbose)}']
    if op.op == "const":
        attrs.append(f"val = {format_value(op.out.type, op.val, verbose)}")
    attrs += [f"{k} = {format_value(t, v, verbose)}" for k, (t, v) in op.attrs.items()]
    args = ", ".join(f"{k} = ({', '.join(v)})" if isinstance(v, tuple) else f"{k} = {v}" for k, v in op.args.items())
    return f"{op.out.type.spell(verbose)} {op.out.name} = {op.op}({args})[{', '.join(attrs)}];"


def format_program(p: Program) -> str:
    info = ", ".join(f'{{"{k}", "{v}"}}' for k, v in p.build_info)
    s = MilType("string").spell(p.verbose)
    params = ", ".join(f"{v.type.spell(p.verbose)} {v.name}" for v in p.inputs)
    target = f"<{p.target}>" if p.target else ""
    lines = [f"program({p.version})"] + ([f"[buildInfo = dict<{s}, {s}>({{{info}}})]"] if p.build_info else [])
    lines += ["{", f"    func main{target}({params}) {{"]
    lines += ["        " + format_op(op, p.verbose) for op in p.ops]
    lines += [f"    }} -> ({', '.join(p.outputs)});", "}", ""]
    return "\n".join(lines)


# ---- parsing ------------------------------------------------------------------------------------
_TOKEN = re.compile(r"""(?P<skip>\s+|//[^\n]*)|(?P<str>"[^"\n]*")|(?P<arrow>->)
    |(?P<num>[-+]?(?:0[xX][\da-fA-F]*\.?[\da-fA-F]*(?:[pP][-+]?\d+)?|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?
                  |(?:inf|nan)(?!\w)))
    |(?P<name>[A-Za-z_][\w.]*)|(?P<punct>[()\[\]{}<>,=;])""", re.X)


def _tokens(text: str) -> list:
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise FormatError(f"MIL line {line}: cannot parse character {text[pos]!r}")
        if m.lastgroup != "skip":
            out.append((m.lastgroup, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    out.append(("end", "end of text", line))
    return out


def _number(dtype: str, text: str, line: int):
    try:
        if dtype == "bool":
            return {"true": True, "false": False}[text]
        if dtype in ("fp16", "fp32"):
            return float.fromhex(text) if "0x" in text.lower() else float(text)
        return int(text, 0)
    except (KeyError, ValueError):
        raise FormatError(f"MIL line {line}: bad {dtype} literal {text!r}") from None


class _Parser:
    def __init__(self, text: str):
        self.toks, self.i, self.verbose = _tokens(text), 0, False

    @property
    def line(self) -> int:
        return self.toks[self.i][2]

    def peek(self, k: int = 0) -> str:
        return self.toks[min(self.i + k, len(self.toks) - 1)][1]

    def take(self, *wants: str, what: str | None = None) -> str:
        """The next tokens, which must be the texts `wants`; returns the last."""
        for want in wants:
            text = self._next(lambda kind, t: t == want, what or repr(want))
        return text

    def grab(self, kinds: str, what: str) -> str:
        """The next token, which must be of a class in `kinds` (name, num, str)."""
        return self._next(lambda kind, t: kind in kinds.split(), what)

    def _next(self, ok, what: str) -> str:
        kind, text, line = self.toks[self.i]
        if not ok(kind, text):
            raise FormatError(f"MIL line {line}: cannot parse {what}: got {text!r}")
        self.i += 1
        return text

    def accept(self, text: str) -> bool:
        if self.peek() != text:
            return False
        self.i += 1
        return True

    def listing(self, item, close: str) -> list:
        """item, item, ... up to `close` (consumed)."""
        items = []
        while not self.accept(close):
            if items:
                self.take(",")
            items.append(item())
        return items

    def type(self) -> MilType:
        if self.peek() == "tensor" and self.peek(1) == "<":
            self.i += 2
            dtype = self.grab("name", "a dtype")
            self.take(",", "[")
            dims = self.listing(lambda: int(self.grab("num", "a fixed dimension")), "]")
            self.take(">")
            self.verbose |= not dims  # rank 0: the verbose spelling of a scalar
            return MilType(dtype, tuple(dims) if dims else None)
        return MilType(self.grab("name", "a type"))

    def value(self, expected: MilType | None, what: str):
        """TYPE(literal) -> (MilType, value); the type must be `expected` when given."""
        line, type_ = self.line, self.type()
        if expected is not None and type_ != expected:
            raise FormatError(f"MIL line {line}: {what} of type {type_.text} does not match declared type "
                              f"{expected.text}")
        self.take("(", what="'(' before a literal")
        if self.accept("BLOBFILE"):
            self.take("(")
            ref = dict(self.listing(lambda: self.attr(None), ")"))
            if set(ref) != {"path", "offset"}:
                raise FormatError(f"MIL line {line}: BLOBFILE needs path and offset, got {sorted(ref)}")
            val = Blobfile(ref["path"][1], int(ref["offset"][1]))
        elif type_.dtype == "string":
            val = self.grab("str", "a string literal")[1:-1]
        elif type_.shape is None:
            val = _number(type_.dtype, self.grab("num name", "a number"), line)
        else:
            self.take("[", what="'[' before a tensor literal")
            items = self.listing(lambda: self.grab("num name", "a number"), "]")
            values = [_number(type_.dtype, t, line) for t in items]
            if type_.dtype not in NUMPY_DTYPES or len(values) != int(np.prod(type_.shape)):
                raise FormatError(f"MIL line {line}: literal of {len(values)} values does not fit {type_.text}")
            val = np.array(values, NUMPY_DTYPES[type_.dtype]).reshape(type_.shape)
        self.take(")", what="')' after a literal")
        return type_, val

    def attr(self, expected):
        key = self.grab("name", "an attribute name")
        self.take("=", what=f"'=' after {key}")
        return key, self.value(expected, key)

    def arg(self):
        key = self.grab("name", "an argument name")
        self.take("=", what=f"'=' after {key}")
        if self.accept("("):
            return key, tuple(self.listing(lambda: self.grab("name", "a variable name"), ")"))
        return key, self.grab("name", f"argument {key}: a variable name")

    def statement(self) -> Op:
        line, type_ = self.line, self.type()
        out = Var(self.grab("name", "the variable a statement defines"), type_)
        self.take("=", what=f"'=' after {out.name}")
        opname = self.grab("name", "an op name")
        self.take("(", what=f"'(' after {opname}")
        args = dict(self.listing(self.arg, ")"))
        self.take("[", what=f"'[name = ...]' after {opname}(...)")
        attrs = dict(self.listing(lambda: self.attr(type_ if self.peek() == "val" else None), "]"))
        self.take(";", what="';' after a statement")
        if "name" not in attrs:
            raise FormatError(f"MIL line {line}: op {opname} has no name attribute")
        name, val = attrs.pop("name")[1], attrs.pop("val", (None, None))[1]
        if opname == "const" and val is None:
            raise FormatError(f"MIL line {line}: const {name!r} without val")
        return Op(out, opname, name, args, val, attrs, line)

    def program(self) -> Program:
        self.take("program", what="the header 'program(<version>)'")
        version = self.take("(") and self.grab("num", "the program version")
        self.take(")")
        info = ()
        if self.accept("["):
            self.take("buildInfo", "=")
            while self.peek() not in ("(", "end of text"):  # dict<string, string> in either spelling
                self.i += 1
            self.take("(", "{")
            info = tuple(self.listing(self.pair, "}"))
            self.take(")", "]")
        self.take("{", what="'{' opening the program body")
        if self.peek() == "}":
            raise FormatError(f"MIL line {self.line}: the program has only an empty body, no func")
        self.take("func")
        self.grab("name", "the function name")
        target = self.grab("name", "the target") if self.accept("<") else ""
        self.take(*([">", "("] if target else ["("]))
        inputs = self.listing(self.param, ")")
        self.take("{", what="'{' opening the function body")
        ops = []
        while not self.accept("}"):
            ops.append(self.statement())
        self.take("->", what="the function's outputs '-> (...);'")
        outputs = self.take("(") and self.listing(lambda: self.grab("name", "an output name"), ")")
        self.take(";")
        if self.peek() == "func":
            raise FormatError(f"MIL line {self.line}: cannot parse more than one function (ane-sim runs main only)")
        self.take("}", "end of text", what="'}' closing the program")
        return Program(inputs, ops, outputs, version, target, info, self.verbose)

    def param(self) -> Var:
        type_ = self.type()
        return Var(self.grab("name", "a parameter name"), type_)

    def pair(self):
        k = self.take("{") and self.grab("str", "a buildInfo key")[1:-1]
        v = self.take(",") and self.grab("str", "a buildInfo value")[1:-1]
        self.take("}")
        return k, v


def parse(text: str) -> Program:
    """Read MIL text (printed by `format_program`, or written by Apple's tools or by hand) into a Program."""
    return _Parser(text).program()
