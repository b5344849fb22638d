"""Pre-training: data, model, and the loop of train/loop.py with AdamW on a cosine schedule.

`init_from` starts from a pretrained model instead of a preset (continued pretraining, or full fine-tuning):
its config, weights and tokenizer, with the text data prepared by that tokenizer.

Everything that shapes the loss trajectory (weights, optimizer moments, the data sampler's RNG, step,
history, loss scale) goes into the checkpoint, so `resume=True` continues bit for bit where the run stopped.

>>> import tempfile
>>> cfg = TrainConfig(preset="tiny", max_steps=3, warmup_steps=1, batch_size=2, seq_len=16, out_dir=tempfile.mkdtemp(),
...                   progress=False, plot=False, sample_tokens=0, eval_interval=0, quiet=True)
>>> result = train(cfg)
>>> result["step"]
3
"""
from __future__ import annotations

import dataclasses
import functools
import os

import math

import numpy as np

from fusegrad.backends import get_backend
from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.fileio import storage_error
from fusegrad.core.tensor import no_grad, tensor
from fusegrad.core.trace import span
from fusegrad.data.prepare import prepare
from fusegrad.data.shards import TokenDataset, read_meta, rng_from_state, rng_state
from fusegrad.data.sources import DEFAULT_SEPARATOR
from fusegrad.data.tokenizer import load_tokenizer, tokenizer_beside, tokenizer_for_model
from fusegrad.models.generate import generate
from fusegrad.models.hf_names import param_shapes
from fusegrad.models.llama import PRESETS, Llama, LlamaConfig
from fusegrad.parallel.mpi import DataParallel
from fusegrad.train.checkpoint import load_checkpoint, save_checkpoint, value, weights
from fusegrad.train.loop import Run, RunConfig, TrainingError, start_workers, use_backend
from fusegrad.train.optim import AdamW
from fusegrad.train.plot import plot_losses

CHECKPOINT_FILE = "checkpoint.safetensors"
__all__ = ["TrainConfig", "Trainer", "TrainingError", "train", "load_model"]


@dataclasses.dataclass
class TrainConfig(RunConfig):
    # model: a preset, optionally overridden field by field
    preset: str = "default"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    tie_embeddings: bool | None = None
    init_from: str = ""  # a pretrained model to start from: HF dir, .gguf, llama2.c .bin, or a run dir / checkpoint
    # data: "" = the embedded CPython docs corpus; or a prepared shard dir, or text file(s)/dir to prepare
    data: str = ""
    text_field: str = "text"  # the JSON field / Parquet column of a document's text, when data is prepared here
    separator: str = DEFAULT_SEPARATOR  # between documents in a .txt prepared here
    tokenizer: str = ""  # "" = byte, or init_from's own tokenizer; "bpe" or a tokenizer file/dir
    force_tokenizer: bool = False  # use the byte tokenizer on an init_from model whose vocabulary is not bytes
    vocab_size: int | None = None
    seq_len: int = 128
    beta1: float = 0.9
    beta2: float = 0.95
    eval_batches: int = 8
    out_dir: str = "runs/default"
    offload_gemm: str = ""  # torch:cuda|mps|cpu, ane, ane-sim: large GEMMs of the numpy model go there, per call
    sample_tokens: int = 200
    sample_prompt: str = ""
    temperature: float = 0.8
    top_p: float = 0.9
    plot: bool = True

    def model_config(self, vocab_size: int) -> LlamaConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"train: unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        fields = dict(PRESETS[self.preset], vocab_size=vocab_size)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        fields["max_seq_len"] = max(self.seq_len, fields.get("max_seq_len", 0))
        return LlamaConfig(**fields, checkpoint_activations=self.checkpoint_activations)


def _prepare_data(cfg: TrainConfig, tokenizer) -> str:
    """-> a directory of shards (meta.json inside); prepares the embedded corpus or text input once."""
    if cfg.data and os.path.isfile(os.path.join(cfg.data, "meta.json")):
        return cfg.data
    if cfg.data and not os.path.exists(cfg.data):
        raise FormatError(f"{cfg.data}: no such data file or directory")
    out = os.path.join(cfg.out_dir, "data")
    if not os.path.isfile(os.path.join(out, "meta.json")):
        prepare(cfg.data or None, out, tokenizer=tokenizer, vocab_size=cfg.vocab_size,
                val_fraction=cfg.val_fraction, overwrite=True, text_field=cfg.text_field, separator=cfg.separator)
    return out


def _pretrained(cfg: TrainConfig):
    """(model, its own tokenizer or None) of init_from, whose settings rule: no preset or shape overrides."""
    overridden = [n for n in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings", "vocab_size")
                  if getattr(cfg, n) is not None] + (["preset"] if cfg.preset != "default" else [])
    if overridden or cfg.tokenizer == "bpe":
        raise ConfigError(f"train: init_from {cfg.init_from} brings its own model and tokenizer; drop "
                          f"{', '.join(overridden) or 'tokenizer bpe'}")
    model, own = load_model(cfg.init_from)
    if cfg.seq_len > model.config.max_seq_len:
        raise ConfigError(f"train: seq_len {cfg.seq_len} exceeds the context of {cfg.init_from} "
                          f"(max_seq_len {model.config.max_seq_len})")
    return model, own


