"""The Tensor and its reverse-mode autograd.

A Tensor wraps one backend array (`numpy.ndarray` on the CPU). An op that builds a Tensor from inputs
that require grad attaches a `Node`: the op's name, its input tensors, and a `backward(grad)` closure
written beside the op's forward (see `fusegrad.ops`). `Tensor.backward()` sorts the graph
topologically once and sweeps it in reverse, so a tensor used by several ops receives the sum of their
gradients exactly once (unlike a recursive walk, which re-enters shared subgraphs).

>>> import fusegrad as fg
>>> a = fg.tensor([1.0, 2.0], requires_grad=True)
>>> (a + a).sum().backward()
>>> a.grad
array([2., 2.], dtype=float32)
"""
from __future__ import annotations

import contextlib
import math
import sys
import threading
import weakref

import numpy as np

from fusegrad.core.errors import GraphError, ShapeError
from fusegrad.core.registry import backend_for_array, get_backend
from fusegrad.core.trace import span

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))


def is_floating(dtype) -> bool:
    """A float dtype as Tensor.dtype names it: numpy's, or a backend's own that numpy lacks (torch.bfloat16)."""
    return dtype in FLOAT_DTYPES or getattr(dtype, "is_floating_point", False) is True

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


def is_graph_retained() -> bool:
    """True inside a backward(retain_graph=True): a node may run again, so it must not hand over (and let
    the receiver modify) arrays its closure keeps."""
    return getattr(_state, "retain_graph", False)


@contextlib.contextmanager
def no_grad():
    """Ops inside build no graph: results never require grad.

    >>> import fusegrad as fg
    >>> w = fg.tensor([1.0], requires_grad=True)
    >>> with fg.no_grad(): y = w * 2
    >>> y.requires_grad
    False
    """
    with _grad_mode(False):
        yield


@contextlib.contextmanager
def enable_grad():
    """Ops inside build a graph again, also within no_grad (activation checkpointing's recompute)."""
    with _grad_mode(True):
        yield


@contextlib.contextmanager
def _grad_mode(enabled: bool):
    prev = is_grad_enabled()
    _state.grad_enabled = enabled
    try:
        yield
    finally:
        _state.grad_enabled = prev


class Node:
    """How a non-leaf tensor was made: `backward(grad) -> tuple of input grads (None where unneeded)`."""

    __slots__ = ("op", "inputs", "backward")

    def __init__(self, op: str, inputs: tuple, backward):
        self.op, self.inputs, self.backward = op, inputs, backward


class RowsGrad:
    """A gradient that is zero but for some rows: dense (V, C) = values (N, C) scatter-added at rows (N,),
    an embedding's. An op's backward may return one; autograd adds it in place into another gradient of the
    same tensor (a tied classifier's dW: no (V, C) zeros and no second (V, C) pass) and makes it dense only
    where a dense array is needed (a leaf's first `.grad`, an op's backward)."""

    __slots__ = ("backend", "rows", "values", "shape", "dtype")

    def __init__(self, backend, rows, values, shape: tuple):
        self.backend, self.rows, self.values = backend, rows, values  # rows (N,) int, values (N, C)
        self.shape, self.dtype = tuple(shape), values.dtype  # (V, C), the dtype of the dense gradient

    def add_to(self, dense):
        """dense += this, in place; returns dense."""
        with span("embedding_backward", "elementwise"):
            self.backend.embedding_backward_into(dense, self.values, self.rows)
        return dense

    def dense(self):
        with span("embedding_backward", "elementwise"):
            return self.backend.embedding_backward(self.values, self.rows, self.shape[0])


