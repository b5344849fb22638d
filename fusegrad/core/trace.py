"""Where the time goes: nested spans, a summary table and a Chrome/Perfetto export.

Off by default and then near free: `span()` returns one shared no-op context after a single bool test.

>>> import fusegrad as fg
>>> with fg.trace() as t:
...     y = (fg.tensor([[1.0, 2.0]]) @ fg.tensor([[3.0], [4.0]]))
>>> t.totals(by="category")["matmul"]["count"] >= 1
True
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import threading
import time

_NOOP = contextlib.nullcontext()
GEMM_CATEGORIES = frozenset({"matmul"})


class Tracer:
    """Aggregates every span by (name, category) and keeps a bounded window of raw events.

    Aggregates grow with the number of distinct span names, not with run length; raw events are a
    deque of at most `max_events`, so memory stays bounded over long runs.
    """

    def __init__(self, max_events: int = 200_000):
        self.enabled = False
        self.events = collections.deque(maxlen=max_events)  # (name, cat, start_ns, dur_ns, depth, tid, args)
        self.aggregate = {}  # (name, cat) -> [total_ns, count, self_ns]
        self.counters = collections.Counter()  # named counts: fallbacks, transfers, dispatches
        self.steps = collections.deque(maxlen=10_000)  # per-step self time by category, see mark_step
        self._step_base = {}
        self._local = threading.local()
        self._t0 = time.perf_counter_ns()
        self._lock = threading.Lock()

    def _stack(self) -> list:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextlib.contextmanager
    def _span(self, name: str, cat: str, args: dict):
        stack = self._stack()
        stack.append(0)  # child time accumulates here, to derive self time
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            dur = time.perf_counter_ns() - start
            child = stack.pop()
            if stack:
                stack[-1] += dur
            with self._lock:
                agg = self.aggregate.get((name, cat))
                if agg is None:
                    agg = self.aggregate[(name, cat)] = [0, 0, 0]
                agg[0] += dur
                agg[1] += 1
                agg[2] += dur - child
                self.events.append((name, cat, start - self._t0, dur, len(stack), threading.get_ident(), args))

    def instant(self, name: str, cat: str = "event", **args) -> None:
        """A zero-length event (a fallback, a warning) and a counter bump."""
        with self._lock:
            self.counters[f"{cat}:{name}"] += 1
            self.events.append((name, cat, time.perf_counter_ns() - self._t0, 0, len(self._stack()),
                                threading.get_ident(), args))

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def mark_step(self, step: int) -> dict:
        """Close a training step: store its self time per category (bounded history) and return it."""
        now = {}
        for (_, cat), (_, _, self_ns) in self.aggregate.items():
            now[cat] = now.get(cat, 0) + self_ns
        delta = {cat: (ns - self._step_base.get(cat, 0)) / 1e9 for cat, ns in now.items()}
        self._step_base = now
        self.steps.append((step, delta))
        return delta

    def reset(self) -> None:
        with self._lock:
            self.events.clear()
            self.aggregate.clear()
            self.counters.clear()
            self.steps.clear()
            self._step_base = {}

    # -- reports ---------------------------------------------------------------------------------
    def totals(self, by: str = "name") -> dict:
        """{name or category: {"total_s", "self_s", "count", "mean_s"}} over all spans recorded."""
        out = {}
        for (name, cat), (total, count, self_ns) in self.aggregate.items():
            key = name if by == "name" else cat
            row = out.setdefault(key, {"total_s": 0.0, "self_s": 0.0, "count": 0})
            row["total_s"] += total / 1e9
            row["self_s"] += self_ns / 1e9
            row["count"] += count
        for row in out.values():
            row["mean_s"] = row["total_s"] / max(row["count"], 1)
        return out

    def summary(self, top: int = 25) -> str:
        """A table of self time per span name (total, count, share, mean) and the non-GEMM share."""
        rows = sorted(((k, v) for k, v in self.aggregate.items()), key=lambda kv: -kv[1][2])
        all_self = sum(v[2] for _, v in rows) or 1
        gemm_self = sum(v[2] for (name, cat), v in rows if cat in GEMM_CATEGORIES)
        lines = [f"{'span':<34}{'category':<14}{'self ms':>11}{'count':>9}{'share':>8}{'mean us':>11}"]
        for (name, cat), (total, count, self_ns) in rows[:top]:
            lines.append(f"{name[:33]:<34}{cat[:13]:<14}{self_ns / 1e6:>11.2f}{count:>9}"
                         f"{100 * self_ns / all_self:>7.1f}%{total / max(count, 1) / 1e3:>11.1f}")
        lines.append(f"GEMM share {100 * gemm_self / all_self:.1f}%, "
                     f"non-GEMM overhead share {100 * (1 - gemm_self / all_self):.1f}% of traced time")
        for key, n in sorted(self.counters.items()):
            lines.append(f"{key}: {n}")
        return "\n".join(lines)

    def chrome_events(self) -> list:
        pid = os.getpid()
        out = []
        for name, cat, start, dur, depth, tid, args in list(self.events):
            ev = {"name": name, "cat": cat, "ts": start / 1e3, "pid": pid, "tid": tid,
                  "args": {k: _jsonable(v) for k, v in args.items()}}
            if dur:
                ev.update(ph="X", dur=dur / 1e3)
            else:
                ev.update(ph="i", s="t")
            out.append(ev)
        return out

    def save_chrome(self, path) -> None:
        """Write a trace that chrome://tracing and ui.perfetto.dev open (Trace Event Format)."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": self.chrome_events(), "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)


