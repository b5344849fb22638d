"""Text datasets -> pretokenized shards + the tokenizer + meta.json, ready for TokenDataset.

This is what `fusegrad prepare` runs. The inputs are read as a stream (sources.py: text split at a
separator, JSON Lines, JSON, Parquet, compressed or in tar archives), so a corpus of any size is prepared in
bounded memory: documents are encoded in batches of about 4 MB of text (on every core where the tokenizer
can) and shards are written as they fill. Each document is encoded as the tokenizer encodes text by default:
BOS in front where it adds one (as llama2.c's shards are), else followed by EOS as the separator. Training a
BPE reads the inputs once more, before the shards are written.
A folder of llama2.c's own pretokenized shards (data00.bin, ... from its tinystories.py) is checked and
described by a meta.json that points at it, not copied; llama2.c's first shard is the validation split.

>>> import tempfile, os
>>> out = tempfile.mkdtemp()
>>> meta = prepare(None, out, tokenizer="byte")        # the embedded pydoc corpus
>>> meta["tokenizer"]["kind"], meta["dtype"], sorted(os.listdir(out))
('byte', 'uint16', ['byte_tokenizer.json', 'data00.bin', 'meta.json'])
"""
import glob
import json
import os
import re

import numpy as np
from tqdm import tqdm

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.core.fileio import atomic_write_text
from fusegrad.data import corpus
from fusegrad.data.shards import META_FILE, LLAMA2C_LAYOUT, check_llama2c_shards, shard_dtype, shard_name, write_shard
from fusegrad.data.sources import DEFAULT_SEPARATOR, Documents
from fusegrad.data.tokenizer import BPETokenizer, Tokenizer, load_tokenizer

DEFAULT_BPE_VOCAB = 4096
BATCH_CHARS = 4 << 20  # text encoded at once: large enough for every core, small next to a shard's ids
_OUR_FILES = re.compile(r"^data\d+(\.u32)?\.bin$")


def prepare(inputs=None, out_dir="data", tokenizer="byte", vocab_size=None, val_fraction=0.1,
            shard_tokens=1 << 24, overwrite=False, text_field="text", separator=DEFAULT_SEPARATOR, progress=False):
    """Tokenize text into `out_dir`; return the meta dict also written to out_dir/meta.json.

    inputs:       None (the embedded CPython documentation corpus), a file, a directory (every file of a
                  kind sources.py reads, found recursively, sorted), or a list of files. Text must be UTF-8.
                  Or a folder of llama2.c's pretokenized uint16 shards: checked against the tokenizer
                  (which must be the one they were made with) and used in place.
    tokenizer:    "byte" (258 ids, no training), "bpe" (byte-level BPE trained here on the inputs to
                  `vocab_size` ids, default 4096), a path to a saved tokenizer (see load_tokenizer), or a
                  Tokenizer (a pretrained model's, for continued pretraining).
    val_fraction: the last fraction of every shard that TokenDataset serves as validation (recorded).
    shard_tokens: start a new shard once one holds this many tokens (whole documents per shard).
    overwrite:    replace shards + meta.json a previous prepare left in out_dir (else FormatError).
    text_field:   the field (JSON) or column (Parquet) that holds a record's text.
    separator:    the text between documents in a text file ("" : a file is one document); \\n, \\t stand for
                  themselves, so "\\n\\n" makes each paragraph a document.
    progress:     show a progress bar (tqdm) over the input bytes read.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"prepare: val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(inputs, (str, os.PathLike)) and os.path.isdir(inputs) and glob.glob(os.path.join(inputs, "*.bin")):
        return _describe_llama2c_shards(os.fspath(inputs), out_dir, tokenizer, overwrite)
    docs = _EmbeddedCorpus() if inputs is None else Documents(inputs, text_field, separator)
    tok = _make_tokenizer(tokenizer, vocab_size, docs, progress)
    _clear_out_dir(out_dir, overwrite)

    shards, buf, n_buf, n_docs = [], [], 0, 0
    for batch in _batches(docs, progress, "tokenizing"):
        n_docs += len(batch)
        for ids in tok.documents_ids(batch):
            buf.append(ids)
            n_buf += len(ids)
            if n_buf >= shard_tokens:
                shards.append(_flush(out_dir, len(shards), tok.vocab_size, buf))
                buf, n_buf = [], 0
    if buf:
        shards.append(_flush(out_dir, len(shards), tok.vocab_size, buf))

    tok.save(out_dir)
    meta = {"format": "fusegrad-shards", "version": 1, "dtype": shard_dtype(shards[0]["file"]).name,
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "tokenizer": tok.to_json(), "val_fraction": val_fraction, "documents": n_docs,
            "tokens": sum(s["tokens"] for s in shards), "shards": shards, "sources": docs.paths}
    if inputs is not None:
        meta.update(text_field=text_field, separator=docs.separator)
    atomic_write_text(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=1))  # last: marks completion
    return meta


class _EmbeddedCorpus(list):
    """The embedded corpus as prepare's inputs: its documents, named as one source."""

    def __init__(self):
        super().__init__(corpus.documents())
        self.paths = ["pydoc_data.topics"]
        self.progress = lambda n: None

    def total_bytes(self):
        return sum(len(d) for d in self)


