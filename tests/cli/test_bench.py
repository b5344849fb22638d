"""`fusegrad bench` smoke run on the tiny preset (no timing asserted) and its FLOP accounting."""
import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess

import pytest

from benchmarks import compare
from fusegrad.backends import openblas
from fusegrad.cli import bench
from fusegrad.cli.main import main
from fusegrad.core.errors import FusegradError
from fusegrad.finetune.trainer import Finetuner
from fusegrad.models.llama import Llama, preset
from fusegrad.train.loop import Run
from fusegrad.train.trainer import Trainer


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
    # medians and their spread; each step's MFU against the mean of the sgemm peaks measured around it
    steps = row["per_step"]
    assert sorted(r["step_s"] for r in steps)[0] == s["min"] and max(r["step_s"] for r in steps) == s["max"]
    for r in steps:
        assert r["sgemm_peak_flops_per_s"] == pytest.approx(sum(r["sgemm_peak_bracket"]) / 2)
        assert r["mfu"] == pytest.approx(steps_flops / r["step_s"] / r["sgemm_peak_flops_per_s"])
    mfus, peaks = [r["mfu"] for r in steps], [r["sgemm_peak_flops_per_s"] for r in steps]
    measured = [p for r in steps for p in r["sgemm_peak_bracket"]]
    assert row["spread"]["mfu"] == [min(mfus), max(mfus)] and min(mfus) <= row["mfu"] <= max(mfus)
    assert row["spread"]["sgemm_peak_flops_per_s"] == [min(measured), max(measured)]
    assert min(peaks) <= row["sgemm_peak_flops_per_s"] <= max(peaks)
    assert row["spread"]["tokens_per_s"] == pytest.approx([tokens / s["max"], tokens / s["min"]])


def check_run(out):
    """What the run says about the machine, and that an MFU above 1 never goes unflagged."""
    assert out["cpu"]["model"] and set(out["cpu"]["isa"]) <= set(bench.ISA)
    assert all(x >= 0 for x in out["load_average"]) and len(out["load_average"]) == 2
    mfus = [r["mfu"] for side in [out] + [out[p] for p in ("torch", "peft") if p in out] for r in side["per_step"]]
    assert out["noisy"] == bool(out["noisy_reasons"])
    assert out["noisy"] or max(mfus) <= 1


@pytest.mark.skipif(shutil.which("lscpu") is None or platform.machine() != "x86_64", reason="x86-64 lscpu")
def test_bench_names_the_cpu_and_its_isa():
    info, lscpu = bench.cpu_info(), subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())}
    assert info["model"] == fields["Model name"]
    assert info["isa"] == [f for f in bench.ISA if f in fields.get("Flags", "").split()]


def test_bench_vs_torch_json(capsys, tmp_path):
    pytest.importorskip("torch")
    trace = tmp_path / "trace.json"
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "2", "--json",
                         "--vs", "torch", "--gemm-size", "64", "--trace", str(trace)))
    cfg = preset("tiny", max_seq_len=8)
    assert out["tokens_per_step"] == 16
    check_side(out, out["model_flops_per_step"], 16)
    check_side(out["torch"], out["model_flops_per_step"], 16)
    check_run(out)
    assert out["sgemm_peak_flops_per_s"] > 0 and out["torch"]["kernels"].startswith("torch ")
    # which BLAS kernels ran, and whether the environment forced them
    assert out["blas_core"] == openblas.corename()
    assert out["openblas_coretype_env"] == os.environ.get("OPENBLAS_CORETYPE")
    # same weights and batch on both sides: the warm-up losses agree, near ln(V) for a fresh model
    assert out["losses_agree"] and out["loss_step0"] == pytest.approx(out["torch"]["loss_step0"], rel=1e-4)
    assert abs(out["loss_step0"] - math.log(cfg.vocab_size)) < 0.5
    assert out["speedup_vs_torch"] > 0 and out["rss_ratio_vs_torch"] > 0
    # every linear is 3 dispatched GEMMs (forward, dx, dW): wqkv, wo, w13, w2 per layer (counted in the main
    # process, which runs its slice of the batch; one worker process per core, a row each here)
    assert out["workers"] == min(2, len(os.sched_getaffinity(0)))
    assert out["dispatches_per_step"] == {"numpy": 3 * 4 * cfg.n_layers}
    if out["workers"] > 1:  # each worker's busy seconds a step; the step waits for the slowest
        busy = out["worker_busy_s"]
        assert len(busy) == 2 and all(len(b) == out["workers"] and min(b) > 0 for b in busy)
        assert out["worker_imbalance"] == pytest.approx(statistics.median(max(b) / min(b) for b in busy))
        assert "worker_imbalance" not in out["torch"]
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e["name"] == "attention" for e in events)


