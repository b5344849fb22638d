"""LoRA / QLoRA fine-tuning of a pretrained Llama for language modelling or classification.

A run reads a base model (HF dir, GGUF file or llama2.c `.bin`) and records (JSONL, JSON, Parquet, Arrow, CSV),
trains only the adapters (and a classifier head), and writes to `out`: the PEFT adapter (adapter_config.json,
adapter_model.safetensors) and `finetune_state.safetensors` (adapters, head, AdamW moments, sampler position, dropout RNG, history)
from which `resume=True` continues bit for bit. On the numpy backend each micro-batch's examples are split over
`workers` processes, one core each (0 = one per core; fusegrad.parallel.workers): the frozen base in shared
memory, the adapters' grads summed, the loss curve of one process. With LoRA dropout each worker draws its
slice's masks from its own stream, seeded from the run's dropout RNG per micro-batch: a run is deterministic
(and resumes exactly) for a given worker count, and its masks differ from another count's. Under `mpirun -n N`
or `torchrun` every rank draws the same batch, runs its 1/N of the examples in one process and the gradients are
averaged (the loss curve of one process; with dropout > 0 the masks differ); rank 0 alone evaluates and writes.

>>> import json, os, tempfile
>>> from fusegrad.models import Llama
>>> d = tempfile.mkdtemp()
>>> Llama.from_preset("tiny", vocab_size=258, seed=0).save_pretrained(os.path.join(d, "base"))
>>> with open(os.path.join(d, "data.jsonl"), "w") as f:
...     _ = f.write("\\n".join(json.dumps({"prompt": "2+2=", "completion": "4"}) for _ in range(8)))
>>> cfg = FinetuneConfig(model=os.path.join(d, "base"), data=os.path.join(d, "data.jsonl"), tokenizer="byte",
...                      out=os.path.join(d, "out"), max_steps=2, batch_size=4, quiet=True)
>>> finetune(cfg)["step"]
2
"""
from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

from fusegrad.backends import get_backend
from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.tensor import no_grad, tensor
from fusegrad.data.shards import rng_from_state, rng_state
from fusegrad.data.tokenizer import tokenizer_beside, tokenizer_for_model
from fusegrad.finetune import data as ftdata
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.finetune.losses import group_loss
from fusegrad.finetune.peft_io import CONFIG_FILE, WEIGHTS_FILE, save_adapter
from fusegrad.finetune.qlora import attach_qlora, describe_base
from fusegrad.models.llama import Llama
from fusegrad.parallel.mpi import DataParallel
from fusegrad.train.checkpoint import load_checkpoint, save_checkpoint, value, weights
from fusegrad.train.loop import Run, RunConfig, TrainingError, start_workers
from fusegrad.train.optim import AdamW

STATE_FILE = "finetune_state.safetensors"
HEAD = "score.weight"  # the classifier head's name among the trainable tensors (PEFT's)


class FinetuneError(TrainingError):
    """Fine-tuning cannot go on (NaN loss, a resume that does not match this run)."""


@dataclasses.dataclass
class FinetuneConfig(RunConfig):
    model: str = ""  # Hugging Face directory, GGUF file or llama2.c .bin
    data: str = ""  # JSONL, JSON, Parquet, Arrow or CSV records ({"text"}, {"prompt", "completion"}, chat {"messages"};
    # classify: {"text", "label"}); a dataset that names them otherwise says so with the *_field settings
    val_data: str = ""  # validation records, as data reads them ("" : val_fraction of data)
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    label_field: str = "label"
    out: str = "runs/finetune"
    tokenizer: str = ""  # "" = the tokenizer beside the model; "byte" or a tokenizer file/dir
    force_tokenizer: bool = False  # use the byte tokenizer on a model whose vocabulary is not bytes
    task: str = "lm"  # lm | classify
    num_classes: int = 0
    pooling: str = "last"  # last | mean (classify)
    mask_prompt: bool = True
    lora_targets: str = "q,v"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    qlora: bool = False
    quantize: str = "auto"  # --qlora's base: auto (a GGUF file's own blocks where it has them, else NF4) | nf4
    max_len: int = 256
    # the shared run settings, with fine-tuning's defaults
    batch_size: int = 8
    max_steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_interval: int = 50
    ckpt_interval: int = 50
    force: bool = False

    # settings that must match for resume to continue the same run
    IDENTITY = ("model", "data", "val_data", "text_field", "prompt_field", "completion_field", "messages_field",
                "label_field", "task", "num_classes", "pooling", "mask_prompt", "lora_targets", "rank", "alpha",
                "dropout", "rslora", "dora", "qlora", "max_len", "batch_size", "grad_accum", "seed", "val_fraction")


