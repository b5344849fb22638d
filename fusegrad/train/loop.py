"""The one training loop. Pretraining (train/trainer.py), LoRA fine-tuning and classification
(finetune/trainer.py) and `fusegrad bench` are each a `Run` that supplies the loss of a micro-batch, an
evaluation and a checkpoint; the step (gradient accumulation, data-parallel averaging, fp16 loss scaling,
clipping, AdamW on a cosine schedule), evaluation, checkpointing, NaN stopping, the tqdm progress bar and
the metrics log (metrics.jsonl in the run directory, and TensorBoard when it is installed) live here once.

A run changes nothing process-wide: its backend, GEMM offload and tracer hold inside `run_context` only
and are restored when the run ends, also on error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from fusegrad.backends import gemm_offload, use_backend
from fusegrad.core.errors import ConfigError, FusegradError
from fusegrad.core.trace import count, mark_step, span, trace
from fusegrad.parallel.workers import ProcessDataParallel, WorkerError, choose_workers
from fusegrad.train.optim import clip_grad_norm
from fusegrad.train.schedule import cosine_schedule

METRICS_FILE = "metrics.jsonl"
LOSS_SCALE_GROWTH_INTERVAL = 200  # good steps before an fp16 loss scale doubles again
log = logging.getLogger("fusegrad.train")


class TrainingError(FusegradError, RuntimeError):
    """Training cannot go on (NaN/inf loss, mismatched resume); the last good checkpoint is kept."""


@dataclasses.dataclass
class RunConfig:
    """The settings every run shares; TrainConfig and FinetuneConfig extend them with their task's."""
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per step, their gradients averaged
    max_steps: int = 600
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # the global gradient norm is clipped to this; 0 = off
    val_fraction: float = 0.1
    eval_interval: int = 100
    ckpt_interval: int = 100
    seed: int = 1337
    resume: bool = False
    progress: bool = True
    quiet: bool = False
    trace: str = ""  # write a Chrome trace of the run here

    def check(self, task: str) -> None:
        if self.batch_size < 1 or self.grad_accum < 1 or self.max_steps < 1:
            raise ConfigError(f"{task}: batch_size, grad_accum and max_steps must be >= 1, got {self.batch_size}, "
                              f"{self.grad_accum}, {self.max_steps}")