def gemm_params(cfg) -> int:
    """Weights a GEMM multiplies by per token: the projections and the classifier (an untied input embedding
    is a lookup)."""
    per_layer = cfg.dim * (cfg.dim + 2 * cfg.kv_dim) + cfg.dim * cfg.dim + 3 * cfg.dim * cfg.hidden_dim
    return cfg.n_layers * per_layer + cfg.vocab_size * cfg.dim


def attention_flops(cfg, seq, tokens) -> int:
    """QK^T and PV, forward and backward, over the full T x T square (PaLM)."""
    return 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * tokens


def test_flops_follow_palm_accounting():
    cfg = preset("stories15M")
    norms = (2 * cfg.n_layers + 1) * cfg.dim  # RMSNorm weights are not GEMM weights
    assert gemm_params(cfg) == cfg.num_params() - norms
    tokens = 8 * 256
    assert Llama(cfg).flops_per_token(256) * tokens == 6 * gemm_params(cfg) * tokens + attention_flops(cfg, 256, tokens)


def test_the_bench_times_the_step_users_run():
    assert bench.BenchRun.train_step is Trainer.train_step is Finetuner.train_step is Run.train_step
    assert bench.BenchRun.model_loss_backward is Trainer.model_loss_backward


def lora_params(cfg, targets, r):
    """Adapter weights r (in + out) per target and layer, from the config alone."""
    out = {"q": cfg.dim, "k": cfg.kv_dim, "v": cfg.kv_dim, "o": cfg.dim, "gate": cfg.hidden_dim,
           "up": cfg.hidden_dim, "down": cfg.dim}
    inp = {t: (cfg.hidden_dim if t == "down" else cfg.dim) for t in out}
    return cfg.n_layers * sum(r * (inp[t] + out[t]) for t in targets)


def test_bench_lora_vs_peft_json(capsys):
    pytest.importorskip("peft")
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "2", "--json",
                         "--lora", "--targets", "q,v,down", "--rank", "4", "--alpha", "8", "--vs", "peft",
                         "--gemm-size", "64"))
    cfg = preset("tiny", max_seq_len=8)
    assert out["lora"]["trainable_params"] == lora_params(cfg, ("q", "v", "down"), 4)
    assert out["lora"]["peft_target_modules"] == ["q_proj", "v_proj", "down_proj"]
    lora_flops = 4 * gemm_params(cfg) * 16 + 6 * out["lora"]["trainable_params"] * 16  # no dW of the frozen base
    assert out["model_flops_per_step"] == lora_flops + attention_flops(cfg, 8, 16)
    check_side(out, out["model_flops_per_step"], 16)
    check_side(out["peft"], out["model_flops_per_step"], 16)
    check_run(out)
    # B = 0 at step 0: both sides compute the base model's loss on the same batch
    assert out["losses_agree"] and out["loss_step0"] == pytest.approx(out["peft"]["loss_step0"], rel=1e-4)
    assert out["speedup_vs_peft"] > 0 and out["rss_ratio_vs_peft"] > 0


def test_bench_dora_vs_peft_times_the_same_adapters(capsys):
    pytest.importorskip("peft")
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--json",
                         "--lora", "--dora", "--targets", "q,v", "--rank", "4", "--vs", "peft", "--gemm-size", "64"))
    cfg = preset("tiny", max_seq_len=8)  # DoRA's magnitudes: one per output row of each adapted part
    assert out["lora"]["dora"] and out["lora"]["trainable_params"] == lora_params(cfg, ("q", "v"), 4) + \
        cfg.n_layers * (cfg.dim + cfg.kv_dim)
    assert out["losses_agree"] and out["loss_step0"] == pytest.approx(out["peft"]["loss_step0"], rel=1e-4)


def test_bench_qlora_reports_nf4_memory(capsys):
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--json",
                         "--lora", "--qlora", "--workers", "2", "--gemm-size", "64"))
    cfg = preset("tiny")
    assert out["workers"] == 2  # each process dequantizes its own copy of the NF4 bases
    mem = out["lora"]["memory"]
    projections = cfg.n_layers * (cfg.dim * (cfg.dim + 2 * cfg.kv_dim) + cfg.dim * cfg.dim + 3 * cfg.dim * cfg.hidden_dim)
    assert mem["fp32_bytes"] == 4 * projections and mem["ratio"] <= 0.16
    assert abs(out["loss_step0"] - math.log(cfg.vocab_size)) < 0.5


