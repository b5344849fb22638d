"""fusegrad doctor: off the Mac (ane-sim alone), on a 'Mac' (a fake compiler behind the real AneRuntime), and
with a broken ANE (a failed load, wrong values): the report dict and its pasteable text."""
import sys

import numpy as np
import pytest

from fusegrad.backends.ane import AneRuntime, AneSim, CompileBudget
from fusegrad.backends.ane.doctor import doctor, format_report
from fusegrad.backends.ane.kernels import KERNELS
from fusegrad.backends.ane.mil import parse
from fusegrad.core.errors import BackendError


class FakeCompiler:
    """AppleNeuralEngine.framework stand-in: compiles by parsing, evaluates on ane-sim; can fail a load or
    return wrong values for programs whose text contains a marker."""

    def __init__(self, fail_load="", wrong=""):
        self.texts, self.fail_load, self.wrong = [], fail_load, wrong

    def compile(self, text, weights):
        self.texts.append(text)
        if self.fail_load and self.fail_load in text:
            raise BackendError("ANE load failed: Error Domain=com.apple.appleneuralengine Code=5 (fake)")
        return parse(text), dict(weights), bool(self.wrong and self.wrong in text)

    def evaluate(self, handle, arrays, output_types):
        program, weights, wrong = handle
        y = AneSim(hw_rules=True).run(program, weights, {"x": arrays[0]})["y"]
        return [y * 0 if wrong else y]

    def unload(self, handle):
        pass


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS path")
def test_off_a_mac_every_kernel_runs_on_ane_sim_and_the_ane_is_reported_absent():
    report = doctor()
    assert report["ok"] is True and report["device"] == "ane-sim only"
    assert report["ane"].startswith("absent: ") and sys.platform in report["ane"]
    assert report["macos"].startswith("none") and report["dialect"] == "m3"
    assert [r["name"] for r in report["kernels"]] == list(KERNELS)
    assert all(r["compile"] == r["load"] == r["eval"] == "ok" and r["max_diff"] is None for r in report["kernels"])
    text = format_report(report)
    assert "ANE      absent" in text and "kernels checked on ane-sim only" in text
    assert all(f"\n{name} " in text for name in KERNELS) and text.endswith(f"{len(KERNELS)} of {len(KERNELS)} kernels "
                                                                          f"passed: DONE")


def test_on_a_mac_each_kernel_compiles_loads_and_matches_ane_sim_in_the_chips_dialect():
    compiler = FakeCompiler()
    report = doctor(AneRuntime(compiler, CompileBudget(50)), chip="Apple M2 Pro")
    assert report["ok"] and report["chip"] == "Apple M2 Pro" and report["dialect"] == "m1" and report["device"] == "ane"
    assert len(compiler.texts) == len(KERNELS) and not any("cast(" in t for t in compiler.texts)
    for r in report["kernels"]:
        assert r["max_diff"] == 0.0 and r["bound"] > 0 and r["compile_ms"] >= 0 and r["eval_ms"] >= 0
    text = format_report(report)
    assert "chip     Apple M2 Pro (MIL dialect m1)" in text and text.count(" OK ") == len(KERNELS)


def test_a_failed_load_and_wrong_values_fail_the_report_with_the_reason():
    compiler = FakeCompiler(fail_load='"pdp"', wrong='"attn_flat"')  # sdpa_backward; the attention forwards
    report = doctor(AneRuntime(compiler, CompileBudget(50)), chip="Apple M4")
    rows = {r["name"]: r for r in report["kernels"]}
    assert report["ok"] is False and report["dialect"] == "m3"
    sdpa = rows["sdpa_backward"]
    assert (sdpa["compile"], sdpa["load"], sdpa["eval"], sdpa["ok"]) == ("ok", "FAIL", "-", False)
    assert "Code=5" in sdpa["error"]
    for name in ("attention_forward", "attention_forward_dynamic"):
        assert rows[name]["eval"] == "ok" and rows[name]["max_diff"] > rows[name]["bound"] and not rows[name]["ok"]
    assert all(rows[n]["ok"] for n in KERNELS if n not in ("sdpa_backward", "attention_forward",
                                                           "attention_forward_dynamic"))
    text = format_report(report)
    assert "\nsdpa_backward                  FAIL" in text and "\nattention_forward              DIFF" in text
    assert "sdpa_backward: compile: BackendError: ANE load failed" in text
    assert text.endswith("3 of 10 kernels FAILED: attention_forward, attention_forward_dynamic, sdpa_backward")
    assert np.isfinite([r["eval_ms"] for r in report["kernels"] if r["eval_ms"] is not None]).all()
