"""The file formats fusegrad reads, each as (name, make a valid file, load it, check what was loaded).

FORMATS, every one of them, run in CI (tests/fuzz/test_fuzz.py): data, tokenizers, text, checkpoints (loaded,
resumed, sampled from), datasets `prepare` reads (JSON, gzipped JSON Lines, tar, Parquet, Arrow), YAML settings, llama2.c .bin, Hugging Face dirs, GGUF files (model and tokenizer),
PEFT adapters, fine-tune JSONL/CSV.
"""
import argparse
import json
import os

import numpy as np

from fusegrad.data import corpus
from fusegrad.data.prepare import prepare
from fusegrad.data.shards import TokenDataset, read_meta, read_shard, write_shard
from fusegrad.data.tokenizer import BPETokenizer, ByteTokenizer, Llama2cTokenizer, load_tokenizer
from fusegrad.train.checkpoint import load_checkpoint, weights


def _use_tokenizer(tok):
    assert isinstance(tok.vocab_size, int) and 0 < tok.vocab_size < 10 ** 7, f"vocab_size {tok.vocab_size}"
    for i in (tok.bos_id, tok.eos_id):
        assert i is None or 0 <= i < tok.vocab_size, f"special id {i} outside [0, {tok.vocab_size})"
    ids = tok.encode("The list, é 42.")
    assert all(0 <= i < tok.vocab_size for i in ids), f"encode gave ids outside the vocabulary: {ids}"
    assert isinstance(tok.decode(ids), str)


def _shard_make(d):
    path = os.path.join(d, "data00.bin")
    write_shard(path, np.random.default_rng(0).integers(0, 500, 4000))
    return path


def _shard_load(path):
    return read_shard(path, vocab_size=500)


def _shard_check(ids):
    assert ids.dtype == np.dtype("<u2") and len(ids) and int(ids.max()) < 500, "ids outside the vocabulary"


def _meta_make(d):
    prepare(None, d, tokenizer="byte", shard_tokens=1 << 30)
    return os.path.join(d, "meta.json")


def _meta_load(path):
    directory = os.path.dirname(path)
    meta = read_meta(directory)
    return TokenDataset(directory, seq_len=16, split="train"), meta


def _meta_check(result):
    ds, _ = result
    batch = ds.sample_batch(np.random.default_rng(0), 2)
    assert batch.shape == (2, 17) and 0 <= batch.min() and (ds.vocab_size is None or batch.max() < ds.vocab_size)


def _tokenizer_bin_make(d):
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]  # byte fallback, as Llama's
    pieces += [bytes([i]) for i in range(32, 127)] + [b" t", b"he"]
    Llama2cTokenizer(pieces, [0.0] * (len(pieces) - 2) + [-1.0, -2.0]).save(d)
    return os.path.join(d, "tokenizer.bin")


def _tokenizer_json_make(d):
    BPETokenizer.train(corpus.documents()[:3], 300).save(d)
    return os.path.join(d, "tokenizer.json")


