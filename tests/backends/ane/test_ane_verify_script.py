"""scripts/ane_verify.py: the Mac verification script runs end to end (sim vs sim) and reports every kernel."""
import runpy
import sys
from pathlib import Path

import pytest

from fusegrad.backends.ane.kernels import KERNELS

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "ane_verify.py"


def test_sim_only_run_reports_every_kernel(capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main(["--sim-only", "--small"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name} " in out for name in KERNELS)
    assert out.count(" OK ") == len(KERNELS) and out.rstrip().endswith("DONE")


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS exit path")
def test_without_ane_exits_2_with_reason(capsys):
    assert runpy.run_path(str(SCRIPT))["main"]([]) == 2
    assert "ane-sim" in capsys.readouterr().out
