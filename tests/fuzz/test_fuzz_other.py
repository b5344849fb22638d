"""The fuzz test of tests/fuzz/test_fuzz.py for the OTHER_FORMATS entries whose loaders now pass: fine-tune
JSONL/CSV data, and training checkpoints read by --resume (Trainer.load) and by load_model."""
import pytest

from tests.fuzz.formats import FORMATS, OTHER_FORMATS
from tests.fuzz.mutate import run_format

PASSING = ("finetune.jsonl", "finetune.csv", "checkpoint-resume", "checkpoint-load_model")
CHOSEN = [f for f in OTHER_FORMATS if f[0] in PASSING]  # once moved to FORMATS, test_fuzz.py runs them


def test_the_chosen_formats_are_still_fuzzed():
    assert set(PASSING) <= {f[0] for f in FORMATS + OTHER_FORMATS}


@pytest.mark.parametrize("fmt", CHOSEN, ids=[f[0] for f in CHOSEN])
def test_mutated_files_are_refused_clearly_or_loaded_within_range(fmt, tmp_path):
    report = run_format(fmt, tmp_path, cases=150, seed=0, budget_s=4.0)
    counts = report["counts"]
    assert counts["crash"] == 0 and counts["accepted-bad"] == 0, "\n".join(report["failures"])
    assert counts["refused"] > 0 and counts["ok"] + counts["refused"] >= 20  # the mutations did reach the loader
