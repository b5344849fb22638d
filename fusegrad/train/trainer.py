"""Pre-training loop: data, model, AdamW with a cosine schedule, clipping, accumulation, checkpoints.

Everything that shapes the loss trajectory (weights, optimizer moments, the data sampler's RNG, step,
history) goes into the checkpoint, so `resume=True` continues bit for bit where the run stopped.

>>> import tempfile
>>> cfg = TrainConfig(preset="tiny", max_steps=3, warmup_steps=1, batch_size=2, seq_len=16, out_dir=tempfile.mkdtemp(),
...                   progress=False, plot=False, sample_tokens=0, eval_interval=0, quiet=True)
>>> result = train(cfg)
>>> result["step"]
3
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time

import numpy as np

from fusegrad.backends import get_backend, set_default_backend
from fusegrad.core.errors import FormatError, FusegradError, ShapeError
from fusegrad.core.tensor import no_grad
from fusegrad.core.trace import TRACER, count, span
from fusegrad.models.llama import PRESETS, Llama, LlamaConfig
from fusegrad.train.checkpoint import load_checkpoint, save_checkpoint

CHECKPOINT_FILE = "checkpoint.safetensors"
LOSS_SCALE_GROWTH_INTERVAL = 200  # good steps before an fp16 loss scale doubles again

# the embedded default: small enough to learn visibly on a laptop CPU in a few minutes
PRESETS.setdefault("default", dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352,
                                   vocab_size=258, max_seq_len=128))


class TrainingError(FusegradError, RuntimeError):
    """Training cannot go on (NaN/inf loss, mismatched resume); the last good checkpoint is kept."""


@dataclasses.dataclass
class TrainConfig:
    # model: a preset, optionally overridden field by field
    preset: str = "default"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    tie_embeddings: bool | None = None
    # data: "" = the embedded CPython docs corpus; or a prepared shard dir, or text file(s)/dir to prepare
    data: str = ""
    tokenizer: str = "byte"
    vocab_size: int | None = None
    val_fraction: float = 0.1
    # optimisation
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    max_steps: int = 600
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 100
    out_dir: str = "runs/default"
    seed: int = 1337
    resume: bool = False
    backend: str = "numpy"
    workers: int = 0  # processes that each run a slice of every batch on one core: 0 = one per core, 1 = off
    device: str = ""  # with backend torch: cuda, mps or cpu ("" = the best one present)
    offload_gemm: str = ""  # torch:cuda|mps|cpu, ane, ane-sim: large GEMMs of the numpy model go there, per call
    sample_tokens: int = 200
    sample_prompt: str = ""
    temperature: float = 0.8
    top_p: float = 0.9
    progress: bool = True
    plot: bool = True
    quiet: bool = False
    trace: str = ""  # write a Chrome trace of the run here

    def model_config(self, vocab_size: int) -> LlamaConfig:
        if self.preset not in PRESETS:
            raise ShapeError(f"train: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        fields = dict(PRESETS[self.preset], vocab_size=vocab_size)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        fields["max_seq_len"] = max(self.seq_len, fields.get("max_seq_len", 0))
        return LlamaConfig(**fields)


def cosine_lr(step: int, cfg: TrainConfig) -> float:
    from fusegrad.train.schedule import cosine_schedule

    return cosine_schedule(step, cfg.lr, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps, cfg.min_lr)


def _prepare_data(cfg: TrainConfig) -> str:
    """-> a directory of shards (meta.json inside); prepares the embedded corpus or text input once."""
    from fusegrad.data.prepare import prepare

    if cfg.data and os.path.isfile(os.path.join(cfg.data, "meta.json")):
        return cfg.data
    if cfg.data and not os.path.exists(cfg.data):
        raise FormatError(f"{cfg.data}: no such data file or directory")
    out = os.path.join(cfg.out_dir, "data")
    if not os.path.isfile(os.path.join(out, "meta.json")):
        prepare(cfg.data or None, out, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                val_fraction=cfg.val_fraction, overwrite=True)
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from fusegrad.data.shards import TokenDataset, read_meta
        from fusegrad.data.tokenizer import load_tokenizer
        from fusegrad.train.optim import AdamW

        self.cfg = cfg
        if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_steps < 1:
            raise ShapeError(f"train: batch_size, grad_accum and max_steps must be >= 1, got {cfg.batch_size}, "
                             f"{cfg.grad_accum}, {cfg.max_steps}")
        self.backend = _setup_backend(cfg)  # the model's tensors live on it
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.data_dir = _prepare_data(cfg)
        meta = read_meta(self.data_dir)
        self.tokenizer = load_tokenizer(self.data_dir)
        self.tokenizer.save(cfg.out_dir)  # beside the checkpoint, so the run dir alone is enough to sample
        self.train_data = TokenDataset(self.data_dir, cfg.seq_len, "train")
        self.val_data = TokenDataset(self.data_dir, cfg.seq_len, "val") if meta.get("val_fraction", 0) else None
        # fp16 backends (ane, ane-sim) ask for loss scaling: [scale, good steps since the last change]
        scale = getattr(get_backend(), "loss_scale", None)
        if scale is None and cfg.offload_gemm.startswith("ane"):  # fp16 GEMMs offloaded: scale too
            scale = getattr(get_backend(cfg.offload_gemm), "loss_scale", None)
        self.loss_scale = None if scale is None else [float(scale), 0]
        self.model = Llama(cfg.model_config(meta["vocab_size"]), seed=cfg.seed)
        from fusegrad.parallel.mpi import DataParallel

        self.dp = DataParallel.from_env()  # None unless mpirun started several ranks
        if self.dp is not None:
            self.dp.broadcast_params(self.model.named_parameters())
        self.optimizer = AdamW(self.model.named_parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)
        self.step = 0
        self.history = {"step": [], "loss": [], "lr": [], "val_step": [], "val_loss": []}
        self.ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_FILE)
        if cfg.resume:
            self.load(self.ckpt_path)
        self.workers = _process_data_parallel(cfg, self.model, self.dp)  # last: the weights move to shared memory

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        from fusegrad.data.shards import rng_state

        return {"format": "fusegrad-train", "version": 1, "step": self.step,
                "model_config": self.model.config.to_dict(), "train_config": dataclasses.asdict(self.cfg),
                "tokenizer": self.tokenizer.to_json(), "data_dir": os.path.abspath(self.data_dir),
                "params": {n: t.numpy() for n, t in self.model.params.items()},
                "optimizer": self.optimizer.state_dict(), "data_rng": rng_state(self.rng),
                "history": self.history, "loss_scale": self.loss_scale}

    def save(self) -> None:
        save_checkpoint(self.ckpt_path, self.state())

    def load(self, path) -> None:
        from fusegrad.data.shards import rng_from_state

        state = load_checkpoint(path)
        if state.get("format") != "fusegrad-train":
            raise FormatError(f"{path}: not a fusegrad training checkpoint")
        saved = LlamaConfig.from_dict(state["model_config"])
        if saved != self.model.config:
            raise TrainingError(f"{path}: checkpoint model config {saved} differs from this run's "
                                f"{self.model.config}; resume with the same model settings")
        for name, t in self.model.params.items():
            arr = state["params"].get(name)
            if arr is None or arr.shape != t.shape:
                raise FormatError(f"{path}: parameter {name} is missing or has the wrong shape")
            t.data = self.backend.asarray(np.array(arr, dtype=t.dtype))
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng = rng_from_state(state["data_rng"])
        self.step = int(state["step"])
        self.history = {k: list(v) for k, v in state["history"].items()}
        if self.loss_scale is not None and state.get("loss_scale") is not None:
            self.loss_scale = [float(state["loss_scale"][0]), int(state["loss_scale"][1])]

    # -- the loop ----------------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg, model = self.cfg, self.model
        lr = cosine_lr(self.step, cfg)
        total = 0.0
        scale = self.loss_scale[0] if self.loss_scale else 1.0
        for _ in range(cfg.grad_accum):
            tokens = self.train_data.sample_batch(self.rng, cfg.batch_size)  # the global batch, on every rank
            tokens = tokens if self.dp is None else self.dp.shard(tokens)
            if self.workers is not None:  # loss and backward of a slice of rows per core, grads summed
                value = self.workers.loss_backward(tokens, scale / cfg.grad_accum)
            else:
                loss = model.loss(tokens)
                value = loss.item()
            if not math.isfinite(value):
                raise TrainingError(f"step {self.step + 1}: loss is {value}; training stopped. The last good "
                                    f"checkpoint ({self.ckpt_path}, if any) is kept untouched")
            total += value / cfg.grad_accum
            if self.workers is None:
                (loss * (scale / cfg.grad_accum)).backward()  # accumulation averages the micro-batch grads
        from fusegrad.train.optim import clip_grad_norm

        if self.dp is not None:  # mean over ranks = the single-process grads of the global batch
            self.dp.allreduce_grads(model.parameters())
            total = self.dp.average(total)
        if self.loss_scale is None or self._unscale_grads(scale):
            if cfg.grad_clip > 0:
                clip_grad_norm(model.parameters(), cfg.grad_clip)
            with span("adamw", "optimizer"):
                self.optimizer.lr = lr
                self.optimizer.step()
        self.optimizer.zero_grad()
        self.step += 1
        self.history["step"].append(self.step)
        self.history["loss"].append(total)
        self.history["lr"].append(lr)
        return total

    def _unscale_grads(self, scale: float) -> bool:
        """Divide grads by the loss scale; False (skip the step, halve the scale) if any is inf/NaN,
        and double the scale after LOSS_SCALE_GROWTH_INTERVAL good steps."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not all(np.isfinite(g).all() for g in grads):
            self.loss_scale = [scale / 2, 0]
            count("loss_scale:overflow")
            logging.getLogger("fusegrad.train").warning(
                "step %d: fp16 gradient overflow at loss scale %g; step skipped, scale now %g",
                self.step + 1, scale, scale / 2)
            return False
        for g in grads:
            g *= 1.0 / scale
        good = self.loss_scale[1] + 1
        self.loss_scale = [scale * 2, 0] if good >= LOSS_SCALE_GROWTH_INTERVAL else [scale, good]
        return True

    def evaluate(self) -> float:
        if self.val_data is None:
            return float("nan")
        with no_grad(), span("evaluate", "eval"):
            losses = [self.model.loss(b).item() for b in
                      self.val_data.iter_batches(self.cfg.batch_size, self.cfg.eval_batches)]
        return float(np.mean(losses))

    def run(self) -> dict:
        try:
            return self._run_ranks()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the worker processes (the model's weights leave shared memory, values kept)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def _run_ranks(self) -> dict:
        if self.dp is None:
            return self._run()
        with self.dp.abort_on_error():
            if not self.dp.is_main:  # rank 0 alone logs, plots, samples and writes checkpoints
                self.cfg = dataclasses.replace(self.cfg, quiet=True, progress=False, plot=False, sample_tokens=0,
                                               trace="", eval_interval=0, ckpt_interval=0)
                self.save = lambda: None
            return self._run()

    def _run(self) -> dict:
        from fusegrad.train.progress import ProgressBar

        cfg = self.cfg
        log = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, file=sys.stderr))
        procs = f"{self.workers.workers} worker processes" if self.workers is not None else "1 process"
        log(f"fusegrad: training {cfg.preset} ({self.model.num_params() / 1e6:.2f}M params) on "
            f"{self.train_data.n_tokens:,} tokens from {self.data_dir} ({procs}); out_dir {cfg.out_dir}")
        bar = ProgressBar(cfg.max_steps, start=self.step, enabled=cfg.progress and not cfg.quiet)
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        if cfg.trace:
            TRACER.enabled = True
        t_start = time.perf_counter()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            loss = self.train_step()
            dt = time.perf_counter() - t0
            if TRACER.enabled:
                TRACER.mark_step(self.step)
            if self.dp is not None and (self.step % self.dp.check_interval == 0 or self.step == cfg.max_steps):
                self.dp.check_consistency(self.model.named_parameters(), self.step)
            bar.update(self.step, loss=loss, lr=self.history["lr"][-1], tok_s=tokens_per_step / dt)
            last = self.step == cfg.max_steps
            if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or last):
                val = self.evaluate()
                self.history["val_step"].append(self.step)
                self.history["val_loss"].append(val)
                bar.note(f"step {self.step}: train loss {loss:.4f}, val loss {val:.4f}")
            if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last:
                self.save()
        bar.close()
        result = {"step": self.step, "loss": self.history["loss"][-1] if self.history["loss"] else None,
                  "val_loss": self.history["val_loss"][-1] if self.history["val_loss"] else None,
                  "seconds": time.perf_counter() - t_start, "checkpoint": self.ckpt_path}
        if cfg.trace:
            TRACER.save_chrome(cfg.trace)
            log(TRACER.summary())
        if cfg.plot and self.history["loss"]:
            from fusegrad.train.plot import plot_losses

            result["plot"] = plot_losses(self.history, os.path.join(cfg.out_dir, "loss.png"))
            log(f"loss curve: {result['plot']}")
        if cfg.sample_tokens:
            result["sample"] = self.sample(cfg.sample_prompt, cfg.sample_tokens)
            if not cfg.quiet:
                print(f"--- sample ---\n{result['sample']}\n--------------")
        log(f"checkpoint: {self.ckpt_path}")
        return result

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        from fusegrad.models.generate import generate

        ids = self.tokenizer.encode(prompt, bos=True)
        model = self.model
        if not isinstance(model.classifier.data, np.ndarray):  # generation runs on a host copy of the weights
            import fusegrad as fg
            model = Llama(model.config, params={n: fg.tensor(t.numpy(), backend="numpy") for n, t in model.params.items()})
        out = generate(model, ids, max_new_tokens, self.cfg.temperature, self.cfg.top_p, seed=self.cfg.seed,
                       stop_id=self.tokenizer.eos_id)
        return self.tokenizer.decode(out)


