"""Meta's own Llama checkpoints and llama2.c's training checkpoints, read without torch (torch_pickle.py).

- a directory with params.json and consolidated.00.pth, as Meta's `llama model download` and the `original/`
  folders of meta-llama repositories publish them: one file for the 1B-8B sizes; larger ones (Llama 2 13B and 70B,
  Llama 3 70B) come split for model parallelism into consolidated.00.pth ... .NN.pth, each holding an equal slice
  of every matrix, which are joined tensor by tensor as they are read;
- llama2.c's `ckpt.pt`: train.py's torch.save of {"model": state dict, "model_args": {...}, "optimizer": ...}.
Both name tensors as Meta's model.py does (tok_embeddings, layers.N.attention.wq, feed_forward.w1, ...), with q/k
rows in the interleaved-pair RoPE order fusegrad itself computes in; `[HF name]` reads one as float32 in Hugging
Face's layout, as HFCheckpoint does.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.fileio import read_json_object
from fusegrad.models.config import LlamaConfig
from fusegrad.models.hf import read_tensor
from fusegrad.models.hf_names import HF_MODULES, NORMS, check_hf_state, part_heads, permute_to_hf
from fusegrad.models.torch_pickle import read_torch_pickle

_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight"}
_PARTS = {"q": "attention.wq", "k": "attention.wk", "v": "attention.wv", "o": "attention.wo", "gate": "feed_forward.w1",
          "down": "feed_forward.w2", "up": "feed_forward.w3"}  # hf_names' projection parts -> Meta's modules
# Meta's apply_scaling (llama-models) for use_scaled_rope; its factor differs by release (3.1: 8, 3.2: 32)
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_len": 8192}


def is_meta_checkpoint(path) -> bool:
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, "params.json")) and bool(glob.glob(os.path.join(path, "*.pth")))
    return path.endswith((".pt", ".pth"))


# Meta's model-parallel layers (fairscale): column-parallel ones hold a slice of the rows, row-parallel ones of the
# columns; 1-D tensors (norms, rope.freqs) are whole in every shard. tok_embeddings: by its shape (below)
_SPLIT_AXIS = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


class MetaCheckpoint:
    """`.config`, and `[HF name]` reads one tensor as float32 in Hugging Face's layout."""

    def __init__(self, path):
        path = os.fspath(path)
        if os.path.isdir(path):
            shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth"))) or \
                sorted(glob.glob(os.path.join(path, "*.pth")))
            params_path = os.path.join(path, "params.json")
        else:
            shards, params_path = [path], os.path.join(os.path.dirname(path) or ".", "params.json")
        self.file = shards[0] if len(shards) == 1 else f"{path} ({len(shards)} shards)"
        tables = [read_torch_pickle(f) for f in shards]
        entries, values = tables[0]
        args = {k[len("model_args."):]: v for k, v in values.items() if k.startswith("model_args.")}
        if args:  # llama2.c's ckpt.pt: its weights under "model" (torch.compile adds "_orig_mod.")
            entries = {k.removeprefix("model.").removeprefix("_orig_mod."): e for k, e in entries.items()
                       if k.startswith("model.")}
            where = f"{self.file} (model_args)"
        elif os.path.isfile(params_path):
            args, where = read_json_object(params_path, "the model's params"), params_path
        else:
            raise FormatError(f"{self.file}: no model_args inside and no params.json beside it: the model's shape is "
                              f"unknown")
        self.parts = {name: [(shards[0], e)] for name, e in entries.items()}  # name -> [(file, entry) a shard]
        self.axes = dict.fromkeys(entries)  # name -> the axis its shards join on (None: one piece)
        if len(shards) > 1:
            self.parts, self.axes = _joined(shards, [t[0] for t in tables], args.get("dim"))
        self.entries = {name: (None, _shape(parts, self.axes[name]), None) for name, parts in self.parts.items()}
        self.config = c = _config(args, self.entries, where, self.file)
        self.names = {hf: (meta, None) for hf, meta in _TOP.items() if not (c.tie_embeddings and hf == "lm_head.weight")}
        for i in range(c.n_layers):  # HF name -> (Meta name, heads whose q/k rows are permuted, else None)
            self.names.update({f"model.layers.{i}.{HF_MODULES[part]}.weight": (f"layers.{i}.{meta}.weight",
                                                                              part_heads(c, part))
                               for part, meta in _PARTS.items()})
            self.names.update({f"model.layers.{i}.{hf}.weight": (f"layers.{i}.{meta}.weight", None)
                               for meta, hf in NORMS.items()})
        check_hf_state({hf: self.entries[meta][1] for hf, (meta, _) in self.names.items() if meta in self.entries}, c,
                       f"{self.file} (Meta names)")

    def __getitem__(self, name: str):
        meta, heads = self.names[name]
        pieces = [read_tensor(file, meta, entry) for file, entry in self.parts[meta]]
        a = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=self.axes[meta])
        return permute_to_hf(a, heads) if heads else a  # Meta's interleaved pairs -> HF's halves

    def state(self) -> dict:
        return {name: self[name] for name in self.names}