class Finetuner(Run):
    Error = FinetuneError

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        cfg.check("finetune")
        if cfg.task not in ("lm", "classify"):
            raise ConfigError(f"finetune: task must be 'lm' or 'classify', got {cfg.task!r}")
        if cfg.task == "classify" and cfg.num_classes < 2:
            raise ConfigError(f"finetune: --task classify needs --num_classes >= 2, got {cfg.num_classes}")
        if cfg.max_len < 1:
            raise ConfigError(f"finetune: max_len must be >= 1, got {cfg.max_len}")
        if cfg.pooling not in ("last", "mean"):
            raise ConfigError(f"finetune: pooling must be 'last' or 'mean', got {cfg.pooling!r}")
        if cfg.quantize not in ("auto", "nf4"):
            raise ConfigError(f"finetune: quantize must be 'auto' or 'nf4', got {cfg.quantize!r}")
        if cfg.quantize != "auto" and not cfg.qlora:
            raise ConfigError(f"finetune: quantize = {cfg.quantize!r} chooses --qlora's base format; add --qlora")
        if not cfg.model or not cfg.data:
            raise ConfigError("finetune: give --model PATH (HF dir, .gguf or llama2.c .bin) and --data FILE "
                              "(JSONL, JSON, Parquet, Arrow or CSV)")
        self.run_dir = cfg.out
        self.state_path = os.path.join(cfg.out, STATE_FILE)
        taken = [f for f in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE) if os.path.exists(os.path.join(cfg.out, f))]
        if taken and not (cfg.force or cfg.resume):
            raise FormatError(f"{cfg.out}: already holds {', '.join(taken)}; pass --resume to continue or "
                              f"--force to overwrite")
        self.model = Llama.from_pretrained(cfg.model, backend=get_backend(self.backend),  # NF4 as it is read
                                           quantize=cfg.quantize if cfg.qlora else None)  # (or a GGUF's blocks)
        self.model.config.checkpoint_activations = cfg.checkpoint_activations
        self.tokenizer = tokenizer_for_model(cfg.model, self.model.config.vocab_size, tokenizer_beside(cfg.model),
                                             cfg.tokenizer, cfg.force_tokenizer)
        train, val = (cfg.data, cfg.val_data) if cfg.val_data else ftdata.dataset_splits(cfg.data)
        self.sources = (train, val)
        examples = self._examples(train)
        if val:  # a split of its own: all of data trains
            self.train_set, self.val_set = examples, self._examples(val)
        elif len(examples) < 2:
            raise FormatError(f"{cfg.data}: {len(examples)} usable example(s); need at least 2 (train + val)")
        else:
            self.train_set, self.val_set = ftdata.split(examples, cfg.val_fraction, cfg.seed)
        lcfg = LoraConfig(targets=cfg.lora_targets, r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout,
                          rslora=cfg.rslora, dora=cfg.dora, seed=cfg.seed)
        self.memory = None
        if cfg.qlora:
            self.lora, self.memory = attach_qlora(self.model, lcfg)
        else:
            self.lora = attach_lora(self.model, lcfg)
        named = self.lora.named_parameters()
        self.head = None
        if cfg.task == "classify":
            rng = np.random.default_rng(cfg.seed)
            self.head = tensor(rng.normal(0, 0.02, (cfg.num_classes, self.model.config.dim)),
                               dtype=self.model.dtype, requires_grad=True, backend=self.model.backend)
            named.append((HEAD, self.head))
        self.extras = {} if self.head is None else {HEAD: self.head}  # what the losses use beside the model
        self.dp = DataParallel.from_env()  # None unless mpirun/torchrun started several ranks
        if self.dp is not None:
            self.dp.shard(np.zeros(cfg.batch_size))  # a batch that does not split over the ranks says so now
            self.dp.broadcast_params(named)
        self.optimizer = AdamW(named, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sampler = ftdata.Sampler(len(self.train_set), cfg.batch_size, cfg.seed)
        self.history["val_accuracy"] = []
        if cfg.resume and os.path.exists(self.state_path):
            self.load()
        classes = cfg.num_classes if self.head is not None else 0
        setup = (worker_adapters, {"lora": dataclasses.asdict(lcfg), "num_classes": classes})
        self.workers = start_workers(self.model, cfg.workers, cfg.batch_size,  # last: the weights go to shared memory
                                     self.backend == "numpy" and cfg.dtype == "fp32" and self.dp is None, named, setup)

    # -- the task ----------------------------------------------------------------------------------
    def group_loss(self, tokens, mask, labels, denominator):
        """One equal-length group -> its share of the step's mean loss (and #correct for classify)."""
        loss, logits = group_loss(self.model, self.head, tokens, mask, denominator, labels, self.cfg.pooling)
        return loss, 0 if logits is None else int((logits.numpy().argmax(-1) == labels).sum())

    @staticmethod
    def denominator(examples, task) -> int:
        return sum(int(e.loss_mask.sum()) for e in examples) if task == "lm" else len(examples)

    def micro_batch(self, grad_scale: float) -> tuple[float, int]:
        indices = self.sampler.next_indices()  # the global batch, the same on every rank
        batch = [self.train_set[i] for i in indices]
        denom, mine = self.denominator(batch, self.cfg.task), batch
        if self.dp is not None:  # this rank's examples, their loss x ranks: the mean over ranks is the global one
            mine = [self.train_set[i] for i in self.dp.shard(np.array(indices))]
            denom = denom / self.dp.size
        self.lora.train(True)
        tokens = sum(len(e.tokens) for e in batch)
        if self.workers is not None:  # a slice of the examples per core, grads summed
            return self.workers.backward_slices(slice_losses, self.slices(mine, denom), grad_scale), tokens
        total = 0.0
        groups = ftdata.group_by_length(mine)  # no padding: every token is computed
        with contextlib.closing(slice_losses(self.model, self.extras, groups, denom, self.cfg.pooling)) as losses:
            for loss in losses:
                total = total + self.backward_loss(loss, grad_scale)  # on a device: no host read
        return total, tokens

    def slices(self, examples: list, denominator) -> list:
        """The examples over the worker processes, longest first to the least loaded (in tokens) -> one
        slice_losses args tuple per process. With dropout, slice k's masks come from the stream (seed, k),
        seed drawn from the run's dropout RNG."""
        n = self.workers.workers
        parts, load = [[] for _ in range(n)], [0] * n
        for e in sorted(examples, key=lambda e: -len(e.tokens)):
            k = load.index(min(load))
            parts[k].append(e)
            load[k] += len(e.tokens)
        seed = int(self.lora.rng.integers(2 ** 63)) if self.cfg.dropout > 0 else None
        return [(ftdata.group_by_length(part), denominator, self.cfg.pooling, None if seed is None else (seed, k))
                for k, part in enumerate(parts)]

    def _examples(self, data) -> list:
        cfg = self.cfg
        records = ftdata.read_records(data)
        max_len = min(cfg.max_len, self.model.config.max_seq_len)
        fields = ftdata.RecordFields(cfg.text_field, cfg.prompt_field, cfg.completion_field, cfg.messages_field,
                                     cfg.label_field)
        if cfg.task == "lm":
            examples = ftdata.lm_examples(records, self.tokenizer, max_len, cfg.mask_prompt, fields)
        else:
            examples = ftdata.classify_examples(records, self.tokenizer, cfg.num_classes, max_len, fields)
        if not examples:
            raise FormatError(f"{data}: no usable example (each prompt fills max_len {max_len}?)")
        return examples

    def evaluate(self, examples=None) -> dict:
        """-> {"loss": mean over loss tokens (lm) or examples (classify), "accuracy": classify only}."""
        examples = self.val_set if examples is None else examples
        denom = self.denominator(examples, self.cfg.task)
        self.lora.train(False)
        loss, correct = 0.0, 0
        with no_grad():
            for lo in range(0, len(examples), self.cfg.batch_size):
                for tokens, mask, labels in ftdata.group_by_length(examples[lo:lo + self.cfg.batch_size]):
                    part, c = self.group_loss(tokens, mask, labels, denom)
                    loss, correct = loss + part.item(), correct + c
        out = {"loss": loss}
        if self.cfg.task == "classify":
            out["accuracy"] = correct / len(examples)
        return out

    def describe(self) -> str:
        cfg = self.cfg
        n_lora = sum(t.numel() for t in self.optimizer.params)
        procs = f"{self.workers.workers} worker processes" if self.workers is not None else "1 process"
        text = (f"fusegrad finetune: {cfg.task} on {len(self.train_set)} train / {len(self.val_set)} val examples, "
                f"{'QLoRA' if cfg.qlora else 'LoRA'}{' (DoRA)' if cfg.dora else ''} r={cfg.rank} on "
                f"{self.lora.config.targets}, "
                f"{n_lora:,} trainable params ({procs})")
        if isinstance(self.sources[0], list):  # a dataset directory's split files
            text += "".join(f"\n{what}: {', '.join(os.path.relpath(p, cfg.data) for p in paths)}"
                            for what, paths in zip(("train", "val"), self.sources) if paths)
        if self.memory:
            text += "\n" + describe_base(self.memory)
        return text

    def finish(self, result: dict, say) -> dict:
        say(f"adapter: {self.cfg.out}/{WEIGHTS_FILE}")
        accuracy = self.history["val_accuracy"]
        return dict(result, val_accuracy=accuracy[-1] if self.cfg.task == "classify" and accuracy else None,
                    memory=self.memory, out=self.cfg.out)

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"format": "fusegrad-finetune", "version": 1, "step": self.step,
                "config": {k: getattr(self.cfg, k) for k in FinetuneConfig.IDENTITY},
                "base_formats": self.base_formats(),
                "lora": self.lora.state_dict(), "head": {} if self.head is None else {"score": self.head.numpy()},
                "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state(),
                "dropout_rng": rng_state(self.lora.rng), "history": self.history}

    def save(self) -> None:
        save_checkpoint(self.state_path, self.state())
        save_adapter(self.cfg.out, self.lora, self.head, base_model=os.path.abspath(self.cfg.model), force=True)

    def base_formats(self) -> list:
        """The formats the frozen base projections are held in (["NF4"], ["Q4_K", "Q6_K"], ...; [] unquantized)."""
        return sorted({f for q in self.model.quantized.values() for f in q.formats()})

    def check_base_formats(self, saved, path: str) -> None:
        """A resumed QLoRA run must dequantize the same base it trained on: the file's blocks and NF4 differ in
        every weight. Checkpoints from before the record was kept had NF4 bases (or none without --qlora)."""
        if saved is None:
            saved = ["NF4"] if self.cfg.qlora else []
        elif not (isinstance(saved, list) and all(isinstance(f, str) for f in saved)):
            raise FormatError(f"{path}: checkpoint field 'base_formats' is not a list of format names: {saved!r}")
        now = self.base_formats()
        if saved != now:
            hint = " (pass --quantize nf4)" if saved == ["NF4"] else " (pass --quantize auto)"
            raise FinetuneError(f"{path}: the checkpoint's frozen base was {'+'.join(saved) or 'float'}, this "
                                f"run's is {'+'.join(now) or 'float'}: resume on the base it trained on{hint}")

    def load(self) -> None:
        """Resume from finetune_state.safetensors: every field is checked (FormatError naming the file and field)
        before anything of this run changes."""
        path = self.state_path
        state = load_checkpoint(path)
        if state.get("format") != "fusegrad-finetune":
            raise FormatError(f"{path}: not a fusegrad fine-tuning checkpoint")
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise FormatError(f"{path}: checkpoint field 'config' is not a mapping")
        newer = [k for k in FinetuneConfig.IDENTITY if k.endswith("_field") or k == "val_data"]
        saved = {**{k: getattr(FinetuneConfig, k) for k in newer}, **saved}  # older runs used their defaults
        differ = {k: (saved.get(k, "<missing>"), getattr(self.cfg, k)) for k in FinetuneConfig.IDENTITY
                  if saved.get(k, "<missing>") != getattr(self.cfg, k)}
        if differ:
            raise FinetuneError(f"{path}: resume settings differ from the checkpoint's (saved, now): {differ}")
        self.check_base_formats(state.get("base_formats"), path)
        lora = weights(state, "lora", {n: t.shape for n, t in self.lora.named_parameters()}, path)
        head = None if self.head is None else weights(state, "head", {"score": self.head.shape}, path)["score"]
        epoch = value(state, "sampler/epoch", int, path, "[0, inf)")
        pos = value(state, "sampler/pos", int, path, f"[0, {self.sampler.n})")
        rng = rng_from_state(state.get("dropout_rng"), f"{path}: dropout_rng")
        self.restore(state, path)  # step, history, AdamW moments: checked, then set
        self.lora.load_state_dict(lora, path)
        if head is not None:
            self.head.data = self.head.backend.asarray(np.array(head, dtype=self.head.dtype))
        self.sampler.load({"epoch": epoch, "pos": pos})
        self.lora.rng = rng


