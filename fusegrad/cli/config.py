"""Dataclass configs on the command line: a YAML file, then `--key value` overrides, each value checked.

Every field needs a one-line meaning and a range (fusegrad.core.settings): in the field's metadata,
`x: int = setting(4, "what x is", "[1, inf)")`, or for the fields of TrainConfig and FinetuneConfig here in
SETTINGS. `--help` shows meaning, range and default; a wrong value is a ConfigError naming the YAML file or
"command line", the key and the value; an unknown key gets a did-you-mean.

>>> import argparse, dataclasses
>>> @dataclasses.dataclass
... class C:
...     lr: float = setting(0.1, "learning rate", "(0, inf)")
...     resume: bool = setting(False, "continue")
>>> p = argparse.ArgumentParser(); add_dataclass_args(p, C)
>>> config_from_args(C, p.parse_args(["--lr", "0.5", "--resume"]))
C(lr=0.5, resume=True)
>>> config_from_args(C, p.parse_args(["--lr", "-1"]))
Traceback (most recent call last):
...
fusegrad.core.errors.ConfigError: command line: lr = -1.0 is outside (0, inf)
"""
from __future__ import annotations

import argparse
import dataclasses
import os

from fusegrad.core.errors import ConfigError
from fusegrad.core.settings import check_value, field_spec, field_type, refuse_unknown, setting  # noqa: F401

INT, POS = "[0, inf)", "[1, inf)"
SETTINGS = {  # name: (meaning, range) for the fields of TrainConfig (train/trainer.py), FinetuneConfig (finetune/)
    "preset": ("model size: tiny, default, stories260K, stories15M, ... (fields below override it)", ""),
    "dim": ("model width (none: the preset's)", "[1, 65536]"),
    "n_layers": ("transformer blocks (none: the preset's)", "[1, 1024]"),
    "n_heads": ("attention heads (none: the preset's)", "[1, 1024]"),
    "n_kv_heads": ("key/value heads, dividing n_heads (none: the preset's)", "[1, 1024]"),
    "hidden_dim": ("feed-forward width (none: the preset's)", "[1, 262144]"),
    "tie_embeddings": ("share the embedding and classifier weights (none: the preset's)", ""),
    "data": ("shard dir from `fusegrad prepare`, a dataset file/dir that prepare reads (train: .txt, .jsonl, .json, "
             ".parquet, .arrow, compressed or in tar; none = the embedded corpus), or records (finetune: JSONL, "
             "JSON, Parquet, Arrow or CSV, compressed too: text, prompt/completion or chat messages)", ""),
    "text_field": ("the JSON field or Parquet/Arrow column holding a document's (finetune: a record's) text", ""),
    "val_data": ("finetune: validation records, read as --data is (none: --val_fraction of --data)", ""),
    "prompt_field": ("finetune: the field holding a record's prompt", ""),
    "completion_field": ("finetune: the field holding the completion of its prompt", ""),
    "messages_field": ("finetune: the field holding a chat: [{role, content}] or ShareGPT's [{from, value}]", ""),
    "label_field": ("finetune, classify: the field holding a record's class id", ""),
    "separator": ("train: the text between documents in a .txt ('': a file is one document; '\\n\\n': each "
                  "paragraph)", ""),
    "init_from": ("start from a pretrained model, its config, weights and tokenizer: HF dir, llama2.c .bin or run "
                  "dir (none: a new model of the preset)", ""),
    "tokenizer": ("byte, bpe or a tokenizer file/dir (none: byte, or init_from's own; finetune: the one beside the "
                  "model)", ""),
    "force_tokenizer": ("use the byte tokenizer on a model whose vocabulary is not bytes (its ids mean other "
                        "tokens to it)", ""),
    "vocab_size": ("vocabulary of a bpe tokenizer trained on the data (none: automatic)", "[1, 4194304]"),
    "seq_len": ("tokens per training row", "[1, 1048576]"),
    "beta1": ("AdamW first-moment decay", "[0, 1)"),
    "beta2": ("AdamW second-moment decay", "[0, 1)"),
    "eval_batches": ("validation batches per evaluation", POS),
    "out_dir": ("run directory: checkpoint, tokenizer, metrics, loss curve", ""),
    "offload_gemm": ("send large GEMMs of the numpy model to torch:cuda|mps|cpu, ane or ane-sim", ""),
    "sample_tokens": ("tokens of text sampled at the end (0 = none)", INT),
    "sample_prompt": ("prompt of that sample", ""),
    "temperature": ("sampling temperature (0 = greedy)", INT),
    "top_p": ("nucleus sampling: keep the smallest set of tokens with this much probability", "(0, 1]"),
    "plot": ("write loss.png in the run directory", ""),
    "model": ("base model: llama2.c .bin or Hugging Face directory", ""),
    "out": ("directory for the PEFT adapter and the resumable state", ""),
    "task": ("lm (next-token loss) or classify (a head over a pooled hidden state)", "lm|classify"),
    "num_classes": ("classes of a classify task", "[0, 1048576]"),
    "pooling": ("classify: the last token's hidden state or the mean over tokens", "last|mean"),
    "mask_prompt": ("no loss on the prompt tokens of prompt/completion records", ""),
    "lora_targets": ("comma list of q,k,v,o,gate,up,down (or HF names, or all)", ""),
    "rank": ("LoRA rank r", "[1, 65536]"),
    "alpha": ("LoRA alpha: scaling alpha / r (alpha / sqrt(r) with rslora)", "(0, inf)"),
    "dropout": ("LoRA dropout probability", "[0, 1)"),
    "rslora": ("rank-stabilised scaling alpha / sqrt(r)", ""),
    "dora": ("DoRA (PEFT's use_dora): a learnt magnitude per output row of each adapted weight", ""),
    "qlora": ("freeze the base projections quantized, dequantized per GEMM: a GGUF file's own blocks where it "
              "stores them quantized (Q8_0 ... Q6_K), else NF4 (4-bit)", ""),
    "quantize": ("with --qlora: auto keeps a GGUF file's own quantized blocks and quantizes the rest to NF4; nf4 "
                 "quantizes every projection to NF4", "auto|nf4"),
    "max_len": ("longest example in tokens (longer ones are cut)", POS),
    "force": ("overwrite an adapter already in the output directory", ""),
}


