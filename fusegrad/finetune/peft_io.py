"""PEFT-compatible adapters on disk: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (r, in) and
`...lora_B.weight` (out, r) (DoRA: also `...lora_magnitude_vector` (out,)); a classifier head is
`base_model.model.score.weight` (num_classes, C),
saved like PEFT's modules_to_save for task_type SEQ_CLS. HF stores q/k rows permuted per head
(rotate-half RoPE, see models/hf_names.py), so the rows of B for q and k are permuted on the way out
and back on the way in; A's columns (the input features) need nothing.

>>> import tempfile
>>> from fusegrad.models import Llama
>>> from fusegrad.finetune.lora import LoraConfig, attach_lora
>>> model = Llama.from_preset("tiny", seed=0)
>>> lora = attach_lora(model, LoraConfig(targets=("q", "v"), r=2))
>>> d = tempfile.mkdtemp()
>>> save_adapter(d, lora, force=True)
>>> sorted(os.listdir(d))
['adapter_config.json', 'adapter_model.safetensors']
>>> load_adapter(d, Llama.from_preset("tiny", seed=0)).config.targets
('q', 'v')
"""
from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file, save

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.fileio import atomic_write, read_json_object
from fusegrad.core.settings import check_value
from fusegrad.finetune.lora import LoraConfig, attach_lora, part_rows
from fusegrad.models.hf_names import HF_MODULES, part_heads, permute_from_hf, permute_to_hf
from fusegrad.models.llama import Llama

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
HEAD_KEY = PREFIX + "score.weight"


def _key(i: int, target: str, which: str) -> str:
    """which: "A", "B" (lora_A/B.weight) or "magnitude" (DoRA's lora_magnitude_vector)."""
    module = f"{PREFIX}model.layers.{i}.{HF_MODULES[target]}"
    return f"{module}.lora_magnitude_vector" if which == "magnitude" else f"{module}.lora_{which}.weight"


def _row_permutation(config, target: str):
    """(to_hf, from_hf) for the rows of a part's B: q and k are permuted per head, the rest are not."""
    heads = part_heads(config, target)
    if heads is None:
        return (lambda a: a), (lambda a: a)
    return (lambda a: permute_to_hf(a, heads)), (lambda a: permute_from_hf(a, heads))


def adapter_tensors(lora, head=None) -> dict:
    """{PEFT key: float32 array} for every adapter (and the classifier head, if given)."""
    c, out, host = lora.model.config, {}, lora.model.backend.to_numpy  # a device's arrays come to the host
    for name, proj in lora.projections.items():
        i = int(name.split(".")[1])
        for t in proj.targets:
            to_hf, _ = _row_permutation(c, t)
            out[_key(i, t, "A")] = np.ascontiguousarray(host(proj.A_part(t)), dtype=np.float32)
            out[_key(i, t, "B")] = np.ascontiguousarray(to_hf(host(proj.B[t].data)), dtype=np.float32)
            if t in proj.M:  # one per output row: permuted as B's rows
                out[_key(i, t, "magnitude")] = np.ascontiguousarray(to_hf(host(proj.M[t].data)), dtype=np.float32)
    if head is not None:
        out[HEAD_KEY] = np.ascontiguousarray(head.numpy(), dtype=np.float32)
    return out