def _jsonable(v):
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return str(v)


TRACER = Tracer()  # the process tracer: FUSEGRAD_TRACE=1 turns it on; its counters always count
if os.environ.get("FUSEGRAD_TRACE", "") not in ("", "0"):
    TRACER.enabled = True
_ACTIVE = []  # the tracers of the open `trace()` blocks, outermost first


def _recording() -> list:
    return ([TRACER] if TRACER.enabled else []) + _ACTIVE


def tracing() -> bool:
    """Whether any trace records spans now (the process tracer or an open `trace()` block)."""
    return TRACER.enabled or bool(_ACTIVE)


def span(name: str, cat: str = "op", **args):
    """Time a block as a span of `cat` ("matmul", "elementwise", "transfer", "optimizer", "io", ...), in every
    open trace (an outer trace keeps the spans of the traces nested in it)."""
    if not (TRACER.enabled or _ACTIVE):  # off: one shared no-op, near free
        return _NOOP
    tracers = _recording()
    if len(tracers) == 1:
        return tracers[0]._span(name, cat, args)
    stack = contextlib.ExitStack()
    for t in tracers:
        stack.enter_context(t._span(name, cat, args))
    return stack


def instant(name: str, cat: str = "event", **args) -> None:
    for t in _recording():
        t.instant(name, cat, **args)


def count(key: str, n: int = 1) -> None:
    """Bump a named counter (dispatches per backend, transfers) in the process tracer, counted even when
    tracing is off, and in every open trace."""
    TRACER.counters[key] += n
    for t in _ACTIVE:
        t.counters[key] += n


def mark_step(step: int) -> None:
    """Close a training step in every recording tracer (per-step self time by category)."""
    for t in _recording():
        t.mark_step(step)


@contextlib.contextmanager
def trace(max_events: int = 200_000):
    """Record the spans of a block into a fresh tracer, yielded for `.summary()` and `.save_chrome()`.

    Scoped: nothing stays switched after the block (also on error), and nested traces each see their own
    block while the outer one keeps everything.

    >>> with trace() as outer:
    ...     with trace() as inner:
    ...         with span("x", "io"):
    ...             pass
    >>> outer.aggregate[("x", "io")][1], inner.aggregate[("x", "io")][1], span("y") is _NOOP
    (1, 1, True)
    """
    tracer = Tracer(max_events)
    tracer.enabled = True
    _ACTIVE.append(tracer)
    try:
        yield tracer
    finally:
        _ACTIVE.remove(tracer)
        tracer.enabled = False