def worker_adapters(model, lora: dict, num_classes: int) -> list:
    """In a worker process: the run's adapters (LoraConfig fields `lora`) and classifier head, attached to its
    model as the run attaches them -> [(name, Tensor)]; their values then come from shared memory."""
    named = attach_lora(model, LoraConfig(**lora), quantized=model.quantized).named_parameters()
    if num_classes:
        named.append((HEAD, tensor(np.zeros((num_classes, model.config.dim)), dtype=model.dtype, requires_grad=True)))
    return named


def slice_losses(model, extras: dict, groups: list, denominator, pooling: str = "last", dropout_seed=None):
    """Yield each length group's share of the step's mean loss: fine-tuning's slice of a micro-batch, in one
    process or a worker (ProcessDataParallel). dropout_seed: the slice's own LoRA dropout stream; None: the
    run's (Lora.rng)."""
    lora = next(iter(model.adapters.values())).state
    run_rng = lora.rng
    if dropout_seed is not None:
        lora.rng = np.random.default_rng(dropout_seed)
    try:
        for tokens, mask, labels in groups:
            yield group_loss(model, extras.get(HEAD), tokens, mask, denominator, labels, pooling)[0]
    finally:
        lora.rng = run_rng


def finetune(cfg: FinetuneConfig) -> dict:
    return Finetuner(cfg).run()