class Trainer(Run):
    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        cfg.check("train")
        self.backend = f"{cfg.backend}:{cfg.device}" if cfg.device else cfg.backend  # the model's tensors live there
        self.offload_gemm = cfg.offload_gemm
        backend = get_backend(self.backend)  # an unusable backend says why before any data is prepared
        get_backend("numpy").prewarm_kernels()  # JIT kernels load from the disk cache before the first step
        self.run_dir = cfg.out_dir
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
        except OSError as e:
            raise storage_error(cfg.out_dir, e) from None
        pretrained, own = _pretrained(cfg) if cfg.init_from else (None, None)
        fits = functools.partial(tokenizer_for_model, cfg.init_from, pretrained and pretrained.config.vocab_size, own,
                                 force=cfg.force_tokenizer)
        self.data_dir = _prepare_data(cfg, fits(cfg.tokenizer) if pretrained else cfg.tokenizer or "byte")
        meta = read_meta(self.data_dir)
        self.tokenizer = fits(self.data_dir) if pretrained else load_tokenizer(self.data_dir)  # also data made before
        self.tokenizer.save(cfg.out_dir)  # beside the checkpoint, so the run dir alone is enough to sample
        self.train_data = TokenDataset(self.data_dir, cfg.seq_len, "train")
        self.val_data = TokenDataset(self.data_dir, cfg.seq_len, "val") if meta.get("val_fraction", 0) else None
        # fp16 backends (ane, ane-sim) ask for loss scaling, also when only the GEMMs are offloaded there
        scale = getattr(backend, "loss_scale", None)
        if scale is None and cfg.offload_gemm.startswith("ane"):
            scale = getattr(get_backend(cfg.offload_gemm), "loss_scale", None)
        self.loss_scale = None if scale is None else [float(scale), 0]
        with use_backend(self.backend):
            config = (dataclasses.replace(pretrained.config, checkpoint_activations=cfg.checkpoint_activations)
                      if pretrained else cfg.model_config(meta["vocab_size"]))
            self.model = Llama(config, seed=cfg.seed)
            if pretrained is not None:
                self.model.load_state_dict(pretrained.state_dict())
        self.dp = DataParallel.from_env()  # None unless mpirun started several ranks
        if self.dp is not None:
            self.dp.broadcast_params(self.model.named_parameters())
        self.optimizer = AdamW(self.model.named_parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)
        self.ckpt_path = os.path.join(cfg.out_dir, CHECKPOINT_FILE)
        if cfg.resume:
            self.load(self.ckpt_path)
        rows = cfg.batch_size // (self.dp.size if self.dp is not None else 1)  # last: the weights move to shared memory
        self.workers = start_workers(self.model, cfg.workers, rows,
                                     cfg.backend == "numpy" and not cfg.offload_gemm and self.dp is None)

    # -- the task ----------------------------------------------------------------------------------
    def micro_batch(self, grad_scale: float) -> tuple[float, int]:
        # the global batch, the same on every rank
        return self.model_loss_backward(self.train_data.sample_batch(self.rng, self.cfg.batch_size), grad_scale)

    def evaluate(self) -> dict:
        if self.val_data is None:
            return {"loss": float("nan")}
        with no_grad(), span("evaluate", "eval"):
            losses = [self.model.loss(b).item() for b in
                      self.val_data.iter_batches(self.cfg.batch_size, self.cfg.eval_batches)]
        return {"loss": float(np.mean(losses))}

    def describe(self) -> str:
        procs = f"{self.workers.workers} worker processes" if self.workers is not None else "1 process"
        what = self.cfg.init_from or self.cfg.preset
        return (f"fusegrad: training {what} ({self.model.num_params() / 1e6:.2f}M params) on "
                f"{self.train_data.n_tokens:,} tokens from {self.data_dir} ({procs}); out_dir {self.cfg.out_dir}")

    def finish(self, result: dict, say) -> dict:
        cfg = self.cfg
        result["checkpoint"] = self.ckpt_path
        if not self.is_main:
            return result
        if cfg.plot and self.history["loss"]:
            result["plot"] = plot_losses(self.history, os.path.join(cfg.out_dir, "loss.png"))
            say(f"loss curve: {result['plot']}")
        if cfg.sample_tokens:
            result["sample"] = self.sample(cfg.sample_prompt, cfg.sample_tokens)
            if not cfg.quiet:
                print(f"--- sample ---\n{result['sample']}\n--------------")
        say(f"checkpoint: {self.ckpt_path}")
        return result

    def sample(self, prompt: str, max_new_tokens: int) -> str:
        ids = self.tokenizer.prompt_ids(prompt)
        model = self.model
        if not isinstance(model.classifier.data, np.ndarray):  # generation runs on a host copy of the weights
            model = Llama(model.config, params={n: tensor(t.numpy(), backend="numpy") for n, t in model.params.items()})
        out = generate(model, ids, max_new_tokens, self.cfg.temperature, self.cfg.top_p, seed=self.cfg.seed,
                       stop_ids=self.tokenizer.eos_ids)
        return self.tokenizer.decode(out)

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": "fusegrad-train", "version": 1, "step": self.step,
                "model_config": self.model.config.to_dict(), "train_config": dataclasses.asdict(self.cfg),
                "tokenizer": self.tokenizer.to_json(), "data_dir": os.path.abspath(self.data_dir),
                "params": {n: t.numpy() for n, t in self.model.params.items()},
                "optimizer": self.optimizer.state_dict(), "data_rng": rng_state(self.rng),
                "history": self.history, "loss_scale": self.loss_scale}

    def save(self) -> None:
        if self.is_main:  # rank 0 alone writes checkpoints
            save_checkpoint(self.ckpt_path, self.state())

    def load(self, path) -> None:
        """Resume from `path`: everything is checked (FormatError naming the file and field) before anything of
        this run changes."""
        state = load_checkpoint(path)
        if state.get("format") != "fusegrad-train":
            raise FormatError(f"{path}: not a fusegrad training checkpoint")
        saved = checkpoint_model_config(state, path)
        if saved != self.model.config:
            raise TrainingError(f"{path}: checkpoint model config {saved} differs from this run's "
                                f"{self.model.config}; resume with the same model settings")
        params = weights(state, "params", {n: t.shape for n, t in self.model.params.items()}, path)
        rng = rng_from_state(state.get("data_rng"), f"{path}: data_rng")
        loss_scale = None
        if self.loss_scale is not None and value(state, "loss_scale", list, path, optional=True) is not None:
            loss_scale = [value(state, "loss_scale/0", float, path, "(0, inf)"),
                          value(state, "loss_scale/1", int, path, "[0, inf)")]
        self.restore(state, path)  # step, history, AdamW moments: checked, then set
        backend = get_backend(self.backend)
        for name, t in self.model.params.items():
            t.data = backend.asarray(np.array(params[name], dtype=t.dtype))
        self.rng = rng
        if loss_scale is not None:
            self.loss_scale = loss_scale