def help_line(cls, f) -> str:
    meaning, spec = field_spec(cls, f.name, SETTINGS)
    default = "none" if f.default is None else repr(f.default)
    return "; ".join(x for x in (meaning, spec and f"range {spec.replace('|', ', ')}", f"default {default}") if x
                     ).replace("%", "%%")


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One `--name` option per field (also `--name-with-dashes`); bools take an optional true/false. The
    values stay text here: config_from_args checks them, naming "command line"."""
    parser.add_argument("--config", metavar="YAML", help="a YAML file of settings; options given here override it")
    for f in dataclasses.fields(cls):
        kind = field_type(cls, f.name)[0]
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        extra = dict(nargs="?", const=True) if kind is bool else {}
        parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                            help=help_line(cls, f), **extra)


def config_from_args(cls, args: argparse.Namespace):
    """Defaults <- YAML file <- command-line options, each value checked; a min_lr above lr is refused
    when given (left out, it follows lr)."""
    values, where = {}, {}
    if getattr(args, "config", None):
        for key, value in load_yaml(args.config, cls).items():
            values[key], where[key] = value, args.config
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in vars(args).items():
        if key in names:
            values[key], where[key] = value, "command line"
    for key in values:
        kind, optional = field_type(cls, key)
        values[key] = check_value(key, values[key], kind, field_spec(cls, key, SETTINGS)[1], where[key], optional)
    cfg = cls(**values)
    if values.get("min_lr") is not None and getattr(cfg, "min_lr", 0) > getattr(cfg, "lr", float("inf")):
        raise ConfigError(f"{where['min_lr']}: min_lr = {cfg.min_lr!r} is above lr = {cfg.lr!r}; leave min_lr "
                          f"out to decay to lr / 10")
    return cfg


def load_yaml(path, cls) -> dict:
    """The settings of a YAML file -> {key: value as written}: ConfigError naming the file (and the line of
    text that is not UTF-8) unless it is a mapping of known keys ('-' in a key reads as '_')."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line} is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value), got a {type(data).__name__}")
    data = {k.replace("-", "_") if isinstance(k, str) else k: v for k, v in data.items()}
    refuse_unknown(data, [f.name for f in dataclasses.fields(cls)], path)
    return data