def save_adapter(directory, lora, head=None, base_model: str = "", force: bool = False) -> None:
    """Write a PEFT LoRA adapter (and a classifier head as modules_to_save) atomically.

    Refuses (FormatError) to replace an existing adapter unless force=True.
    """
    directory = os.fspath(directory)
    existing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if os.path.exists(os.path.join(directory, f))]
    if existing and not force:
        raise FormatError(f"{directory}: already holds {', '.join(existing)}; pass --force to overwrite")
    cfg = lora.config
    meta = {"peft_type": "LORA", "task_type": "SEQ_CLS" if head is not None else "CAUSAL_LM",
            "base_model_name_or_path": base_model or None, "r": cfg.r, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "use_dora": cfg.dora, "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": [HF_MODULES[t].split(".")[1] for t in cfg.targets], "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": ["classifier", "score"] if head is not None else None}
    blob = save(adapter_tensors(lora, head), metadata={"format": "pt"})
    os.makedirs(directory, exist_ok=True)
    with atomic_write(os.path.join(directory, WEIGHTS_FILE)) as f:
        f.write(blob)
    with atomic_write(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def adapter_base_model(directory) -> str | None:
    """The base model (directory, GGUF or llama2.c file) that an adapter directory standing alone (a `fusegrad
    finetune --out`: its adapter_config.json, no model config.json or checkpoint beside it) names in
    base_model_name_or_path; None for anything else. ConfigError when that base is not local (a Hub id, or
    missing)."""
    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(cfg_path) or any(os.path.exists(os.path.join(directory, f))
                                           for f in ("config.json", "checkpoint.safetensors")):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise FormatError(f"{cfg_path}: cannot read the adapter config: {exc}") from None
    if not isinstance(base, str) or not os.path.exists(base):
        raise ConfigError(f"{cfg_path}: base_model_name_or_path is {base!r}, not a local model directory or file; "
                          f"pass the base model as the model and this adapter with --adapter")
    return base


def read_adapter(directory) -> tuple:
    """-> (LoraConfig, {PEFT key: array}); FormatError naming the file for anything PEFT-unlike."""
    directory = os.fspath(directory)
    cfg_path, w_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    meta = read_json_object(cfg_path, "the adapter config")
    if meta.get("peft_type") != "LORA":
        raise FormatError(f"{cfg_path}: peft_type {meta.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("fan_in_fan_out",) if meta.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern", "layers_to_transform") if meta.get(k)]
    if meta.get("bias", "none") != "none":
        unsupported.append(f"bias={meta['bias']!r}")
    if unsupported:
        raise FormatError(f"{cfg_path}: unsupported LoRA options {unsupported}")
    modules = meta.get("target_modules")
    if isinstance(modules, str):
        raise FormatError(f"{cfg_path}: target_modules is a regex {modules!r}; give a list of module names")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise FormatError(f"{cfg_path}: target_modules = {modules!r}; expected a list of module names")

    def get(name, kind, spec, default=None, nullable=False):
        value = meta.get(name, default)
        value = default if value is None and nullable else value
        return check_value(name, value, kind, spec, cfg_path, error=FormatError)
    try:
        config = LoraConfig(targets=tuple(modules), r=get("r", int, "[1, 65536]"),
                            alpha=get("lora_alpha", float, "(0, inf)", 8.0),
                            dropout=get("lora_dropout", float, "[0, 1)", 0.0, True),
                            rslora=get("use_rslora", bool, "", False, True),
                            dora=get("use_dora", bool, "", False, True))
    except ConfigError as exc:
        raise FormatError(f"{cfg_path}: bad LoRA config: {exc}") from None
    try:
        tensors = load_file(w_path)
    except Exception as exc:
        raise FormatError(f"{w_path}: cannot read adapter weights: {exc}") from None
    for k, a in tensors.items():
        if a.dtype not in (np.float32, np.float16):
            raise FormatError(f"{w_path}: tensor {k!r} has dtype {a.dtype}; adapters are F32 or F16")
        if not np.isfinite(a).all():
            raise FormatError(f"{w_path}: tensor {k!r} holds NaN or inf; nothing non-finite is loaded")
    return config, tensors


def load_adapter(directory, model, quantized: dict | None = None):
    """Read a PEFT adapter and attach it to `model` (frozen) -> Lora; `.head` holds a score head or None.

    Checks every tensor against the model: a missing key or a shape that does not fit the base raises
    FormatError naming the key, its shape and the expected one.
    """
    config, tensors = read_adapter(directory)
    where = os.path.join(os.fspath(directory), WEIGHTS_FILE)
    c = model.config
    lora = attach_lora(model, config, quantized=quantized)
    for name, proj in lora.projections.items():
        i = int(name.split(".")[1])
        for p, t in enumerate(proj.targets):
            _, rows, in_f = part_rows(c, t)
            _, from_hf = _row_permutation(c, t)
            shapes = (("A", (config.r, in_f)), ("B", (rows.stop - rows.start, config.r)))
            for which, want in shapes + ((("magnitude", (rows.stop - rows.start,)),) if config.dora else ()):
                key = _key(i, t, which)
                if key not in tensors:
                    raise FormatError(f"{where}: missing {key} (the model has {c.n_layers} layers)")
                if tensors[key].shape != want:
                    raise FormatError(f"{where}: {key} has shape {tensors[key].shape}, but this base model needs "
                                      f"{want}: the adapter was made for a different base")
            proj.A.data[p * config.r:(p + 1) * config.r] = tensors[_key(i, t, "A")]
            proj.B[t].data = np.ascontiguousarray(from_hf(tensors[_key(i, t, "B")]), dtype=model.dtype)
            if config.dora:
                proj.M[t].data = np.ascontiguousarray(from_hf(tensors[_key(i, t, "magnitude")]), dtype=model.dtype)
    known = set(adapter_tensors(lora)) | {HEAD_KEY}
    extra = sorted(k for k in tensors if k not in known)
    if extra:
        raise FormatError(f"{where}: tensors {extra[:3]} do not belong to a {c.n_layers}-layer model's "
                          f"{', '.join(config.targets)} adapters")
    lora.head = tensors.get(HEAD_KEY)
    if lora.head is not None and (lora.head.ndim != 2 or lora.head.shape[1] != c.dim):
        raise FormatError(f"{where}: {HEAD_KEY} has shape {lora.head.shape}, expected (num_classes, {c.dim})")
    return lora


def merge_adapter(base, adapter_dir) -> "Llama":
    """A base model (a Llama, or a path Llama.from_pretrained reads) with the PEFT adapter in `adapter_dir`
    folded into its weights -> a plain Llama, ready for models.export.export_model (what `merge` writes)."""
    model = base if isinstance(base, Llama) else Llama.from_pretrained(base)
    lora = load_adapter(adapter_dir, model, quantized=dict(model.quantized) or None)
    lora.merge()
    model.quantized = {}
    for t in model.params.values():
        t.requires_grad = True
    return model
