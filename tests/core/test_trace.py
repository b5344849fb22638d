"""Tracer: nested spans and self time, summary, Chrome export, bounded memory, free when off, env switch."""
import json
import os
import subprocess
import sys
import time

import numpy as np

import fusegrad as fg
from fusegrad.core import trace as tr


def _busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_nested_spans_total_and_self_time():
    with fg.trace() as t:
        with tr.span("outer", "optimizer"):
            _busy(0.002)
            for _ in range(3):
                with tr.span("inner", "matmul"):
                    _busy(0.002)
    outer_total, outer_count, outer_self = t.aggregate[("outer", "optimizer")]
    inner_total, inner_count, inner_self = t.aggregate[("inner", "matmul")]
    assert (outer_count, inner_count) == (1, 3)
    assert outer_total >= inner_total >= 3 * 0.002e9
    assert outer_self == outer_total - inner_total  # self time excludes the children exactly
    assert inner_self == inner_total  # leaves have no children
    totals = t.totals(by="category")
    assert totals["matmul"]["count"] == 3 and totals["optimizer"]["self_s"] < totals["optimizer"]["total_s"]


def test_summary_lists_categories_and_non_gemm_share():
    with fg.trace() as t:
        x = fg.tensor(np.ones((32, 32)), requires_grad=True)
        (x @ x).silu().softmax().sum().backward()
    text = t.summary()
    for word in ("matmul", "elementwise", "backward", "self ms", "share", "mean"):
        assert word in text
    assert "non-GEMM overhead share" in text
    assert "dispatch:numpy" in text  # counters are listed


def test_save_chrome_writes_trace_event_json(tmp_path):
    with fg.trace() as t:
        with tr.span("outer", "io", path="x.bin"):
            with tr.span("inner", "transfer", shape=(2, 3), nbytes=24):
                pass
        tr.instant("fallback", "dispatch", backend="fake")
    path = tmp_path / "trace.json"
    t.save_chrome(path)
    doc = json.loads(path.read_text())
    complete = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in complete} == {"outer", "inner"}
    for e in complete:
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float)) and e["dur"] >= 0
        assert {"pid", "tid", "cat"} <= set(e)
    inner = next(e for e in complete if e["name"] == "inner")
    assert inner["args"]["shape"] == [2, 3]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_memory_bounded_over_many_spans():
    with fg.trace(max_events=100) as t:
        for i in range(5000):
            with tr.span("step", "op"):
                pass
    assert len(t.events) == 100
    assert t.aggregate[("step", "op")][1] == 5000  # aggregates still count everything
    assert len(t.aggregate) == 1


def test_off_is_a_shared_noop():
    tr.TRACER.enabled = False
    tr.TRACER.reset()
    assert tr.span("a", "matmul") is tr.span("b", "io", shape=(1,))
    with tr.span("a", "matmul"):
        fg.tensor([[1.0]]) @ fg.tensor([[2.0]])
    assert not tr.TRACER.events and not tr.TRACER.aggregate


def test_mark_step_reports_self_time_per_category():
    with fg.trace() as t:
        with tr.span("a", "optimizer"):
            _busy(0.001)
        first = t.mark_step(1)
        second = t.mark_step(2)
    assert first["optimizer"] >= 0.001
    assert second["optimizer"] == 0.0  # per-step deltas, not running totals


def test_env_variable_turns_tracing_on():
    code = "import fusegrad; print(fusegrad.TRACER.enabled)"
    env = dict(os.environ, FUSEGRAD_TRACE="1")
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["FUSEGRAD_TRACE"] = "0"
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True" and off.stdout.strip() == "False"


def test_nested_traces_keep_the_outer_spans_and_nothing_stays_on():
    with fg.trace() as outer:
        with tr.span("before", "io"):
            pass
        with fg.trace() as inner:
            with tr.span("inside", "matmul"):
                fg.tensor([[1.0]]) @ fg.tensor([[2.0]])
        with tr.span("after", "io"):
            pass
    assert {n for n, _ in outer.aggregate} >= {"before", "inside", "after"}
    assert {n for n, _ in inner.aggregate} >= {"inside"} and ("before", "io") not in inner.aggregate
    assert outer.counters["dispatch:numpy"] == inner.counters["dispatch:numpy"] == 1
    assert tr.span("later", "io") is tr.span("other", "io")  # off again: the shared no-op


def test_trace_is_turned_off_when_its_block_raises():
    try:
        with fg.trace():
            raise KeyError("boom")
    except KeyError:
        pass
    assert not tr._ACTIVE and tr.span("x") is tr.span("y")
