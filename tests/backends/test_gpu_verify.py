"""scripts/gpu_verify.py end to end on torch:cpu with tiny sizes (the GPU figures need a CUDA machine)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_verify_runs_on_the_cpu_with_tiny_sizes():
    """--compile-cap 1: no torch.compile warm-up finishes in a second, so both are cut off and the run goes on
    (on a GPU the cap keeps the whole run under five minutes)."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_verify.py"), "--device", "cpu", "--tiny",
                          "--steps", "1", "--compile-cap", "1"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0].startswith("fusegrad gpu_verify on cpu")
    assert any(line.startswith("parity vs numpy") and line.endswith("-> OK") for line in lines)
    for dtype in ("fp32", "bf16"):
        assert any(line.startswith(f"training step {dtype}") and "torch eager" in line for line in lines), run.stdout
    assert any(line.startswith("LoRA step") and "transformers + peft" in line for line in lines), run.stdout
    assert lines.count("  torch.compile: warm-up cut off after 1 s (--compile-cap)") == 2, run.stdout
    assert lines[-1].startswith("done in") and lines[-1].endswith("parity OK")
