"""Which backend owns an array, and which one new tensors use: a registry that `fusegrad.backends` fills.

It lives in core so that Tensor needs no import of the backends layer. A backend is registered by name
with a factory, called once, on first use (so importing fusegrad never imports torch). The backend of new
tensors is the one of the innermost `use_backend` block (a context variable: per thread and per task),
else "numpy".

>>> from fusegrad.core.registry import get_backend, use_backend
>>> with use_backend("numpy") as be:
...     get_backend() is be
True
"""
from __future__ import annotations

import contextlib
import contextvars

import numpy as np

from fusegrad.core.errors import BackendError

_FACTORIES = {}
_INSTANCES = {}
_CURRENT = contextvars.ContextVar("fusegrad_backend", default=None)


def register_backend(name: str, factory) -> None:
    """`factory()` makes the backend called `name` on first use; registering again replaces it."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def available_backends() -> list:
    return sorted(_FACTORIES)


def get_backend(name=None):
    """The backend called `name`; None: the backend of the current `use_backend` block, else numpy."""
    if name is None:
        current = _CURRENT.get()
        if current is not None:
            return current
        name = "numpy"
    if not isinstance(name, str):  # already a backend
        return name
    if name not in _INSTANCES:
        if name not in _FACTORIES:
            raise BackendError(f"unknown backend {name!r}; known: {', '.join(sorted(_FACTORIES))}")
        _INSTANCES[name] = _FACTORIES[name]()
    return _INSTANCES[name]


@contextlib.contextmanager
def use_backend(name_or_backend):
    """Inside the block, new tensors (`fusegrad.tensor(...)` without backend=) go to this backend; the
    previous one is back on exit, also on error."""
    token = _CURRENT.set(get_backend(name_or_backend))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def backend_for_array(array):
    """The backend that owns `array`: numpy arrays -> numpy; others ask each backend made so far."""
    if isinstance(array, np.ndarray):
        return get_backend("numpy")
    for backend in _INSTANCES.values():
        if backend.owns(array):
            return backend
    raise BackendError(f"no backend owns an array of type {type(array).__name__}")
