"""`fusegrad bench` smoke run on the tiny preset (no timing asserted) and its FLOP accounting."""
import argparse
import json
import math

import pytest

from fusegrad.cli import bench
from fusegrad.core.errors import FusegradError
from fusegrad.models.llama import preset


def run(capsys, *argv):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    assert args.func(args) == 0
    return capsys.readouterr().out


def check_side(row, steps_flops, tokens):
    s = row["step_s"]
    assert 0 < s["min"] <= s["median"] <= s["max"]
    assert row["tokens_per_s"] == pytest.approx(tokens / s["median"])
    assert row["model_flops_per_s"] == pytest.approx(steps_flops / s["median"])
    assert row["mfu"] > 0 and row["peak_rss_mb"] > 10
    assert math.isfinite(row["loss_step0"])


def test_bench_vs_torch_json(capsys, tmp_path):
    pytest.importorskip("torch")
    trace = tmp_path / "trace.json"
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "2", "--json",
                         "--vs", "torch", "--gemm-size", "64", "--trace", str(trace)))
    cfg = preset("tiny", max_seq_len=8)
    assert out["tokens_per_step"] == 16
    check_side(out, out["model_flops_per_step"], 16)
    check_side(out["torch"], out["model_flops_per_step"], 16)
    assert out["sgemm_peak_flops_per_s"] > 0
    assert out["mfu"] == pytest.approx(out["model_flops_per_s"] / out["sgemm_peak_flops_per_s"])
    # same weights and batch on both sides: the warm-up losses agree, near ln(V) for a fresh model
    assert out["losses_agree"] and out["loss_step0"] == pytest.approx(out["torch"]["loss_step0"], rel=1e-4)
    assert abs(out["loss_step0"] - math.log(cfg.vocab_size)) < 0.5
    assert out["speedup_vs_torch"] > 0 and out["rss_ratio_vs_torch"] > 0
    # every linear is 3 dispatched GEMMs (forward, dx, dW): wqkv, wo, w13, w2 per layer
    assert out["dispatches_per_step"] == {"numpy": 3 * 4 * cfg.n_layers}
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e["name"] == "attention" for e in events)


def test_flops_follow_palm_accounting():
    cfg = preset("stories15M")
    norms = (2 * cfg.n_layers + 1) * cfg.dim  # RMSNorm weights are not GEMM weights
    assert bench.gemm_params(cfg) == cfg.num_params() - norms
    tokens = 8 * 256
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 256 * tokens
    assert bench.flops_per_step(cfg, 8, 256) == 6 * bench.gemm_params(cfg) * tokens + attention


def test_lora_needs_finetune(capsys):
    with pytest.raises(FusegradError, match="LoRA benchmark needs fusegrad.finetune"):
        run(capsys, "--preset", "tiny", "--lora")


def test_bad_steps_raise(capsys):
    with pytest.raises(FusegradError, match="--steps"):
        run(capsys, "--preset", "tiny", "--steps", "0")