MAX_SEQ_LEN = 1 << 20  # a checkpoint asking for more context than this is refused before its RoPE tables exist


def checkpoint_model_config(state: dict, path) -> LlamaConfig:
    """The checkpoint's `model_config` as a LlamaConfig; FormatError naming the file and field if it is not a
    mapping of LlamaConfig's fields with integer sizes, finite floats and max_seq_len <= MAX_SEQ_LEN."""
    fields = state.get("model_config")
    if not isinstance(fields, dict):
        raise FormatError(f"{path}: checkpoint field 'model_config' is {type(fields).__name__}, not a mapping")
    for key, v in fields.items():
        bad = (isinstance(v, float) and not math.isfinite(v)) or (
            key in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim", "vocab_size", "max_seq_len",
                    "multiple_of") and not (isinstance(v, int) and not isinstance(v, bool) or v is None))
        if bad:
            raise FormatError(f"{path}: checkpoint field 'model_config/{key}' = {v!r} is not valid")
    try:
        config = LlamaConfig.from_dict(fields)
    except (ConfigError, TypeError, ValueError, ZeroDivisionError) as e:
        raise FormatError(f"{path}: checkpoint field 'model_config': {e}") from None
    if not 1 <= config.max_seq_len <= MAX_SEQ_LEN:
        raise FormatError(f"{path}: checkpoint field 'model_config/max_seq_len' = {config.max_seq_len} is outside "
                          f"[1, {MAX_SEQ_LEN}]")
    return config


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()


def load_model(path):
    """A model and its tokenizer (or None) from a training checkpoint, a run directory, a Hugging Face
    directory, a GGUF file or a llama2.c `.bin`."""
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CHECKPOINT_FILE)):
        path = os.path.join(path, CHECKPOINT_FILE)
    if path.endswith(".safetensors") and os.path.isfile(path):
        state = load_checkpoint(path)
        if state.get("format") != "fusegrad-train":
            raise FormatError(f"{path}: not a fusegrad training checkpoint")
        config = checkpoint_model_config(state, path)
        if not isinstance(state.get("params"), dict):
            raise FormatError(f"{path}: checkpoint field 'params' is not a mapping of tensors")
        extra = sorted(set(state["params"]) - set(param_shapes(config)))
        if extra:
            raise FormatError(f"{path}: checkpoint field 'params' holds tensors the model config has no place for: "
                              f"{extra[:5]}")
        params = weights(state, "params", param_shapes(config), path)
        model = Llama(config, params={n: tensor(a, requires_grad=True) for n, a in params.items()})
        data_dir = state.get("data_dir", "")
        directories = (os.path.dirname(os.path.abspath(path)), data_dir if isinstance(data_dir, str) else "")
    else:
        model = Llama.from_pretrained(path)
        directories = (path,)  # a model's own: in its directory, inside a GGUF file, beside a .bin
    tokenizers = (tokenizer_beside(d) for d in directories if d and os.path.exists(d))
    return model, next((t for t in tokenizers if t is not None), None)
