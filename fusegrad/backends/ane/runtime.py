"""The real ANE: compile MIL text + weights through AppleNeuralEngine.framework, run on IOSurfaces.

`AneRuntime().run(program, weights, inputs)` has the same signature and result as `AneSim().run`.
Compiled kernels are cached by a hash of (MIL text, weights), and every compile is charged to a
per-process `CompileBudget`: the ANE compiler fails after ~119 compiles in one process (a leak), so
the budget stops at 100 with an error that says what to do, instead of a cryptic framework failure.
The budget and cache are plain Python and are tested on Linux with a fake compiler.

>>> ok, reason = available()
>>> isinstance(ok, bool) and isinstance(reason, str)
True
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from ctypes import c_uint, c_void_p

import numpy as np

from fusegrad.backends.ane.mil import NUMPY_DTYPES, format_program, parse
from fusegrad.backends.ane.objc import Objc, load_library
from fusegrad.core.errors import BackendError, ShapeError

FRAMEWORK = "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine"
QOS = 21
COMPILE_LIMIT = 119  # compiles per process before the compiler fails (maderix/ANE, M4)
DEFAULT_BUDGET = 100
MODEL_PREFIX = "@model_path/"
_AVAILABLE = []


def available() -> tuple:
    """(True, "") when the ANE private API can be used here, else (False, why)."""
    if not _AVAILABLE:
        _AVAILABLE.append(_probe())
    return _AVAILABLE[0]


def _probe() -> tuple:
    hint = "use --backend ane-sim to run the same kernels in the fp16 simulator"
    if sys.platform != "darwin":
        return False, f"the Apple Neural Engine needs macOS on Apple Silicon, this is {sys.platform}; {hint}"
    if platform.machine() != "arm64":
        return False, f"the Apple Neural Engine needs Apple Silicon, this Mac is {platform.machine()}; {hint}"
    try:
        ObjcAneCompiler()
    except BackendError as e:
        return False, f"{e}; {hint}"
    return True, ""


@functools.lru_cache(maxsize=1)
def chip_name() -> str:
    """This machine's chip, e.g. "Apple M1 Pro" (`sysctl machdep.cpu.brand_string` on macOS)."""
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"
    return platform.processor() or platform.machine() or "unknown"


def dialect_for(chip: str) -> str:
    """The MIL dialect for a chip: "m1" for Apple M1/M2 (their compilers are reported to reject string("x")
    and cast), "m3" for everything else (M3 and later, and ane-sim)."""
    return "m1" if re.match(r"Apple M[12]\b", chip) else "m3"


def program_key(text: str, weights: dict) -> str:
    """sha256 of the MIL text and every weight file (path and bytes): the compiled-kernel cache key."""
    h = hashlib.sha256(text.encode())
    for path in sorted(weights):
        h.update(path.encode() + b"\0" + len(weights[path]).to_bytes(8, "little") + bytes(weights[path]))
    return h.hexdigest()


class CompileBudget:
    """Counts compiles in this process and refuses the one that would pass `limit`."""

    def __init__(self, limit: int = DEFAULT_BUDGET):
        if not 0 < limit <= COMPILE_LIMIT:
            raise ValueError(f"compile budget {limit} must be in 1..{COMPILE_LIMIT} (the ANE per-process limit)")
        self.limit, self.used = limit, 0

    @property
    def remaining(self) -> int:
        return self.limit - self.used

    def spend(self, what: str) -> None:
        if self.used >= self.limit:
            raise BackendError(
                f"ANE compile budget exhausted: {self.used} of {self.limit} compiles used, cannot compile {what}. "
                f"The ANE compiler fails after ~{COMPILE_LIMIT} compiles per process; use the *_dynamic kernels "
                f"(weights in the input, compiled once) or restart the process")
        self.used += 1


PROCESS_BUDGET = CompileBudget()


