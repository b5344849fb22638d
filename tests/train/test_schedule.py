"""Cosine schedule with linear warmup: pieces, endpoints, monotonicity, validation."""
import doctest
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusegrad.train import schedule
from fusegrad.train.schedule import Schedule, cosine_schedule


def test_values_at_warmup_start_end_middle_and_end():
    kw = dict(max_lr=6e-4, warmup_steps=100, total_steps=1100, min_lr=6e-5)
    assert cosine_schedule(0, **kw) == pytest.approx(6e-4 / 100)
    assert cosine_schedule(49, **kw) == pytest.approx(6e-4 * 0.5)
    assert cosine_schedule(99, **kw) == pytest.approx(6e-4)
    assert cosine_schedule(100, **kw) == pytest.approx(6e-4)
    assert cosine_schedule(600, **kw) == pytest.approx((6e-4 + 6e-5) / 2)
    # a quarter of the way through the decay: cos(pi / 4)
    assert cosine_schedule(350, **kw) == pytest.approx(6e-5 + (6e-4 - 6e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_schedule(1100, **kw) == 6e-5 and cosine_schedule(5000, **kw) == 6e-5


@given(warmup=st.integers(0, 50), decay=st.integers(1, 300), ratio=st.floats(0.0, 1.0))
def test_pieces_are_monotonic_and_bounded(warmup, decay, ratio):
    total = warmup + decay
    max_lr = 1e-3
    min_lr = max_lr * ratio
    lrs = np.array([cosine_schedule(s, max_lr, warmup, total, min_lr) for s in range(total + 5)])
    assert (np.diff(lrs[:warmup]) > 0).all()
    assert (np.diff(lrs[warmup:]) <= 1e-18).all()
    assert lrs.max() <= max_lr * (1 + 1e-12) and lrs[warmup:].min() >= min_lr * (1 - 1e-12)
    assert lrs[0] > 0 and (warmup == 0 or lrs[warmup - 1] == max_lr)


def test_no_warmup_starts_at_max_lr_and_is_deterministic():
    s = Schedule(max_lr=1.0, warmup_steps=0, total_steps=10, min_lr=0.0)
    assert s(0) == 1.0 and s(10) == 0.0
    assert [s(i) for i in range(12)] == [s(i) for i in range(12)]


def test_schedule_default_min_lr_is_a_tenth():
    s = Schedule(max_lr=3e-4, warmup_steps=5, total_steps=50)
    assert s.min_lr == pytest.approx(3e-5) and s(50) == pytest.approx(3e-5)
    assert s(20) == cosine_schedule(20, 3e-4, 5, 50, s.min_lr)


@pytest.mark.parametrize("kw,match", [
    (dict(max_lr=1e-3, warmup_steps=20, total_steps=10, min_lr=0.0), "warmup_steps=20, total_steps=10"),
    (dict(max_lr=1e-3, warmup_steps=0, total_steps=0, min_lr=0.0), "total_steps=0"),
    (dict(max_lr=1e-4, warmup_steps=1, total_steps=10, min_lr=1e-3), "min_lr=0.001, max_lr=0.0001"),
])
def test_bad_settings_raise_naming_the_values(kw, match):
    with pytest.raises(ValueError, match=match):
        cosine_schedule(0, **kw)
    with pytest.raises(ValueError, match=match):
        Schedule(**kw)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        cosine_schedule(-1, 1e-3, 1, 10, 0.0)


def test_docstring_examples():
    assert doctest.testmod(schedule).failed == 0