def _process_data_parallel(cfg: TrainConfig, model, dp):
    """ProcessDataParallel for `workers`, or None for one process whose kernels use every core. Auto (0):
    one process per core for the numpy backend without GEMM offload, unless MPI ranks already split the
    machine."""
    from fusegrad.parallel.workers import ProcessDataParallel, WorkerError, choose_workers

    rows = cfg.batch_size // (dp.size if dp is not None else 1)
    workers = choose_workers(cfg.workers, rows, cfg.backend == "numpy" and not cfg.offload_gemm and dp is None)
    if workers == 1:
        return None
    try:
        return ProcessDataParallel(model, workers)
    except WorkerError as e:
        if cfg.workers:  # asked for by name: say why not
            raise
        logging.getLogger("fusegrad.train").warning("training in one process: %s", e)
        return None


def _setup_backend(cfg: TrainConfig):
    """The backend named by --backend/--device, made the default; --offload_gemm joins the GEMM chain."""
    name = f"{cfg.backend}:{cfg.device}" if cfg.device else cfg.backend
    set_default_backend(name)
    get_backend("numpy").prewarm_kernels()  # JIT kernels load from the disk cache before the first step
    if cfg.offload_gemm:
        from fusegrad.backends import enable_gemm_offload

        enable_gemm_offload(cfg.offload_gemm)
    return get_backend(name)


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()


def load_model(path):
    """A model and its tokenizer (or None) from a training checkpoint, a run directory, a Hugging Face
    directory or a llama2.c `.bin`."""
    import fusegrad as fg
    from fusegrad.data.tokenizer import load_tokenizer

    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        path = os.path.join(path, CHECKPOINT_FILE)
    if path.endswith(".safetensors") and os.path.isfile(path):
        state = load_checkpoint(path)
        if state.get("format") != "fusegrad-train":
            raise FormatError(f"{path}: not a fusegrad training checkpoint")
        config = LlamaConfig.from_dict(state["model_config"])
        model = Llama(config, params={n: fg.tensor(a, requires_grad=True) for n, a in state["params"].items()})
        tokenizer = None
        for directory in (os.path.dirname(os.path.abspath(path)), state.get("data_dir", "")):
            try:
                tokenizer = load_tokenizer(directory) if os.path.isdir(directory) else None
            except FormatError:
                continue
            if tokenizer is not None:
                break
        return model, tokenizer
    model = Llama.from_pretrained(path)
    tokenizer = None
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        tokenizer = load_tokenizer(directory)
    except FormatError:
        pass
    return model, tokenizer