def _batches(docs, progress, what):
    """Lists of documents of about BATCH_CHARS characters, with a progress bar over the input bytes."""
    with tqdm(total=docs.total_bytes(), unit="B", unit_scale=True, desc=what, disable=None if progress else True,
              leave=False) as bar:
        docs.progress = bar.update
        try:
            batch, size = [], 0
            for doc in docs:
                batch.append(doc)
                size += len(doc)
                if size >= BATCH_CHARS:
                    yield batch
                    batch, size = [], 0
            if batch:
                yield batch
        finally:
            docs.progress = lambda n: None


def _make_tokenizer(tokenizer, vocab_size=None, docs=(), progress=False):
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer == "bpe":  # a first pass over the inputs
        return BPETokenizer.train((d for batch in _batches(docs, progress, "training bpe") for d in batch),
                                  vocab_size or DEFAULT_BPE_VOCAB)
    else:
        tok = load_tokenizer(tokenizer)
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ConfigError(f"prepare: vocab_size {vocab_size} given, but tokenizer {tokenizer!r} has "
                         f"{tok.vocab_size} ids (vocab_size is only chosen when training 'bpe')")
    return tok


def _clear_out_dir(out_dir, overwrite):
    os.makedirs(out_dir, exist_ok=True)
    old = [n for n in os.listdir(out_dir) if _OUR_FILES.match(n) or n == META_FILE]
    if old and not overwrite:
        raise FormatError(f"{out_dir}: already holds prepared data ({', '.join(sorted(old))}); "
                          f"pass overwrite=True or choose another directory")
    for n in old:
        os.remove(os.path.join(out_dir, n))


def _flush(out_dir, index, vocab_size, buf):
    name = shard_name(index, vocab_size)
    ids = np.concatenate(buf)
    buf.clear()
    write_shard(os.path.join(out_dir, name), ids)
    return {"file": name, "tokens": int(len(ids))}


def _describe_llama2c_shards(source, out_dir, tokenizer, overwrite):
    """meta.json (+ the tokenizer) in out_dir for llama2.c's shards in `source`, which stay where they are."""
    tok = _make_tokenizer(tokenizer)
    shards = check_llama2c_shards(source, tok.vocab_size, getattr(tok, "source", tok.kind))
    _clear_out_dir(out_dir, overwrite)
    tok.save(out_dir)
    tokens = [n for _, n in shards]
    meta = {"format": "fusegrad-shards", "version": 1, "layout": LLAMA2C_LAYOUT, "dtype": "uint16",
            "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer": tok.to_json(),
            "val_fraction": tokens[0] / sum(tokens), "tokens": sum(tokens), "sources": [source],
            "shards": [{"file": os.path.abspath(path), "tokens": n} for path, n in shards]}
    atomic_write_text(os.path.join(out_dir, META_FILE), json.dumps(meta, indent=1))
    return meta