@contextlib.contextmanager
def run_context(backend: str = "numpy", offload_gemm: str = "", tracing: bool = False):
    """The run's backend, GEMM offload and tracer for this block only -> the tracer, or None."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(use_backend(backend))
        if offload_gemm:
            stack.enter_context(gemm_offload(offload_gemm))
        yield stack.enter_context(trace()) if tracing else None


def start_workers(model, requested: int, rows: int, eligible: bool):
    """ProcessDataParallel for `requested` worker processes (0 = auto: one per core when `eligible`), or None
    for one process whose kernels use every core. Auto falls back to one process, with a warning, when
    workers cannot start; asked for by number, the reason is raised."""
    n = choose_workers(requested, rows, eligible)
    if n == 1:
        return None
    try:
        return ProcessDataParallel(model, n)
    except WorkerError as e:
        if requested:
            raise
        log.warning("training in one process: %s", e)
        return None


class MetricsLog:
    """Each logged step and evaluation: one JSON object per line in run_dir/metrics.jsonl, and TensorBoard
    scalars in run_dir when the `tensorboard` package is installed."""

    def __init__(self, run_dir: str, append: bool):
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, METRICS_FILE), "a" if append else "w")
        try:
            from tensorboard.summary import Writer
        except ImportError:
            Writer = None
        self.board = Writer(run_dir) if Writer is not None else None

    def write(self, record: dict) -> None:
        record = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.board.add_scalar(key, value, step=record["step"])

    def close(self) -> None:
        self.file.close()
        if self.board is not None:
            self.board.close()


class Run:
    """A training run. The task subclass sets `model`, `optimizer` and `run_dir` (and `dp`, `workers`,
    `loss_scale`, `backend`, `offload_gemm` when it uses them) and implements `micro_batch`, `evaluate`,
    `save` and `describe`; `finish` adds its extras to the result."""
    Error = TrainingError
    backend, offload_gemm = "numpy", ""  # the run's backend name and GEMM offload target, held during run()
    dp = workers = loss_scale = None  # MPI ranks, worker processes, fp16 loss scale [scale, good steps]
    run_dir = ""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step = 0
        self.history = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": []}
        self.last_tokens = 0

    # -- what a task provides ------------------------------------------------------------------------
    def micro_batch(self, grad_scale: float) -> tuple[float, int]:
        """Draw the next micro-batch, add the grads of grad_scale * its loss -> (its mean loss, tokens)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """-> {"loss": validation loss, ...}: each key becomes history["val_<key>"] and a metric."""
        raise NotImplementedError

    def save(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def finish(self, result: dict, say) -> dict:
        return result

    # -- the step ------------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg = self.cfg
        lr = cosine_schedule(self.step, cfg.lr, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps,
                             min(cfg.min_lr, cfg.lr))
        scale = self.loss_scale[0] if self.loss_scale else 1.0
        total, self.last_tokens = 0.0, 0
        for _ in range(cfg.grad_accum):  # accumulation averages the micro-batch grads
            value, tokens = self.micro_batch(scale / cfg.grad_accum)
            if not math.isfinite(value):
                raise self.Error(f"step {self.step + 1}: loss is {value}; training stopped. The last good "
                                 f"checkpoint (in {self.run_dir}, if any) is kept untouched")
            total += value / cfg.grad_accum
            self.last_tokens += tokens
        params = self.optimizer.params
        if self.dp is not None:  # mean over ranks = the single-process grads of the global batch
            self.dp.allreduce_grads(params)
            total = self.dp.average(total)
        if self.loss_scale is None or self._unscale_grads(params, scale):
            if cfg.grad_clip > 0:
                clip_grad_norm(params, cfg.grad_clip)
            with span("adamw", "optimizer"):
                self.optimizer.lr = lr
                self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        for key, value in (("step", self.step), ("loss", total), ("lr", lr)):
            self.history[key].append(value)
        return total

    def model_loss_backward(self, tokens, grad_scale: float) -> tuple[float, int]:
        """The model's next-token loss of the global batch tokens (B, T+1) and the grads of grad_scale * loss
        added -> (loss, B T): this rank's rows under MPI, split over the worker processes when there are."""
        n = tokens.shape[0] * (tokens.shape[1] - 1)
        tokens = tokens if self.dp is None else self.dp.shard(tokens)
        if self.workers is not None:  # loss and backward of a slice of rows per core, grads summed
            return self.workers.loss_backward(tokens, grad_scale), n
        loss = self.model.loss(tokens)
        value = loss.item()
        if math.isfinite(value):
            (loss * grad_scale).backward()
        return value, n

    def _unscale_grads(self, params, scale: float) -> bool:
        """Divide grads by the loss scale; False (skip the step, halve the scale) if any is inf/NaN,
        and double the scale after LOSS_SCALE_GROWTH_INTERVAL good steps."""
        grads = [p.grad for p in params if p.grad is not None]
        if not all(np.isfinite(g).all() for g in grads):
            self.loss_scale = [scale / 2, 0]
            count("loss_scale:overflow")
            log.warning("step %d: fp16 gradient overflow at loss scale %g; step skipped, scale now %g",
                        self.step + 1, scale, scale / 2)
            return False
        for g in grads:
            g *= 1.0 / scale
        good = self.loss_scale[1] + 1
        self.loss_scale = [scale * 2, 0] if good >= LOSS_SCALE_GROWTH_INTERVAL else [scale, good]
        return True

    # -- the loop ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, evaluates, writes checkpoints and metrics."""
        return self.dp is None or self.dp.is_main

    def run(self) -> dict:
        try:
            with self.dp.abort_on_error() if self.dp is not None else contextlib.nullcontext():
                with run_context(self.backend, self.offload_gemm, bool(self.cfg.trace) and self.is_main) as tracer:
                    result = self._loop()
                    if tracer is not None:
                        tracer.save_chrome(self.cfg.trace)
                        self._say(tracer.summary())
                    return self.finish(result, self._say)
        finally:
            self.close()

    def _say(self, *text) -> None:
        if not self.cfg.quiet and self.is_main:
            print(*text, file=sys.stderr)

    def _loop(self) -> dict:
        cfg, main = self.cfg, self.is_main
        self._say(self.describe())
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=not (cfg.progress and main and not cfg.quiet))
        metrics = MetricsLog(self.run_dir, append=self.step > 0) if main else None
        t_start = time.perf_counter()
        try:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                loss = self.train_step()
                record = {"step": self.step, "loss": loss, "lr": self.history["lr"][-1],
                          "tokens_per_s": self.last_tokens / (time.perf_counter() - t0)}
                mark_step(self.step)
                last = self.step == cfg.max_steps
                if self.dp is not None and (self.step % self.dp.check_interval == 0 or last):
                    self.dp.check_consistency(self.model.named_parameters(), self.step)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                refresh=False)
                bar.update(1)
                if main and cfg.eval_interval and (self.step % cfg.eval_interval == 0 or last):
                    val = {f"val_{k}": v for k, v in self.evaluate().items()}
                    self.history["val_step"].append(self.step)
                    for key, value in val.items():
                        self.history.setdefault(key, []).append(value)
                    record.update(val)
                    if not cfg.quiet:
                        bar.write(f"step {self.step}: train loss {loss:.4f}, "
                                  + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in val.items()), file=sys.stderr)
                if metrics is not None:
                    metrics.write(record)
                if main and ((cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last):
                    self.save()
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        last_of = {k: (v[-1] if v else None) for k, v in self.history.items()}
        return {"step": self.step, "loss": last_of["loss"], "val_loss": last_of["val_loss"],
                "seconds": time.perf_counter() - t_start}

    def close(self) -> None:
        """Stop the worker processes (the model's weights leave shared memory, values kept)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None