def test_bench_qlora_on_a_gguf_keeps_its_blocks_unless_told_nf4(capsys, tmp_path):
    """As `fusegrad finetune --qlora`: a GGUF file's quantized projections stay in its own blocks (--quantize auto),
    or all become NF4 (--quantize nf4); the log line names what the base holds."""
    from fusegrad.data.tokenizer import ByteTokenizer
    from fusegrad.models.export import export_model

    path = tmp_path / "tiny-q8_0.gguf"
    export_model(Llama(preset("tiny", vocab_size=258), seed=0), path, "gguf", ByteTokenizer(), "q8_0")
    args = ("--model", str(path), "--batch", "2", "--seq", "8", "--steps", "1", "--lora", "--qlora",
            "--workers", "1", "--gemm-size", "64")
    kept = json.loads(run(capsys, *args, "--json"))["lora"]["memory"]
    assert set(kept["formats"]) == {"Q8_0"} and kept["base_bytes"] == kept["fp32_bytes"] * 34 // 128
    nf4 = json.loads(run(capsys, *args, "--quantize", "nf4", "--json"))["lora"]["memory"]
    assert set(nf4["formats"]) == {"NF4"} and nf4["base_bytes"] == kept["nf4_bytes"]
    assert "frozen base projections: Q8_0 " in run(capsys, *args)


def base_loss(cfg, batch, seq):
    return Llama(cfg, seed=0).loss(bench.batch_tokens(0, 0, batch, seq, cfg.vocab_size)).item()


def test_bench_torch_backend(capsys):
    pytest.importorskip("torch")
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--json",
                         "--backend", "torch:cpu", "--gemm-size", "64"))
    cfg = preset("tiny", max_seq_len=8)
    assert out["backend"] == "torch:cpu" and out["dispatches_per_step"] == {"torch:cpu": 3 * 4 * cfg.n_layers}
    check_side(out, out["model_flops_per_step"], 16)
    assert out["loss_step0"] == pytest.approx(base_loss(cfg, 2, 8), rel=1e-5)


def test_bench_torch_device_and_dtype_vs_torch_autocast(capsys):
    """--backend torch --device cpu --dtype bf16: fusegrad's bf16 step and the eager peer under autocast bf16,
    on the same device, from the same weights: their step-0 losses agree to bf16's precision."""
    pytest.importorskip("torch")
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--json",
                         "--backend", "torch", "--device", "cpu", "--dtype", "bf16", "--vs", "torch",
                         "--gemm-size", "64"))
    cfg = preset("tiny", max_seq_len=8)
    assert out["backend"] == "torch:cpu" and out["dtype"] == "bf16"
    assert out["dispatches_per_step"] == {"torch:cpu": 3 * 4 * cfg.n_layers}
    assert out["torch"]["kernels"].endswith("autocast bf16")
    check_side(out, out["model_flops_per_step"], 16)
    check_side(out["torch"], out["model_flops_per_step"], 16)
    fp32 = base_loss(cfg, 2, 8)
    for loss in (out["loss_step0"], out["torch"]["loss_step0"]):
        assert loss != fp32 and loss == pytest.approx(fp32, rel=1e-2)


def test_bench_fp16_scales_the_loss(capsys):
    pytest.importorskip("torch")
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "2", "--json",
                         "--backend", "torch:cpu", "--dtype", "fp16", "--gemm-size", "64"))
    assert out["dtype"] == "fp16" and out["loss_step0"] == pytest.approx(base_loss(preset("tiny", max_seq_len=8), 2, 8),
                                                                          rel=1e-2)
    step = bench.BenchRun(Llama(preset("tiny")), 2, "torch:cpu", workers=1, dtype="fp16")
    assert step.loss_scale == [2.0 ** 16, 0] and step.cfg.dtype == "fp16"  # as `fusegrad train` starts fp16


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun on PATH (pip install mpich)")
def test_bench_two_ranks_split_the_global_batch(capsys):
    pytest.importorskip("mpi4py")
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "4", "--seq", "8", "--steps", "1", "--json",
                         "--ranks", "2", "--gemm-size", "64"))
    cfg = preset("tiny", max_seq_len=8)
    assert out["ranks"] == 2 and out["tokens_per_step"] == 32
    check_side(out, out["model_flops_per_step"], 32)
    # the mean of the two ranks' half-batch losses is the loss of the global batch
    assert out["loss_step0"] == pytest.approx(base_loss(cfg, 4, 8), rel=1e-5)