class Tensor:
    """An N-d array with an optional gradient.

    >>> import fusegrad as fg
    >>> x = fg.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    >>> y = (x @ x.T).sum()
    >>> y.backward()
    >>> x.grad.tolist()
    [[8.0, 12.0], [8.0, 12.0]]
    """

    __slots__ = ("data", "grad", "requires_grad", "node", "name", "backend", "__weakref__")
    __array_priority__ = 1000  # numpy defers `ndarray @ Tensor` etc. to Tensor's reflected ops

    def __init__(self, data, requires_grad: bool = False, node: Node | None = None, name: str | None = None,
                 backend=None):
        self.data = data
        self.backend = backend if backend is not None else backend_for_array(data)
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self.node = node
        self.name = name
        if self.requires_grad and not is_floating(self.dtype):
            raise ShapeError(f"tensor: only floating tensors can require grad, got dtype {self.dtype}")

    # -- array-like facts ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        """A numpy dtype, whatever the backend's arrays call theirs (torch.float32 -> float32); a dtype numpy
        lacks keeps the backend's name (torch.bfloat16)."""
        dt = self.data.dtype
        return dt if isinstance(dt, np.dtype) else self.backend.numpy_dtype(dt)

    @property
    def ndim(self) -> int:
        return len(self.data.shape)

    def numel(self) -> int:
        return math.prod(self.data.shape)

    @property
    def size(self) -> tuple:
        return self.shape

    def __len__(self) -> int:
        if not self.data.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.data.shape[0]

    def numpy(self) -> np.ndarray:
        return self.backend.to_numpy(self.data)

    def item(self) -> float:
        if self.numel() != 1:
            raise ShapeError(f"item: tensor must have exactly one element, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self.node.op}" if self.node is not None else ""
        return f"tensor({np.array2string(self.numpy(), precision=4, threshold=20)}{grad}{op})"

    # -- graph -----------------------------------------------------------------------------------
    @property
    def is_leaf(self) -> bool:
        return self.node is None

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (shares memory, like torch)."""
        return Tensor(self.data, requires_grad=False, backend=self.backend)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if not self.is_leaf:
            raise ShapeError("requires_grad_: only leaf tensors can change requires_grad; use .detach() first")
        if flag and not is_floating(self.dtype):
            raise ShapeError(f"requires_grad_: only floating tensors can require grad, got dtype {self.dtype}")
        self.requires_grad = bool(flag)
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Reverse sweep from this tensor; leaf tensors that require grad accumulate into `.grad`."""
        if not self.requires_grad:
            raise ShapeError("backward: tensor does not require grad (no input requires grad, or built under no_grad)")
        if grad is None:
            if self.numel() != 1:
                raise ShapeError(f"backward: grad can be implicit only for a one-element tensor, got shape {self.shape}")
            grad = self.backend.full(self.shape, 1.0, self.dtype)
        else:
            grad = grad.data if isinstance(grad, Tensor) else self.backend.asarray(grad, self.dtype)
            if tuple(grad.shape) != self.shape:
                raise ShapeError(f"backward: grad has shape {tuple(grad.shape)}, tensor has shape {self.shape}")
        run_backward(self, grad, retain_graph)


def _topological_order(root: Tensor) -> list:
    """Tensors reachable from root through nodes, inputs before outputs (iterative DFS, no recursion limit).

    A tensor is marked visited when it is expanded, not when it is pushed: marking at push time emits a
    tensor reached first from a near consumer before a farther consumer that also depends on it.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in visited:
            continue
        visited.add(id(t))
        stack.append((t, True))
        if t.node is not None:
            for parent in t.node.inputs:
                if parent.requires_grad and id(parent) not in visited:
                    stack.append((parent, False))
    return order


def _released_backward(grad):
    raise GraphError("backward: the graph through this tensor was already released by an earlier backward(); "
                     "pass retain_graph=True to the first call to backward twice")


def _refs(array) -> int:
    return sys.getrefcount(array)


def _sole_refs() -> int:
    """References an array has when only the engine's `pending` dict and its loop variable hold it, counted
    through the same call path that `_add_grads` uses (so the figure holds whatever the interpreter)."""
    pending = {0: np.empty(1, np.float32)}
    prev = pending.get(0)
    return _add_grads(prev, None, probe=True)


def _add_grads(prev, pg, probe: bool = False):
    """prev + pg; in place into prev when nothing but the engine can see prev: a numpy array owning its
    memory with no other reference (no closure, leaf .grad or view keeps it) — numpy's own rule for
    eliding temporaries. Saves a tied embedding's (V, C) sum and the residual stream's grad sums."""
    refs = _refs(prev)
    if probe:
        return refs
    if isinstance(prev, RowsGrad):
        prev = prev.dense()  # a new array: only the engine sees it
        refs = _SOLE_REFS
    in_place = (isinstance(prev, np.ndarray) and isinstance(pg, (np.ndarray, RowsGrad)) and refs <= _SOLE_REFS
                and prev.flags.owndata and prev.flags.writeable and np.result_type(prev.dtype, pg.dtype) == prev.dtype)
    if isinstance(pg, RowsGrad):
        return pg.add_to(prev) if in_place else prev + pg.dense()
    if in_place:
        np.add(prev, pg, out=prev)
        return prev
    return prev + pg


_SOLE_REFS = _sole_refs()


def _dense(g):
    """g as an array: a RowsGrad made dense, anything else as it is."""
    return g.dense() if isinstance(g, RowsGrad) else g


def _accumulate_leaf_grad(grad, g):
    """grad + g, in place into a leaf's numpy `.grad` as torch accumulates (no second array of the weight's
    size per extra backward, and a `.grad` set to a buffer beforehand is filled in place)."""
    if grad is None:
        return _dense(g)
    if not (isinstance(grad, np.ndarray) and isinstance(g, (np.ndarray, RowsGrad)) and grad.flags.writeable
            and grad.shape == g.shape and np.result_type(grad.dtype, g.dtype) == grad.dtype):
        return grad + _dense(g)
    if isinstance(g, RowsGrad):
        return g.add_to(grad)
    np.add(grad, g, out=grad)
    return grad


def _weak(array):
    """A weak reference to a grad array; an array type without them is pinned (never mistaken for another)."""
    try:
        return weakref.ref(array)
    except TypeError:
        return lambda: array


def run_backward(root: Tensor, grad, retain_graph: bool = False) -> None:
    order = _topological_order(root)
    outer, _state.retain_graph = is_graph_retained(), retain_graph
    try:
        _sweep(order, root, grad, retain_graph)
    finally:
        _state.retain_graph = outer


def _sweep(order: list, root: Tensor, grad, retain_graph: bool) -> None:
    pending = {id(root): grad}  # grads not yet consumed, keyed by tensor id; freed as consumed
    # grad arrays already given to a tensor (or the caller's), by id, with a weak reference because a freed
    # array's id is reused: a second holder gets a copy, so `.grad` of two leaves never aliases (an op may
    # return one array for two inputs)
    handed_out = {id(grad): _weak(grad)}
    with span("backward", "autograd", nodes=len(order)):
        for t in reversed(order):
            g = pending.pop(id(t), None)
            if g is None:
                continue
            if t.node is None:  # a leaf: accumulate into .grad
                t.grad = _accumulate_leaf_grad(t.grad, g)
                continue
            g = _dense(g)  # an op's backward takes a dense array
            if g is not grad:  # consumed by this op: it may pass it on to one input uncopied (never the caller's)
                handed_out.pop(id(g), None)
            node = t.node
            with span(node.op, "backward"):
                input_grads = node.backward(g)
            del g
            for parent, pg in zip(node.inputs, input_grads):
                if pg is None or not parent.requires_grad:
                    continue
                if tuple(pg.shape) != parent.shape:
                    raise ShapeError(f"{node.op} backward: gradient has shape {tuple(pg.shape)}, "
                                     f"input has shape {parent.shape} (a bug in the op)")
                if pg.dtype != parent.data.dtype:  # a grad has its tensor's dtype, as in torch: bf16 GEMM dW -> fp32
                    pg = parent.backend.xp.astype(_dense(pg), parent.data.dtype)
                prev = pending.get(id(parent))
                if prev is not None:
                    pending[id(parent)] = _add_grads(prev, pg)
                elif isinstance(pg, RowsGrad):  # holds no array a leaf's .grad could alias
                    pending[id(parent)] = pg
                else:
                    be = parent.backend
                    seen = handed_out.get(id(pg))
                    if (seen is not None and seen() is pg
                            or parent.is_leaf and parent.grad is None and not be.owns_memory(pg)):
                        pg = be.copy(pg)
                    handed_out[id(pg)] = _weak(pg)
                    pending[id(parent)] = pg
            if not retain_graph:  # release the graph: activations saved in closures go with it
                t.node = Node(node.op, (), _released_backward)


def default_dtype_for(data):
    """float32 for python numbers and lists of floats; numpy arrays keep a floating dtype (as torch does);
    integers become int64."""
    if isinstance(data, np.ndarray):
        if data.dtype in FLOAT_DTYPES or data.dtype == np.bool_:
            return data.dtype
        return np.int64 if np.issubdtype(data.dtype, np.integer) else np.float32
    arr = np.asarray(data)
    if arr.dtype == np.bool_:
        return np.bool_
    return np.int64 if np.issubdtype(arr.dtype, np.integer) else np.float32


def tensor(data, requires_grad: bool = False, dtype=None, backend=None) -> Tensor:
    """Build a tensor from a number, nested list or array.

    >>> import fusegrad as fg
    >>> fg.tensor([[1, 2], [3, 4]], dtype="float32").shape
    (2, 2)
    >>> fg.tensor([1.5]).dtype
    dtype('float32')
    """
    if isinstance(data, Tensor):
        data = data.numpy()
    be = get_backend(backend)
    try:
        dt = np.dtype(dtype) if dtype is not None else default_dtype_for(data)
        arr = np.array(data, dtype=dt)  # a copy: the tensor never aliases the caller's array
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"tensor: cannot build a tensor from {type(data).__name__}: {exc}") from None
    return Tensor(be.asarray(arr), requires_grad=requires_grad, backend=be)
