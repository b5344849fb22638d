"""The one training loop. Pretraining (train/trainer.py), LoRA fine-tuning and classification
(finetune/trainer.py) and `fusegrad bench` are each a `Run` that supplies the loss of a micro-batch, an
evaluation and a checkpoint; the step (gradient accumulation, data-parallel averaging, fp16 loss scaling,
clipping, AdamW on a cosine schedule), evaluation, checkpointing, NaN stopping, the tqdm progress bar and
the metrics log (metrics.jsonl in the run directory, and TensorBoard when it is installed) live here once.

Nothing non-finite is saved: before each checkpoint every weight and AdamW moment is checked, and a NaN/inf
one stops the run naming the step and the tensor, the last checkpoint untouched. Ctrl-C finishes the step,
saves a checkpoint and stops; a second Ctrl-C exits at once. `restore` reads the loop's part of a checkpoint
(step, history, AdamW state), each field checked.

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
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from fusegrad.backends import gemm_offload, use_backend
from fusegrad.core.errors import FormatError, FusegradError
from fusegrad.core.fileio import remove_stale_temps, storage_error
from fusegrad.core.settings import check_fields, setting
from fusegrad.core.trace import count, mark_step, span, trace
from fusegrad.parallel.workers import ProcessDataParallel, WorkerError, choose_workers
from fusegrad.train.checkpoint import value, weights
from fusegrad.train.optim import clip_factor, grad_norm
from fusegrad.train.schedule import cosine_schedule

METRICS_FILE = "metrics.jsonl"
MAX_WEIGHT = 1e4  # a trained weight this large means divergence (healthy Llama weights stay well below 10)
FP16_LOSS_SCALE = 2.0 ** 16  # the first loss scale of an fp16 run
LOSS_SCALE_GROWTH_INTERVAL = 200  # good steps before an fp16 loss scale doubles again
log = logging.getLogger("fusegrad.train")


class TrainingError(FusegradError, RuntimeError):
    """Training cannot go on (NaN/inf loss, mismatched resume); the last good checkpoint is kept."""


@dataclasses.dataclass
class RunConfig:
    """The settings every run shares; TrainConfig and FinetuneConfig extend them with their task's."""
    batch_size: int = setting(16, "rows (sequences) per micro-batch", "[1, 1048576]")
    grad_accum: int = setting(1, "micro-batches per optimizer step, their gradients averaged", "[1, 65536]")
    max_steps: int = setting(600, "optimizer steps of the whole run", "[1, inf)")
    lr: float = setting(3e-3, "peak learning rate (AdamW), after warmup", "(0, inf)")
    min_lr: float | None = setting(None, "floor of the cosine decay (none: lr / 10; never above lr)", "[0, inf)")
    warmup_steps: int = setting(30, "steps of linear warmup to lr (at most max_steps)", "[0, inf)")
    weight_decay: float = setting(0.1, "AdamW decoupled weight decay of matrices", "[0, inf)")
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0 = off)", "[0, inf)")
    val_fraction: float = setting(0.1, "share of the data held out for validation", "[0, 1)")
    eval_interval: int = setting(100, "steps between validations, and one at the end (0 = none)", "[0, inf)")
    ckpt_interval: int = setting(100, "steps between checkpoints (0 = at the end only)", "[0, inf)")
    seed: int = setting(1337, "seed of weights, data order and dropout", "[0, 4294967295]")
    resume: bool = setting(False, "continue from the checkpoint in the run directory")
    progress: bool = setting(True, "show a progress bar")
    quiet: bool = setting(False, "print nothing but errors")
    trace: str = setting("", "write a Chrome trace of the run to this file")
    backend: str = setting("numpy", "where the run computes: numpy, torch[:cuda|mps|cpu|meta], ane, ane-sim or any "
                                    "registered backend (`fusegrad info` lists those usable here)")
    device: str = setting("", "with backend torch: cuda, mps, cpu or meta (empty: the best present)")
    dtype: str = setting("fp32", "GEMM precision; bf16/fp16 keep fp32 master weights (torch backend)", "fp32|bf16|fp16")
    workers: int = setting(0, "processes splitting each batch, one core each (0 = one per core with numpy, 1 = one "
                                  "process)", "[0, inf)")
    log_interval: int = setting(1, "steps between loss reads (on a device the only host sync of a step)", "[1, inf)")
    checkpoint_activations: bool = setting(False, "keep only each block's input; recompute the block in the backward "
                                                  "(less memory for longer contexts, ~1/3 more compute)")

    def check(self, task: str) -> None:
        """Every setting of type and range (ConfigError naming `task`, the key and the value)."""
        check_fields(self, task)

    @property
    def lr_floor(self) -> float:
        return self.lr / 10 if self.min_lr is None else min(self.min_lr, self.lr)