@pytest.mark.parametrize("argv, match", [(["--vs", "peft"], "--vs peft needs --lora"),
                                         (["--lora", "--vs", "torch"], "--vs torch cannot time --lora"),
                                         (["--qlora"], "--qlora needs --lora"), (["--dora"], "--dora needs --lora"),
                                         (["--lora", "--quantize", "nf4"], "--quantize nf4 chooses --qlora's base"),
                                         (["--batch", "3", "--ranks", "2"], "--batch 3 must split evenly"),
                                         (["--lora", "--ranks", "2"], "does not combine with --lora"),
                                         (["--lora", "--workers", "3"], "--workers 3 must be 0 .auto. or 1..2"),
                                         (["--device", "cpu"], "--device cpu needs --backend torch"),
                                         (["--backend", "torch:cpu", "--device", "cuda"], "needs --backend torch "),
                                         (["--dtype", "bf16"], "--dtype bf16 needs --backend torch")])
def test_bad_combinations_raise(capsys, argv, match):
    with pytest.raises(FusegradError, match=match):
        run(capsys, "--preset", "tiny", "--batch", "2", *argv)


def test_bad_steps_raise(capsys):
    with pytest.raises(FusegradError, match="--steps"):
        run(capsys, "--preset", "tiny", "--steps", "0")


def test_the_fusegrad_command_times_the_product_step_in_process(capsys):
    assert main(["bench", "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--workers", "1",
                 "--gemm-size", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cfg = preset("tiny", max_seq_len=8)
    assert out["workers"] == 1 and out["dispatches_per_step"] == {"numpy": 3 * 4 * cfg.n_layers}
    assert out["loss_step0"] == pytest.approx(base_loss(cfg, 2, 8), rel=1e-5)


def peaks_from(values, monkeypatch):
    """sgemm_peak returns `values` in turn (the FLOP/s a busy or quiet machine would measure)."""
    calls = iter(values)
    monkeypatch.setattr(bench, "sgemm_peak", lambda n, repeats=3: next(calls))


def test_a_noisy_peak_flags_the_run(capsys, monkeypatch):
    peaks_from([1e15, 1e15, 1e3, 1e3], monkeypatch)  # the last peaks as if another job had taken the cores
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "3", "--workers", "1",
                         "--json"))
    check_side(out, out["model_flops_per_step"], 16)
    check_run(out)
    # a step's peak: the mean of the peaks measured just before and just after it
    assert [r["sgemm_peak_bracket"] for r in out["per_step"]] == [[1e15, 1e15], [1e15, 1e3], [1e3, 1e3]]
    assert [r["sgemm_peak_flops_per_s"] for r in out["per_step"]] == [1e15, (1e15 + 1e3) / 2, 1e3]
    assert out["per_step"][2]["mfu"] > 1 and out["noisy"]
    assert any("MFU reached" in r and "timed step 2" in r for r in out["noisy_reasons"])
    assert any("sgemm peak varied" in r for r in out["noisy_reasons"])


