"""Fuzzed files of every format: only documented fusegrad errors escape, nothing out of range is accepted.

A few seconds per format here; `python scripts/fuzz.py --cases 2000` runs the same suite longer.
"""
import pytest

from tests.fuzz.formats import FORMATS
from tests.fuzz.mutate import run_format


@pytest.mark.parametrize("fmt", FORMATS, ids=[f[0] for f in FORMATS])
def test_mutated_files_are_refused_clearly_or_loaded_within_range(fmt, tmp_path):
    report = run_format(fmt, tmp_path, cases=150, seed=0, budget_s=4.0)
    counts = report["counts"]
    assert counts["crash"] == 0 and counts["accepted-bad"] == 0, "\n".join(report["failures"])
    assert counts["refused"] > 0 and counts["ok"] + counts["refused"] >= 20  # the mutations did reach the loader