@contextlib.contextmanager
def run_context(backend: str = "numpy", offload_gemm: str = "", tracing: bool = False, dtype: str = "fp32"):
    """The run's backend, its GEMM dtype, GEMM offload and tracer for this block only -> the tracer, or None."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(stack.enter_context(use_backend(backend)).precision(dtype))
        if offload_gemm:
            stack.enter_context(gemm_offload(offload_gemm))
        yield stack.enter_context(trace()) if tracing else None


def start_workers(model, requested: int, rows: int, eligible: bool, extras=(), setup=None):
    """ProcessDataParallel for `requested` worker processes (0 = auto: one per core when `eligible`), or None
    for one process whose kernels use every core; extras and setup: a run's adapters (ProcessDataParallel).
    Auto falls back to one process, with a warning, when workers cannot start; asked for by number, the
    reason is raised."""
    n = choose_workers(requested, rows, eligible)
    if n == 1:
        return None
    try:
        return ProcessDataParallel(model, n, extras, setup)
    except WorkerError as e:
        if requested:
            raise
        log.warning("training in one process: %s", e)
        return None


@contextlib.contextmanager
def deferred_interrupt():
    """Yield a list that the first Ctrl-C appends to (the loop finishes its step, saves and stops); a second
    raises KeyboardInterrupt at once (worker processes and shared memory are still released on the way out).
    Outside the main thread Ctrl-C is left alone."""
    hits = []

    def handler(signum, frame):
        if hits:
            raise KeyboardInterrupt
        hits.append(signum)
        os.write(2, b"\nfusegrad: interrupted; saving a checkpoint after this step (Ctrl-C again to exit now)\n")

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield hits
        return
    try:
        yield hits
    finally:
        signal.signal(signal.SIGINT, old)


class MetricsLog:
    """Each logged step and evaluation: one JSON object per line in run_dir/metrics.jsonl, and TensorBoard
    scalars in run_dir when the `tensorboard` package is installed."""

    def __init__(self, run_dir: str, append: bool):
        self.path = os.path.join(run_dir, METRICS_FILE)
        with self._storage():
            os.makedirs(run_dir, exist_ok=True)
            self.file = open(self.path, "a" if append else "w")
        try:
            from tensorboard.summary import Writer
        except ImportError:
            Writer = None
        self.board = Writer(run_dir) if Writer is not None else None

    def write(self, record: dict) -> None:
        record = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        with self._storage():
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self.board.add_scalar(key, value, step=record["step"])

    @contextlib.contextmanager
    def _storage(self):
        try:
            yield
        except OSError as exc:  # a full disk, a read-only or unwritable directory: one line, not a traceback
            raise storage_error(self.path, exc) from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
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
    deferred_reads = False  # True in the loop: a device loss stays on the device until a logging step
    run_dir = ""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.step = 0
        self.history = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": []}
        self.last_tokens = 0
        self.backend = f"{cfg.backend}:{cfg.device}" if cfg.device else cfg.backend

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
    def train_step(self):
        """One optimizer step -> its loss: a float, or in the loop's own steps on a device a 0-d device array
        (the loop reads those at logging intervals: `read_losses`)."""
        cfg = self.cfg
        lr = cosine_schedule(self.step, cfg.lr, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps, cfg.lr_floor)
        scale = self.loss_scale[0] if self.loss_scale else 1.0
        total, self.last_tokens = 0.0, 0
        for _ in range(cfg.grad_accum):  # accumulation averages the micro-batch grads
            value, tokens = self.micro_batch(scale / cfg.grad_accum)
            if isinstance(value, float) and not math.isfinite(value):  # a device loss is checked when read
                raise self.Error(f"step {self.step + 1}: loss is {value}; training stopped. The last good "
                                 f"checkpoint (in {self.run_dir}, if any) is kept untouched")
            total += value / cfg.grad_accum
            self.last_tokens += tokens
        params = self.optimizer.params
        if self.dp is not None:  # mean over ranks = the single-process grads of the global batch
            self.dp.allreduce_grads(params)
            total = self.dp.average(total)
        if self.loss_scale is None or self._unscale_grads(params, scale):
            clip = 1.0  # the clip's factor is folded into AdamW's pass over the grads
            if cfg.grad_clip > 0:
                with span("grad_norm", "optimizer"):
                    clip = clip_factor(grad_norm(params), cfg.grad_clip, params[0].backend.xp)
            with span("adamw", "optimizer"):
                self.optimizer.lr = lr
                self.optimizer.step(grad_scale=clip)
        self.optimizer.zero_grad()
        self.step += 1
        for key, v in (("step", self.step), ("loss", total), ("lr", lr)):
            self.history[key].append(v)
        return total if self.deferred_reads or isinstance(total, float) else self.read_losses()

    def model_loss_backward(self, tokens, grad_scale: float) -> tuple[float, int]:
        """The model's next-token loss of the global batch tokens (B, T+1) and the grads of grad_scale * loss
        added -> (loss, B T): this rank's rows under MPI, split over the worker processes when there are."""
        n = tokens.shape[0] * (tokens.shape[1] - 1)
        tokens = tokens if self.dp is None else self.dp.shard(tokens)
        if self.workers is not None:  # loss and backward of a slice of rows per core, grads summed
            return self.workers.loss_backward(tokens, grad_scale), n
        return self.backward_loss(self.model.loss(tokens), grad_scale), n

    def backward_loss(self, loss, grad_scale: float):
        """The grads of grad_scale * loss added -> the loss: a float on the host (a non-finite one skips the
        backward), a 0-d array on a device (no host read inside a step; `read_losses` checks it)."""
        if not isinstance(loss.data, np.ndarray):
            (loss * grad_scale).backward()
            return loss.data
        value = loss.item()
        if math.isfinite(value):
            (loss * grad_scale).backward()
        return value

    def read_losses(self) -> float:
        """Device losses of the steps since the last read -> floats in history (one host sync); the last
        loss. TrainingError naming the first step whose loss is not finite."""
        losses = self.history["loss"]
        pending = [i for i, v in enumerate(losses) if not isinstance(v, float)]
        if pending:
            be = self.optimizer.params[0].backend
            host = be.to_numpy(be.xp.stack([be.xp.astype(losses[i], be.accum_dtype) for i in pending]))
            for i, v in zip(pending, host.tolist()):
                losses[i] = v
                if not math.isfinite(v):
                    raise self.Error(f"step {self.history['step'][i]}: loss is {v}; training stopped. The last good "
                                     f"checkpoint (in {self.run_dir}, if any) is kept untouched")
        return losses[-1]

    def check_finite(self) -> None:
        """TrainingError naming the step and tensor if a weight or AdamW moment holds NaN or inf, or a weight
        reached MAX_WEIGHT in magnitude (a diverged run whose loss stays finite behind the norms)."""
        opt = self.optimizer
        for name, p, m, v in zip(opt.names, opt.params, opt.exp_avg, opt.exp_avg_sq):
            for what, x in (("weight", p.data), ("AdamW exp_avg of", m), ("AdamW exp_avg_sq of", v)):
                x = p.backend.to_numpy(x)
                top = float(np.abs(x).max()) if x.size else 0.0
                big = what == "weight" and MAX_WEIGHT <= top < math.inf
                if big or not np.isfinite(x).all():
                    raise self.Error(f"step {self.step}: {what} {name} "
                                     + (f"reached {top:.3g} in magnitude" if big else "holds NaN or inf")
                                     + f": the run diverged (lower lr?); stopped without saving. The last good "
                                     f"checkpoint (in {self.run_dir}, if any) is kept untouched")

    def restore(self, state: dict, path) -> None:
        """Step, history and AdamW state from a loaded checkpoint; FormatError naming the file and field."""
        opt = self.optimizer
        shapes = {n: p.shape for n, p in zip(opt.names, opt.params)}
        for key in ("exp_avg", "exp_avg_sq"):
            weights(state, f"optimizer/{key}", shapes, path)
        for name in opt.names:
            value(state, f"optimizer/steps/{name}", int, path, "[0, inf)")
        step = value(state, "step", int, path, "[0, inf)")
        history = state.get("history")
        if not (isinstance(history, dict) and all(isinstance(v, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) for v in history.values())):
            raise FormatError(f"{path}: checkpoint field 'history' is not a mapping of lists of numbers")
        opt.load_state_dict(state["optimizer"])
        self.step, self.history = step, {k: list(v) for k, v in history.items()}

    def _unscale_grads(self, params, scale: float) -> bool:
        """Divide grads by the loss scale; False (skip the step, halve the scale) if any is inf/NaN,
        and double the scale after LOSS_SCALE_GROWTH_INTERVAL good steps."""
        grads = [p.grad for p in params if p.grad is not None]
        xp = params[0].backend.xp  # one host read of a device-side count (as torch's GradScaler)
        if int(sum(xp.sum(xp.astype(~xp.isfinite(g), xp.int32)) for g in grads)):
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
        if self.cfg.dtype == "fp16" and self.loss_scale is None:  # fp16 GEMMs: the loss is scaled
            self.loss_scale = [FP16_LOSS_SCALE, 0]
        try:
            with self.dp.abort_on_error() if self.dp is not None else contextlib.nullcontext():
                with run_context(self.backend, self.offload_gemm, bool(self.cfg.trace) and self.is_main,
                                 self.cfg.dtype) as tracer:
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
        if main:
            remove_stale_temps(self.run_dir)  # of writers that crashed, e.g. killed while saving a checkpoint
        t_start = time.perf_counter()
        self.deferred_reads = True
        try:
            with deferred_interrupt() as interrupted:
                self._steps(bar, metrics, interrupted)
        finally:
            self.deferred_reads = False
            bar.close()
            if metrics is not None:
                metrics.close()
        last_of = {k: (v[-1] if v else None) for k, v in self.history.items()}
        return {"step": self.step, "loss": last_of["loss"], "val_loss": last_of["val_loss"],
                "seconds": time.perf_counter() - t_start}

    def _steps(self, bar, metrics, interrupted: list) -> None:
        cfg, main = self.cfg, self.is_main
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            if not isinstance(loss, float):  # on a device: read the loss at logging intervals only
                if self.step % cfg.log_interval and self.step != cfg.max_steps and not interrupted and not any(
                        i and self.step % i == 0 for i in (cfg.eval_interval, cfg.ckpt_interval,
                                                           self.dp.check_interval if self.dp else 0)):
                    bar.update(1)
                    continue
                loss = self.read_losses()
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
                for key, v in val.items():
                    self.history.setdefault(key, []).append(v)
                record.update(val)
                if not cfg.quiet:
                    bar.write(f"step {self.step}: train loss {loss:.4f}, "
                              + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in val.items()), file=sys.stderr)
            if metrics is not None:
                metrics.write(record)
            if main and ((cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last or interrupted):
                self.check_finite()
                self.save()
            if interrupted:
                raise KeyboardInterrupt

    def close(self) -> None:
        """Stop the worker processes (the model's weights leave shared memory, values kept)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None