def test_a_noisy_run_warns_in_text_and_on_stderr(capsys, monkeypatch):
    peaks_from(itertools.cycle([1e3]), monkeypatch)
    assert main(["bench", "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--workers", "1",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["noisy"] and "too noisy to trust" in captured.err and "MFU reached" in captured.err
    peaks_from(itertools.cycle([1e3]), monkeypatch)
    assert main(["bench", "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--workers", "1"]) == 0
    assert "NOISY, do not quote these figures: fusegrad's MFU reached" in capsys.readouterr().out


def test_compare_measures_the_peak_between_the_steps_of_both_sides(capsys, monkeypatch, tmp_path):
    pytest.importorskip("torch")
    model = Llama(preset("tiny", max_seq_len=16), seed=3)  # a checkpoint, not the preset's seed-0 weights
    model.save_llama2c(tmp_path / "model.bin", version=0)
    peaks_from([1e15 * (k + 1) for k in range(7)], monkeypatch)
    assert compare.main(["--model", str(tmp_path / "model.bin"), "--batch", "2", "--seq", "8", "--steps", "3",
                         "--vs", "torch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # alternating: fusegrad then torch, torch then fusegrad, fusegrad then torch; a fresh peak between steps,
    # each step's the mean of the two around it
    assert [r["sgemm_peak_flops_per_s"] / 1e15 for r in out["per_step"]] == [1.5, 4.5, 5.5]
    assert [r["sgemm_peak_flops_per_s"] / 1e15 for r in out["torch"]["per_step"]] == [2.5, 3.5, 6.5]
    check_side(out, out["model_flops_per_step"], 16)
    check_side(out["torch"], out["model_flops_per_step"], 16)
    assert out["noisy"] and any("sgemm peak varied 1000000.0-7000000.0" in r for r in out["noisy_reasons"])
    # both sides start from the checkpoint's weights
    assert out["model"] == str(tmp_path / "model.bin") and out["preset"] is None
    assert out["losses_agree"] and out["loss_step0"] == pytest.approx(
        model.loss(bench.batch_tokens(0, 0, 2, 8, model.config.vocab_size)).item(), rel=1e-5)


def test_bench_any_checkpoint(capsys, tmp_path):
    model = Llama(preset("tiny", max_seq_len=16), seed=5)
    model.save_pretrained(tmp_path / "hf")
    out = json.loads(run(capsys, "--model", str(tmp_path / "hf"), "--batch", "2", "--seq", "8", "--steps", "1",
                         "--workers", "1", "--gemm-size", "64", "--json"))
    assert out["config"] == model.config.to_dict() and out["model"] == str(tmp_path / "hf")
    assert out["model_flops_per_step"] == model.flops_per_token(8) * 16
    assert out["loss_step0"] == pytest.approx(model.loss(bench.batch_tokens(0, 0, 2, 8, model.config.vocab_size)).item(), rel=1e-5)
    assert out["loss_step0"] != pytest.approx(base_loss(preset("tiny", max_seq_len=8), 2, 8), rel=1e-3)
    with pytest.raises(FusegradError, match="--seq 32 exceeds .*max_seq_len 16"):
        run(capsys, "--model", str(tmp_path / "hf"), "--batch", "2", "--seq", "32")
    with pytest.raises(FusegradError, match="nope"):
        run(capsys, "--model", str(tmp_path / "nope"), "--batch", "2", "--seq", "8")


def test_peers_need_a_checkout(capsys, monkeypatch):
    monkeypatch.setattr(bench, "CHECKOUT", "/nonexistent")  # an installed fusegrad: no benchmarks/ beside it
    with pytest.raises(FusegradError, match="comparison harness of a fusegrad checkout"):
        run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--vs", "torch")


def test_bench_checkpoint_activations_recomputes_each_block(capsys):
    """Each block's forward runs again in the backward: 4 more GEMMs per layer (wqkv, wo, w13, w2); the peer
    (plain PyTorch eager) starts from the same loss."""
    pytest.importorskip("torch")
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--json",
                         "--vs", "torch", "--gemm-size", "64", "--checkpoint_activations"))
    cfg = preset("tiny", max_seq_len=8)
    assert out["config"]["checkpoint_activations"] and out["losses_agree"]
    assert out["dispatches_per_step"] == {"numpy": (3 + 1) * 4 * cfg.n_layers}


def test_the_sgemm_peak_stops_openblas_threads_before_the_step_it_brackets(monkeypatch):
    stopped = []
    monkeypatch.setattr(bench, "stop_idle_threads", lambda: stopped.append(True))
    assert bench.sgemm_peak(64) > 0 and stopped == [True]


def test_uneven_worker_processes_flag_the_run(capsys, monkeypatch):
    if min(2, len(os.sched_getaffinity(0))) < 2:
        pytest.skip("one core: one process, no workers to compare")
    monkeypatch.setattr(bench.FusegradSide, "worker_busy_s", lambda self: [0.2, 0.5])  # a core other load slowed
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "2", "--json"))
    assert out["worker_busy_s"] == [[0.2, 0.5], [0.2, 0.5]] and out["worker_imbalance"] == pytest.approx(2.5)
    assert out["noisy"] and any("busy unevenly" in r and "2.50x" in r for r in out["noisy_reasons"])
    monkeypatch.setattr(bench.FusegradSide, "worker_busy_s", lambda self: None)  # one process: nothing to say
    out = json.loads(run(capsys, "--preset", "tiny", "--batch", "2", "--seq", "8", "--steps", "1", "--json"))
    assert "worker_imbalance" not in out and not any("unevenly" in r for r in out["noisy_reasons"])
