"""Data parallel over worker processes on one machine, through shared memory: no MPI needed.

The model's weights (frozen ones too) and any extra tensors of the run (LoRA adapters, a classifier head) move
into one shared-memory block. Each helper process (a fresh interpreter) builds the same model over that block,
with the same adapters attached by a `setup` function and any quantized bases (`model.quantized`, sent once), so it
always computes with the weights the optimizer last wrote; it owns a shared grad block of the trainable tensors
only (for LoRA: tiny). Per micro-batch the work is split into slices: the main process runs the first and
helper k the (k+1)-th, each process on ONE core (one OpenBLAS thread, one numba thread); the helpers' grads are
then added into the run's. A slice is the arguments of a module-level generator function `fn(model, extras,
*args)` that yields scalar loss Tensors (each one's backward runs before the next is built), so pretraining's
mean loss and fine-tuning's masked / classification losses travel the same way. Why: on a small CPU, splitting
every GEMM and kernel of a step over all cores loses time to the split, and whole slices per core do not
(measured in docs/performance.md).

>>> import numpy as np
>>> from fusegrad.models import Llama
>>> model = Llama.from_preset("tiny", seed=0)
>>> with ProcessDataParallel(model, workers=2) as dp:
...     loss = dp.loss_backward(np.random.default_rng(0).integers(0, 64, (4, 9)))
>>> model.params["norm"].grad.shape
(32,)
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
import weakref
from multiprocessing import shared_memory

import numpy as np

from fusegrad.backends import get_backend, openblas
from fusegrad.core.errors import ConfigError, FusegradError, ShapeError
from fusegrad.core.tensor import Tensor
from fusegrad.core.trace import span

ONE_CORE_ENV = {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1"}
ANSWER_TIMEOUT_S = float(os.environ.get("FUSEGRAD_WORKER_TIMEOUT", 600))  # longest wait for a helper's answer
ALIGN = 64  # bytes: every parameter starts on a 64-byte boundary of its block, for aligned SIMD loads


class WorkerError(FusegradError, RuntimeError):
    """A helper process failed or died; the message says what it raised."""


def layout(named_shapes) -> tuple[dict, int]:
    """{name: (offset, shape)} of float32 arrays packed at ALIGN-byte offsets, and the block's size in bytes.

    >>> layout([("a", (3,)), ("b", (2, 2))])
    ({'a': (0, (3,)), 'b': (64, (2, 2))}, 128)
    """
    offsets, end = {}, 0
    for name, shape in named_shapes:
        offsets[name] = (end, tuple(shape))
        end += -(-4 * int(np.prod(shape)) // ALIGN) * ALIGN
    return offsets, max(end, ALIGN)


def views(block: shared_memory.SharedMemory, offsets: dict) -> dict:
    """name -> float32 array over `block` at its offset."""
    return {n: np.ndarray(shape, np.float32, buffer=block.buf, offset=off) for n, (off, shape) in offsets.items()}


@contextlib.contextmanager
def one_core():
    """The calling thread's JIT kernels and every OpenBLAS GEMM (a process-wide count) on one core."""
    import numba

    outer = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with openblas.threads(1) if openblas.THREAD_COUNT is not None else contextlib.nullcontext():
            yield
    finally:
        numba.set_num_threads(outer)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def choose_workers(requested: int, rows: int, eligible: bool) -> int:
    """Worker processes for `requested` (0 = auto: one per core when `eligible` on a POSIX system, else 1), at
    most one per row.

    >>> choose_workers(0, rows=8, eligible=False), choose_workers(3, rows=8, eligible=False)
    (1, 3)
    """
    if requested < 0 or requested > max(rows, 1):
        raise ConfigError(f"workers {requested} must be 0 (auto) or 1..{rows} (the rows of a batch)")
    return requested or (min(available_cores(), rows) if eligible and os.name == "posix" else 1)


SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (a tmpfs; Docker's default is 64 MB)


def check_shared_memory(nbytes: int, shm_dir: str = SHM_DIR) -> None:
    """Refuse, naming the sizes, when the shared-memory filesystem cannot hold `nbytes`: writing past its
    end would kill the process with SIGBUS instead of an error."""
    if not os.path.isdir(shm_dir):  # macOS and others: no such filesystem to measure
        return
    stat = os.statvfs(shm_dir)
    free = stat.f_bavail * stat.f_frsize
    if free < nbytes:
        raise WorkerError(f"worker processes need {nbytes / 2 ** 20:.0f} MB of shared memory and {shm_dir} has "
                          f"{free / 2 ** 20:.0f} MB free; use workers=1, or give it more (docker run --shm-size=1g)")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. On Linux, VmHWM: ru_maxrss there keeps the parent's peak
    through fork and exec, so a worker started by a process holding a model would report that model too."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB elsewhere


class ProcessDataParallel:
    """Split each batch's rows over `workers` processes (this one and workers - 1 helpers); see the module
    docstring. The model's parameters must all be float32 on the numpy backend, and they stay in shared
    memory from here on: code that replaces a parameter's array (instead of writing into it) must not run
    while this lives. Use as a context manager, or call `close()`."""

    def __init__(self, model, workers: int, extras=(), setup=None):
        """extras: [(name, Tensor)] the losses use beside model.params (adapters, a head); setup: (function,
        kwargs) with function(model, **kwargs) -> those named tensors, made in each helper on its model (it
        attaches the adapters; their values then come from shared memory). Models with adapters need both."""
        if workers < 2:
            raise ConfigError(f"ProcessDataParallel: workers must be >= 2, got {workers}")
        if os.name != "posix":  # the helpers inherit their pipe as a file descriptor
            raise WorkerError("worker processes need a POSIX system (Linux, macOS); use workers=1")
        extras = dict(extras)
        if (getattr(model, "adapters", None) or extras) and not (extras and setup):
            raise ConfigError("ProcessDataParallel: a model with adapters needs extras= (the adapters' named "
                              "tensors) and setup= (the function attaching them in each helper)")
        if setup is not None:
            _check_module_level(setup[0], "setup")
        tensors = {**model.params, **extras}
        if len(tensors) != len(model.params) + len(extras):
            raise ConfigError(f"ProcessDataParallel: extras reuse parameter names: "
                              f"{sorted(set(model.params) & set(extras))}")
        bad = [n for n, p in tensors.items() if not (isinstance(p.data, np.ndarray) and p.data.dtype == np.float32)]
        if bad:
            raise ShapeError(f"ProcessDataParallel needs float32 numpy parameters; not so: {', '.join(bad[:4])}")
        self.model, self.workers, self.extras, self.tensors = model, workers, extras, tensors
        self.trainable = {n: p for n, p in tensors.items() if p.requires_grad}
        self.offsets, size = layout((n, p.shape) for n, p in tensors.items())
        self.grad_offsets, grad_size = layout((n, p.shape) for n, p in self.trainable.items())
        check_shared_memory(size + grad_size * (workers - 1))  # the weights and a grad block per helper
        self.blocks, self.helpers = [], []
        # stop the helpers and free the blocks even if nobody calls close() (at garbage collection or exit)
        self._finalizer = weakref.finalize(self, _release, self.blocks, self.helpers)
        try:
            self.weights = self._block(size)
            for name, view in views(self.weights, self.offsets).items():  # the model now lives in shared memory
                view[...] = tensors[name].data
                tensors[name].data = view
            self.grad_blocks = [self._block(grad_size) for _ in range(workers - 1)]
            self.helper_grads = [views(block, self.grad_offsets) for block in self.grad_blocks]  # name -> array
            spec = {"model": _qualified(type(model)), "config_class": _qualified(type(model.config)),
                    "config": model.config.to_dict(), "offsets": self.offsets, "grad_offsets": self.grad_offsets,
                    "params": list(model.params), "requires_grad": {n: p.requires_grad for n, p in tensors.items()},
                    "weights": self.weights.name, "quantized": getattr(model, "quantized", {}), "setup": setup}
            for k in range(workers - 1):
                self.helpers.append(_start_helper(dict(spec, grads=self.grad_blocks[k].name)))
        except BaseException:
            self.close()
            raise
        self.ready = False  # the helpers start up while this process goes on; their "ready" comes before step 1's
        self.busy_s = [0.0] * workers  # seconds each worker spent on its slices since the last take_busy_s()

    def _block(self, size: int) -> shared_memory.SharedMemory:
        block = shared_memory.SharedMemory(create=True, size=size)
        self.blocks.append(block)
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, conn, message) -> None:
        try:
            conn.send(message)
        except OSError as e:  # BrokenPipeError: the helper is gone
            raise WorkerError(f"a fusegrad worker process died ({type(e).__name__}); see its stderr") from e

    def _receive(self, conn, proc):
        """The helper's next answer. A helper that exits, is stopped (SIGSTOP, Ctrl-Z) or is silent for
        ANSWER_TIMEOUT_S seconds is a WorkerError: the main process never waits forever."""
        waited = 0.0
        while not conn.poll(0.5):
            waited += 0.5
            if proc.poll() is not None:
                raise WorkerError(f"fusegrad worker process {proc.pid} died (exit status {proc.returncode}); "
                                  f"see its stderr")
            if _stopped(proc.pid) or waited >= ANSWER_TIMEOUT_S:
                why = "is stopped (SIGSTOP?)" if waited < ANSWER_TIMEOUT_S else f"sent nothing for {waited:.0f} s"
                raise WorkerError(f"fusegrad worker process {proc.pid} {why}; giving up on it (workers=1 trains in "
                                  f"one process; FUSEGRAD_WORKER_TIMEOUT sets the wait)")
        try:
            status, value = conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerError(f"a fusegrad worker process died ({type(e).__name__}); see its stderr") from e
        if status == "error":
            raise WorkerError(f"a fusegrad worker process failed: {value}")
        return value

    def loss_backward(self, tokens, grad_scale: float = 1.0) -> float:
        """Mean loss of tokens (B, T+1); adds the grads of grad_scale * loss to the model's `.grad`, as
        `(model.loss(tokens) * grad_scale).backward()` does (up to float summation order)."""
        tokens = np.asarray(tokens)
        rows = tokens.shape[0] if tokens.ndim == 2 else 0
        if rows < self.workers:
            raise ShapeError(f"ProcessDataParallel: a batch of {rows} rows does not split over {self.workers} "
                             f"worker processes (tokens shape {tokens.shape})")
        bounds = [rows * k // self.workers for k in range(self.workers + 1)]
        return self.backward_slices(mean_loss_share, [(tokens[lo:hi], (hi - lo) / rows)  # each slice's share
                                                      for lo, hi in zip(bounds, bounds[1:])], grad_scale)

    def backward_slices(self, fn, slices: list, grad_scale: float = 1.0) -> float:
        """The sum of every loss that fn(model, extras, *args) yields over the `slices` (one args tuple per
        process: this one runs the first); adds the grads of grad_scale * that sum to the trainable tensors'
        `.grad`, as running every slice here would (up to float summation order). fn: a module-level
        generator function, found by name in the helpers."""
        _check_module_level(fn, "fn")
        if len(slices) != self.workers:
            raise ShapeError(f"ProcessDataParallel: {len(slices)} slices for {self.workers} worker processes")
        for k, (conn, _) in enumerate(self.helpers, start=1):
            self._send(conn, ("step", fn, tuple(slices[k]), grad_scale))
        t0 = time.perf_counter()
        try:
            with one_core(), span("dp_worker", "parallel", worker=0):
                loss = run_slice(fn, self.model, self.extras, slices[0], grad_scale)
        finally:  # every helper's answer is read, also when this slice or a helper failed: the pipes stay in step
            self.busy_s[0] += time.perf_counter() - t0
            answers = self._gather()  # [(loss, seconds)] per helper
        for k, (_, seconds) in enumerate(answers, start=1):
            self.busy_s[k] += seconds
        with span("dp_reduce", "parallel"):
            self._add_helper_grads()
        return float(loss + sum(helper_loss for helper_loss, _ in answers))

    def take_busy_s(self) -> list:
        """Each worker's seconds on its slices (this process first) since the last call. A step lasts as long
        as the slowest: an uneven list shows a core that other load (or its design) made slower."""
        busy, self.busy_s = self.busy_s, [0.0] * self.workers
        return busy

    def _gather(self) -> list:
        """One answer per helper (after its "ready" at the first step); the first failure raised after all."""
        answers, failure = [], None
        for conn, proc in self.helpers:
            try:
                if not self.ready:
                    self._receive(conn, proc)  # "ready": the helper built its model and loaded its kernels
                answers.append(self._receive(conn, proc))
            except WorkerError as e:
                failure = failure or e
        self.ready = True
        if failure is not None:
            raise failure
        return answers

    def _add_helper_grads(self) -> None:
        for grads in self.helper_grads:
            for name, g in grads.items():
                p = self.trainable[name]
                if p.grad is None:
                    p.grad = g.copy()
                else:
                    p.backend.accumulate(p.grad, g)

    def helpers_peak_rss_mb(self) -> float:
        """The helper processes' peak RSS, summed (MB), without the shared blocks: those pages are in this
        process's RSS too (it writes the weights and reads every grad block), so with its RSS each counts once."""
        if not self.ready:
            return 0.0
        total = 0.0
        for conn, proc in self.helpers:
            self._send(conn, ("rss",))
            total += self._receive(conn, proc)
        return total - sum(block.size for block in self.blocks) / 2 ** 20

    def close(self) -> None:
        """Stop the helpers; the model's parameters and the extras leave shared memory with their current values."""
        for p in self.tensors.values():
            if isinstance(p.data, np.ndarray) and p.data.base is not None:
                p.data = p.data.copy()
        self._finalizer()


def mean_loss_share(model, extras, tokens, share: float):
    """A slice of pretraining's batch: model.loss(tokens) * share, its part of the batch's mean loss."""
    yield model.loss(tokens) * share


def run_slice(fn, model, extras: dict, args, grad_scale: float) -> float:
    """Backward of grad_scale * each loss fn(model, extras, *args) yields, in turn -> the sum of the losses."""
    total = 0.0
    with contextlib.closing(fn(model, extras, *args)) as losses:
        for loss in losses:
            total += loss.item()
            (loss * grad_scale).backward()
    return total


def _check_module_level(fn, what: str) -> None:
    """ConfigError unless fn is a module-level function a helper can import by name (a generator for fn)."""
    qualname, module = getattr(fn, "__qualname__", ""), getattr(fn, "__module__", None)
    if not callable(fn) or not qualname.isidentifier() or module in (None, "__main__"):
        raise ConfigError(f"ProcessDataParallel: {what} must be a function defined at the top level of an importable "
                          f"module (helpers import it by name), not {fn!r}")
    if what == "fn" and not inspect.isgeneratorfunction(fn):
        raise ConfigError(f"ProcessDataParallel: fn {qualname} must be a generator function yielding scalar losses")


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T in Linux's /proc; elsewhere: unknown, False)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _release(blocks: list, helpers: list) -> None:
    for conn, proc in helpers:
        with contextlib.suppress(OSError):
            conn.send(None)
        try:
            proc.wait(timeout=0 if _stopped(proc.pid) else 10)
        except subprocess.TimeoutExpired:
            proc.kill()
    helpers.clear()
    for block in blocks:
        with contextlib.suppress(FileNotFoundError):
            block.unlink()  # the name goes now; the memory when the last view of it does
        with contextlib.suppress(BufferError):  # arrays over it may still be alive here
            block.close()
    blocks.clear()


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _start_helper(spec: dict):
    """A helper process with one core's worth of threads, on a pipe. A fresh interpreter (`python -m`), not
    multiprocessing's spawn, which would re-run the user's main script in the child."""
    parent, child = multiprocessing.Pipe()
    proc = subprocess.Popen([sys.executable, "-m", "fusegrad.parallel.workers", str(child.fileno())],
                            pass_fds=(child.fileno(),), env=dict(os.environ, **ONE_CORE_ENV))
    child.close()
    parent.send(spec)
    return parent, proc


def _fusegrad_class(qualified: str):
    """A class of fusegrad's models by its qualified name; nothing outside fusegrad.models is imported."""
    module, _, name = qualified.rpartition(".")
    if not module.startswith("fusegrad.models.") or not name.isidentifier():
        raise WorkerError(f"worker processes build fusegrad.models classes only, not {qualified!r}")
    return getattr(importlib.import_module(module), name)


def _attach(name: str) -> shared_memory.SharedMemory:
    """The main process's block; unregistered from this process's resource tracker, which would otherwise
    unlink it when the helper exits (Python < 3.13 registers every attach)."""
    from multiprocessing import resource_tracker

    block = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(block._name, "shared_memory")
    return block


def _helper_model(spec: dict, weights: shared_memory.SharedMemory):
    """The main process's model over the shared weights, its NF4 bases and (by spec["setup"]) its adapters
    -> (model, extras {name: Tensor}, trainable {name: Tensor})."""
    model_cls, config_cls = _fusegrad_class(spec["model"]), _fusegrad_class(spec["config_class"])
    shared, trainable = views(weights, spec["offsets"]), spec["requires_grad"]
    params = {n: Tensor(shared[n], requires_grad=trainable[n]) for n in spec["params"]}
    model = model_cls(config_cls.from_dict(spec["config"]), params=params)
    model.quantized = spec["quantized"]
    extras = {}
    if spec["setup"] is not None:
        fn, kwargs = spec["setup"]
        extras = dict(fn(model, **kwargs))
        want = set(shared) - set(params)
        if set(extras) != want:
            raise WorkerError(f"setup {fn.__qualname__} made tensors {sorted(set(extras) ^ want)[:4]} that differ "
                              f"from the main process's")
        for name, t in extras.items():
            if t.shape != shared[name].shape:
                raise WorkerError(f"setup {fn.__qualname__} made {name} of shape {t.shape}, the main process "
                                  f"{shared[name].shape}")
            t.data, t.requires_grad = shared[name], trainable[name]
    return model, extras, {n: t for n, t in {**params, **extras}.items() if trainable[n]}


def _helper_main(conn) -> None:
    """A helper's loop: step (a slice's losses and backward, grads into the shared block) | rss | None = stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops us
    try:
        spec = conn.recv()
        get_backend("numpy").prewarm_kernels()
        weights, grads = _attach(spec["weights"]), _attach(spec["grads"])
        model, extras, trainable = _helper_model(spec, weights)
        grad_views = views(grads, spec["grad_offsets"])
    except Exception as e:  # noqa: BLE001  (reported to the main process, which raises it)
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    with contextlib.suppress(EOFError, OSError):  # the main process is gone (BrokenPipeError): stop quietly
        conn.send(("ok", "ready"))
        while (msg := conn.recv()) is not None:
            try:
                if msg[0] == "rss":
                    conn.send(("ok", peak_rss_mb()))
                    continue
                _, fn, args, scale = msg
                t0 = time.perf_counter()
                for name, p in trainable.items():  # backward accumulates into the shared block, in place
                    grad_views[name][...] = 0.0
                    p.grad = grad_views[name]
                loss = run_slice(fn, model, extras, args, scale)
                answer = ("ok", (loss, time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001
                answer = ("error", f"{type(e).__name__}: {e}")
            conn.send(answer)
    del model, extras, trainable, grad_views
    weights.close()
    grads.close()


if __name__ == "__main__":
    from multiprocessing.connection import Connection

    _helper_main(Connection(int(sys.argv[1])))

