"""The file formats fusegrad reads, each as (name, make a valid file, load it, check what was loaded)."""
import json
import os

import numpy as np

from fusegrad.data import corpus
from fusegrad.data.prepare import prepare
from fusegrad.data.shards import TokenDataset, read_meta, read_shard, write_shard
from fusegrad.data.tokenizer import BPETokenizer, ByteTokenizer, Llama2cTokenizer, load_tokenizer


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


FORMATS = [
    ("shard", _shard_make, _shard_load, _shard_check),
    ("shard-meta", _meta_make, _meta_load, _meta_check),
    ("tokenizer.bin", _tokenizer_bin_make, load_tokenizer, _use_tokenizer),
    ("tokenizer.json", _tokenizer_json_make, load_tokenizer, _use_tokenizer),
    ("tokenizer_config", _tokenizer_config_make, lambda p: load_tokenizer(os.path.dirname(p)), _use_tokenizer),
    ("byte_tokenizer.json", _byte_tokenizer_make, load_tokenizer, _use_tokenizer),
    ("text", _text_make, _text_load, _text_check),
]