def _joined(shards: list, tables: list, dim) -> tuple:
    """The tensors of a model split for model parallelism: ({name: [(file, entry) of each shard]}, {name: the axis
    they join on, or None where each shard holds the whole}). Every shard must hold the same names and shapes."""
    parts, axes = {}, {}
    for name, first in tables[0].items():
        for file, table in zip(shards[1:], tables[1:]):
            if name not in table:
                raise FormatError(f"{file}: no tensor {name!r}, which {os.path.basename(shards[0])} holds: the "
                                  f"shards of a model split for model parallelism hold the same tensors")
            if table[name][1] != first[1]:
                raise FormatError(f"{file}: tensor {name!r} has shape {tuple(table[name][1])}, "
                                  f"{os.path.basename(shards[0])}'s {tuple(first[1])}: not slices of one model")
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if len(first[1]) < 2:
            axes[name] = None
        elif module == "tok_embeddings":  # Llama 2 splits the embedding width, Llama 3 the vocabulary
            axes[name] = 1 if first[1][1] * len(shards) == dim else 0
        elif module in _SPLIT_AXIS:
            axes[name] = _SPLIT_AXIS[module]
        else:
            raise FormatError(f"{shards[0]}: tensor {name!r} {tuple(first[1])} is none of Meta's Llama layers: "
                              f"cannot tell how the {len(shards)} shards split it")
        parts[name] = [(file, table[name]) for file, table in zip(shards, tables)] if axes[name] is not None \
            else [(shards[0], first)]
    extra = sorted(set().union(*tables[1:]) - set(tables[0]))
    if extra:
        raise FormatError(f"{shards[0]}: no tensor {extra[0]!r}, which another shard holds")
    return parts, axes


def _shape(parts: list, axis) -> tuple:
    """The shape of a tensor joined from its pieces along `axis`."""
    shape = list(parts[0][1][1])
    if axis is not None:
        shape[axis] *= len(parts)
    return tuple(shape)


def _config(args: dict, entries: dict, where: str, file: str) -> LlamaConfig:
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(args.get(key), int) or isinstance(args.get(key), bool):
            raise FormatError(f"{where}: {key} = {args.get(key)!r}, not a whole number")
    for name in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if name not in entries or len(entries[name][1]) != 2:
            raise FormatError(f"{file}: no 2-D tensor {name!r} (has {len(entries)} tensors, e.g. {sorted(entries)[:3]})")
    vocab, hidden = entries["tok_embeddings.weight"][1][0], entries["layers.0.feed_forward.w1.weight"][1][0]
    theta = args.get("rope_theta", 10000.0)
    scaling = None
    if args.get("use_scaled_rope"):
        factor = args.get("rope_scaling_factor")
        if factor is None:
            raise FormatError(f"{where}: use_scaled_rope without rope_scaling_factor: Llama 3.1 scales by 8, Llama "
                              f"3.2 by 32; add \"rope_scaling_factor\" to params.json")
        scaling = {"type": "llama3", "factor": factor, **_LLAMA3_ROPE}
    max_len = args.get("max_seq_len") or (131072 if scaling else 8192 if theta >= 500000 else 4096)
    try:
        return LlamaConfig(dim=args["dim"], n_layers=args["n_layers"], n_heads=args["n_heads"],
                           n_kv_heads=args.get("n_kv_heads") or args["n_heads"], hidden_dim=hidden, vocab_size=vocab,
                           max_seq_len=max_len, rope_theta=theta, norm_eps=args.get("norm_eps", 1e-5),
                           tie_embeddings="output.weight" not in entries, rope_scaling=scaling)
    except (ConfigError, TypeError) as e:
        raise FormatError(f"{where}: not a Llama fusegrad can build: {e}") from None