def _tokenizer_config_make(d):
    _tokenizer_json_make(d)
    path = os.path.join(d, "tokenizer_config.json")
    with open(path, "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "chat_template": "{{ messages }}"}, f)
    return path


def _byte_tokenizer_make(d):
    ByteTokenizer().save(d)
    return os.path.join(d, "byte_tokenizer.json")


def _text_make(d):
    path = os.path.join(d, "notes.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("First line of notes.\nA second, with é and 42.\n" * 20)
    return path


def _text_load(path):
    out = os.path.join(os.path.dirname(path), "prepared")
    return prepare(path, out, tokenizer="byte", overwrite=True), out


def _text_check(result):
    meta, out = result
    assert meta["tokens"] > 0
    for s in meta["shards"]:
        assert int(read_shard(os.path.join(out, s["file"]), meta["vocab_size"]).max()) < meta["vocab_size"]


def _dataset_make(suffix):
    """TinyStories-shaped records ({"story": ..., "summary": ...}) in one of the files `prepare` reads."""
    def make(d):
        import gzip
        import io
        import tarfile

        import pyarrow as pa
        import pyarrow.parquet as pq

        records = [{"story": f"Story {i}: Lily saw a big ball. \u00e9 {i * 7}", "summary": "A ball.", "words": [i]}
                   for i in range(30)]
        path = os.path.join(d, "stories" + suffix)
        table = pa.table({"story": [r["story"] for r in records]})
        if suffix == ".parquet":
            pq.write_table(table, path, row_group_size=8)
            return path
        if suffix == ".arrow":  # as Hugging Face datasets writes it: the IPC stream format
            with pa.ipc.new_stream(path, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=8):
                    writer.write_batch(batch)
            return path
        data = (json.dumps(records, indent=1) if suffix.startswith(".json") and "l" not in suffix else
                "".join(json.dumps(r) + "\n" for r in records)).encode()
        if suffix == ".tar.gz":
            with tarfile.open(path, "w:gz") as tar:
                info = tarfile.TarInfo("data00.json")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            return path
        with open(path, "wb") as f:
            f.write(gzip.compress(data) if suffix.endswith(".gz") else data)
        return path
    return make


def _dataset_load(path):
    out = os.path.join(os.path.dirname(path), "prepared")
    return prepare(path, out, tokenizer="byte", overwrite=True, text_field="story"), out


_TRAINER = []  # the trainer whose checkpoint is fuzzed: a resume checks the file against its model


def _run_dir(d):
    from fusegrad.train.trainer import TrainConfig, Trainer

    cfg = TrainConfig(preset="tiny", max_steps=1, warmup_steps=0, batch_size=2, seq_len=8, workers=1, out_dir=d,
                      progress=False, plot=False, sample_tokens=0, eval_interval=0, quiet=True)
    trainer = Trainer(cfg)
    trainer.run()
    _TRAINER[:] = [trainer]
    return trainer


def _checkpoint_make(d):
    return _run_dir(d).ckpt_path


def _checkpoint_load(path):
    """What a resume reads: the loop's fields (Run.restore), the weights of the model, the sampler's RNG."""
    from fusegrad.data.shards import rng_from_state

    trainer = _TRAINER[0]
    state = load_checkpoint(path)
    trainer.restore(state, path)
    params = weights(state, "params", {n: p.shape for n, p in trainer.model.params.items()}, path)
    return state, params, rng_from_state(state.get("data_rng"))


def _checkpoint_check(result):
    state, params, rng = result
    assert all(np.isfinite(a).all() for a in params.values()), "non-finite weights accepted"
    assert isinstance(rng, np.random.Generator)


def _yaml_make(d):
    path = os.path.join(d, "run.yaml")
    with open(path, "w") as f:
        f.write("preset: tiny\nlr: 1.0e-3\nmin_lr: 1.0e-4\nbatch_size: 8\nmax_steps: 200\nbeta1: 0.9\n"
                "warmup_steps: 10\nval_fraction: 0.1\nresume: false\ndim: null\nout_dir: runs/x\n")
    return path


def _yaml_load(path):
    from fusegrad.cli.config import add_dataclass_args, config_from_args
    from fusegrad.train.trainer import TrainConfig

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    return config_from_args(TrainConfig, parser.parse_args(["--config", path]))


def _yaml_check(cfg):
    from fusegrad.core.errors import ConfigError

    try:
        cfg.check("train")
    except ConfigError as e:  # a value config_from_args let through: a failure, not a refusal
        raise AssertionError(f"accepted, then refused by check: {e}") from None
    assert 0 < cfg.lr_floor <= cfg.lr and 0 <= cfg.beta1 < 1 and cfg.batch_size >= 1, "out-of-range setting"


FORMATS = [
    ("shard", _shard_make, _shard_load, _shard_check),
    ("shard-meta", _meta_make, _meta_load, _meta_check),
    ("tokenizer.bin", _tokenizer_bin_make, load_tokenizer, _use_tokenizer),
    ("tokenizer.json", _tokenizer_json_make, load_tokenizer, _use_tokenizer),
    ("tokenizer_config", _tokenizer_config_make, lambda p: load_tokenizer(os.path.dirname(p)), _use_tokenizer),
    ("byte_tokenizer.json", _byte_tokenizer_make, load_tokenizer, _use_tokenizer),
    ("text", _text_make, _text_load, _text_check),
    ("dataset.json", _dataset_make(".json"), _dataset_load, _text_check),
    ("dataset.jsonl.gz", _dataset_make(".jsonl.gz"), _dataset_load, _text_check),
    ("dataset.tar.gz", _dataset_make(".tar.gz"), _dataset_load, _text_check),
    ("dataset.parquet", _dataset_make(".parquet"), _dataset_load, _text_check),
    ("dataset.arrow", _dataset_make(".arrow"), _dataset_load, _text_check),
    ("checkpoint", _checkpoint_make, _checkpoint_load, _checkpoint_check),
    ("yaml-config", _yaml_make, _yaml_load, _yaml_check),
]


# -- checkpoints, fine-tune data ------------------------------------------------------------
def _model_check(model):
    from fusegrad.core.settings import in_range

    c = model.config
    for name, p in model.params.items():
        a = p.numpy()
        assert a.dtype.kind == "f" and np.isfinite(a).all(), f"{name}: non-finite or non-float weights accepted"
    assert in_range(c.max_seq_len, "[1, 1048576]") and in_range(c.vocab_size, "[1, 4194304]"), f"config {c}"


def _llama2c_make(d):
    from fusegrad.models import Llama

    path = os.path.join(d, "model.bin")
    Llama.from_preset("tiny", seed=0).save_llama2c(path)
    return path


def _hf_make(d):
    from fusegrad.models import Llama

    Llama.from_preset("tiny", seed=0).save_pretrained(d)
    return d


def _hf_config_make(d):
    return os.path.join(_hf_make(d), "config.json")


def _meta_pth_make(d):
    """Meta's download: params.json and consolidated.00.pth (bf16, Meta's names)."""
    import torch

    from tests.models.test_meta_pth import LLAMA32, meta_weights

    torch.save(meta_weights(LLAMA32, tied=True), os.path.join(d, "consolidated.00.pth"))
    with open(os.path.join(d, "params.json"), "w") as f:
        json.dump(LLAMA32, f)
    return os.path.join(d, "consolidated.00.pth")


def _hf_pytorch_bin_make(d):
    """A Hugging Face directory as transformers < 4.35 saved it: torch.save's pytorch_model.bin."""
    import torch
    from safetensors.torch import load_file

    st = os.path.join(_hf_make(d), "model.safetensors")
    torch.save(load_file(st), os.path.join(d, "pytorch_model.bin"))
    os.remove(st)
    return os.path.join(d, "pytorch_model.bin")


def _hf_weights_make(d):
    return os.path.join(_hf_make(d), "model.safetensors")


def _gguf_make(d):
    from fusegrad.models import Llama
    from fusegrad.models.export import export_model

    path = os.path.join(d, "model.gguf")
    export_model(Llama.from_preset("tiny", seed=0, vocab_size=300), path, "gguf",
                 BPETokenizer.train(corpus.documents()[:20], 300), "q8_0")
    return path


def _load_model(path):
    from fusegrad.models import Llama

    return Llama.from_pretrained(path if path.endswith((".bin", ".gguf")) else os.path.dirname(path))


def _adapter_make(d):
    from fusegrad.finetune.lora import LoraConfig, attach_lora
    from fusegrad.finetune.peft_io import save_adapter
    from fusegrad.models import Llama

    lora = attach_lora(Llama.from_preset("tiny", seed=0), LoraConfig(targets="q,v", r=4, alpha=8.0))
    for p in lora.named_parameters():
        p[1].data[...] = 0.01
    save_adapter(d, lora)
    return d


def _adapter_load(path):
    from fusegrad.finetune.peft_io import load_adapter
    from fusegrad.models import Llama

    return load_adapter(os.path.dirname(path), Llama.from_preset("tiny", seed=0))


def _adapter_check(lora):
    for name, p in lora.named_parameters():
        assert p.data.dtype.kind == "f" and np.isfinite(p.data).all(), f"{name}: non-finite adapter weights accepted"
    assert lora.config.r >= 1 and isinstance(lora.config.r, int), f"rank {lora.config.r!r}"


def _jsonl_make(d):
    path = os.path.join(d, "data.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) for i in range(20)) + "\n")
    return path


def _jsonl_load(path):
    from fusegrad.finetune import data

    return data.lm_examples(data.read_records(path), ByteTokenizer(), 64)


def _csv_make(d):
    path = os.path.join(d, "data.csv")
    with open(path, "w") as f:
        f.write("text,label\n" + "".join(f"review number {i},{i % 2}\n" for i in range(20)))
    return path


def _csv_load(path):
    from fusegrad.finetune import data

    return data.classify_examples(data.read_records(path), ByteTokenizer(), 2, 64)


def _examples_check(examples):
    for e in examples:
        assert e.tokens.dtype.kind == "i" and 0 <= e.tokens.min() and e.tokens.max() < 258, "ids out of range"
        assert e.label in (-1, 0, 1), f"label {e.label!r} accepted for 2 classes"


def _resume_load(path):  # Trainer.load (train/trainer.py): --resume
    trainer = _TRAINER[0]
    trainer.load(path)
    return trainer.model


def _load_model_dir_of(path):  # a directory model whose file `path` is: a .bin or .pth, not the model itself
    from fusegrad.models import Llama

    return Llama.from_pretrained(os.path.dirname(path))


def _load_model_from_checkpoint(path):  # load_model (train/trainer.py): sample and info
    from fusegrad.train.trainer import load_model

    return load_model(path)[0]


FORMATS += [  # defined below the loaders they call
    ("llama2c.bin", _llama2c_make, _load_model, _model_check),
    ("hf-config.json", _hf_config_make, _load_model, _model_check),
    ("hf-safetensors", _hf_weights_make, _load_model, _model_check),
    ("hf-pytorch_model.bin", _hf_pytorch_bin_make, _load_model_dir_of, _model_check),
    ("meta-consolidated.pth", _meta_pth_make, _load_model_dir_of, _model_check),
    ("meta-params.json", lambda d: os.path.join(os.path.dirname(_meta_pth_make(d)), "params.json"),
     _load_model, _model_check),
    ("gguf-model", _gguf_make, _load_model, _model_check),
    ("gguf-tokenizer", _gguf_make, load_tokenizer, _use_tokenizer),
    ("peft-config", lambda d: os.path.join(_adapter_make(d), "adapter_config.json"), _adapter_load, _adapter_check),
    ("peft-safetensors", lambda d: os.path.join(_adapter_make(d), "adapter_model.safetensors"), _adapter_load,
     _adapter_check),
    ("checkpoint-resume", _checkpoint_make, _resume_load, _model_check),
    ("checkpoint-load_model", _checkpoint_make, _load_model_from_checkpoint, _model_check),
    ("finetune.jsonl", _jsonl_make, _jsonl_load, _examples_check),
    ("finetune.csv", _csv_make, _csv_load, _examples_check),
]