class AneRuntime:
    """Kernel runner on the real ANE. `compiler` defaults to the ctypes one (macOS only); tests pass a
    fake with the same three methods: compile(text, weights) -> handle, evaluate(handle, arrays,
    output types) -> arrays, unload(handle)."""

    name = "ane"

    def __init__(self, compiler=None, budget: CompileBudget | None = None):
        if compiler is None:
            ok, reason = available()
            if not ok:
                raise BackendError(f"ANE backend unavailable: {reason}")
            compiler = ObjcAneCompiler()
        self.compiler = compiler
        self.budget = budget if budget is not None else PROCESS_BUDGET
        self._cache = {}  # program_key -> (compiled handle, parsed program)

    def prepare(self, program, weights: dict) -> str:
        """Compile (or find in the cache) and return the cache key."""
        text = program if isinstance(program, str) else format_program(program)
        key = program_key(text, weights)
        if key not in self._cache:
            parsed = parse(text)
            self.budget.spend(f"program {key[:12]} ({len(parsed.ops)} ops)")
            self._cache[key] = (self.compiler.compile(text, weights), parsed)
        return key

    def run(self, program, weights: dict, inputs: dict) -> dict:
        handle, parsed = self._cache[self.prepare(program, weights)]
        arrays = []
        for var in parsed.inputs:
            if var.name not in inputs:
                raise ShapeError(f"ANE: missing input {var.name!r} {var.type.text}")
            value = np.asarray(inputs[var.name])
            if value.shape != var.type.shape:
                raise ShapeError(f"ANE: input {var.name!r} has shape {value.shape}, program wants {var.type.text}")
            arrays.append(np.ascontiguousarray(value, NUMPY_DTYPES[var.type.dtype]))
        outputs = self.compiler.evaluate(handle, arrays, [v.type for v in parsed.output_vars])
        return dict(zip(parsed.outputs, outputs))

    @property
    def cached(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        """Unload every compiled kernel (they stay charged to the budget: the leak is per compile)."""
        while self._cache:
            _, (handle, _) = self._cache.popitem()
            self.compiler.unload(handle)


class _Model:
    def __init__(self, model, directory):
        self.model, self.directory = model, directory
        self.surfaces, self.request, self.sizes = [], None, None


def _atomic_write(path: str, payload: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ObjcAneCompiler:
    """The calls the seed makes, through ctypes: descriptor -> model -> compile -> load -> evaluate."""

    def __init__(self):
        self.objc = Objc()
        load_library(FRAMEWORK)
        self.descriptor_cls = self.objc.cls("_ANEInMemoryModelDescriptor")
        self.model_cls = self.objc.cls("_ANEInMemoryModel")
        self.request_cls = self.objc.cls("_ANERequest")
        self.surface_cls = self.objc.cls("_ANEIOSurfaceObject")

    def compile(self, text: str, weights: dict) -> _Model:
        o = self.objc
        pool = o.pool_push()
        try:
            mil = o.data(text.encode())
            blobs = o.dictionary({o.string(path): o.dictionary({o.string("offset"): o.number(0),
                                                                o.string("data"): o.data(payload)})
                                  for path, payload in weights.items()})
            desc = o.send(self.descriptor_cls, "modelWithMILText:weights:optionsPlist:", mil, blobs, None,
                          argtypes=[c_void_p] * 3)
            if not desc:
                raise BackendError("ANE: _ANEInMemoryModelDescriptor returned nil for the MIL text (malformed program?)")
            model = o.send(self.model_cls, "inMemoryModelWithDescriptor:", desc, argtypes=[c_void_p])
            if not model:
                raise BackendError("ANE: _ANEInMemoryModel inMemoryModelWithDescriptor: returned nil")
            o.retain(model)
            handle = _Model(model, os.path.join(o.temporary_directory(), o.to_str(o.send(model, "hexStringIdentifier"))))
            self._write_files(handle.directory, text, weights)
            for step in ("compileWithQoS:options:error:", "loadWithQoS:options:error:"):
                ok, why = o.call_with_error(model, step, QOS, o.dictionary({}), argtypes=[c_uint, c_void_p])
                if not ok:
                    self.unload(handle)
                    raise BackendError(f"ANE {step.split('With')[0]} failed: {why}")
            return handle
        finally:
            o.pool_pop(pool)

    @staticmethod
    def _write_files(directory: str, text: str, weights: dict) -> None:
        os.makedirs(os.path.join(directory, "weights"), exist_ok=True)
        _atomic_write(os.path.join(directory, "model.mil"), text.encode())
        for path, payload in weights.items():
            if not path.startswith(MODEL_PREFIX):
                raise BackendError(f"ANE: weight path {path!r} must start with {MODEL_PREFIX}")
            _atomic_write(os.path.join(directory, path[len(MODEL_PREFIX):]), bytes(payload))

    def _request(self, handle: _Model, sizes: list, n_inputs: int) -> None:
        """IOSurfaces for every input and output, wrapped in one retained _ANERequest (built once)."""
        o = self.objc
        handle.surfaces = [o.surface(n) for n in sizes]
        handle.sizes = sizes
        pool = o.pool_push()
        try:
            wrapped = [o.send(self.surface_cls, "objectWithIOSurface:", s, argtypes=[c_void_p]) for s in handle.surfaces]
            n_outputs = len(sizes) - n_inputs
            request = o.send(self.request_cls,
                             "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",
                             o.array(wrapped[:n_inputs]), o.array([o.number(i) for i in range(n_inputs)]),
                             o.array(wrapped[n_inputs:]), o.array([o.number(i) for i in range(n_outputs)]),
                             None, None, o.number(0), argtypes=[c_void_p] * 7)
            if not request:
                raise BackendError("ANE: _ANERequest returned nil")
            handle.request = o.retain(request)
        finally:
            o.pool_pop(pool)

    def evaluate(self, handle: _Model, arrays: list, output_types: list) -> list:
        o = self.objc
        out_dtypes = [np.dtype(NUMPY_DTYPES[t.dtype]) for t in output_types]
        sizes = [a.nbytes for a in arrays] + [int(np.prod(t.shape)) * d.itemsize for t, d in zip(output_types, out_dtypes)]
        if handle.request is None:
            self._request(handle, sizes, len(arrays))
        for surface, array in zip(handle.surfaces, arrays):
            o.surface_write(surface, array.tobytes())  # channel-first: element (c, s) at c*S + s
        pool = o.pool_push()
        try:
            ok, why = o.call_with_error(handle.model, "evaluateWithQoS:options:request:error:", QOS,
                                        o.dictionary({}), handle.request, argtypes=[c_uint, c_void_p, c_void_p])
        finally:
            o.pool_pop(pool)
        if not ok:
            raise BackendError(f"ANE evaluate failed: {why}")
        outs = handle.surfaces[len(arrays):]
        return [np.frombuffer(o.surface_read(s, n), d).reshape(t.shape).copy()
                for s, n, d, t in zip(outs, sizes[len(arrays):], out_dtypes, output_types)]

    def unload(self, handle: _Model) -> None:
        o = self.objc
        pool = o.pool_push()
        try:
            o.call_with_error(handle.model, "unloadWithQoS:error:", QOS, argtypes=[c_uint])
        finally:
            o.pool_pop(pool)
        o.release(handle.request)
        o.release(handle.model)
        for surface in handle.surfaces:
            o.cf_release(surface)
        handle.surfaces, handle.request = [], None
        shutil.rmtree(handle.directory, ignore_errors=True)
