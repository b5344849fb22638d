import gzip
import json
import os

import numpy as np
import pytest

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.data import corpus
from fusegrad.data.prepare import prepare
from fusegrad.data.shards import TokenDataset, read_shard
from fusegrad.data.tokenizer import BPETokenizer, SentencePieceTokenizer, load_tokenizer


def _documents_in(out_dir, meta):
    """Split every shard at BOS and decode each piece with the saved tokenizer."""
    tok = load_tokenizer(out_dir)
    ids = np.concatenate([read_shard(out_dir / s["file"], meta["vocab_size"]) for s in meta["shards"]])
    starts = np.flatnonzero(ids == tok.bos_id)
    assert starts[0] == 0
    return [tok.decode(ids[a:b]) for a, b in zip(starts, list(starts[1:]) + [len(ids)])]


def test_embedded_corpus_byte(tmp_path):
    meta = prepare(None, tmp_path, tokenizer="byte", val_fraction=0.05)
    docs = corpus.documents()
    assert meta["tokens"] == sum(len(d.encode("utf-8")) + 1 for d in docs)  # oracle: UTF-8 length + BOS
    assert (meta["dtype"], meta["vocab_size"], meta["documents"]) == ("uint16", 258, len(docs))
    assert json.loads((tmp_path / "meta.json").read_text()) == meta
    assert _documents_in(tmp_path, meta) == docs
    ds = TokenDataset(tmp_path, 64, "val")  # val_fraction and vocab_size come from meta.json
    assert ds.val_fraction == 0.05 and ds.vocab_size == 258
    assert abs(len(ds) - 0.05 * meta["tokens"]) <= 1


def test_text_dir_with_bpe_and_small_shards(tmp_path):
    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    docs = corpus.documents()[:6]
    for i, d in enumerate(docs):
        (src / ("sub" if i % 2 else "") / f"{i}.txt").write_text(d, encoding="utf-8")
    (src / "notes.md").write_text("ignored: not .txt")
    out = tmp_path / "out"
    meta = prepare(src, out, tokenizer="bpe", vocab_size=300, shard_tokens=2000)
    assert isinstance(load_tokenizer(out), BPETokenizer) and meta["vocab_size"] == 300
    assert len(meta["shards"]) > 1 and meta["documents"] == 6
    # files are read in sorted-path order: texts/0, 2, 4 sort before texts/sub/1, 3, 5
    assert _documents_in(out, meta) == [docs[i] for i in (0, 2, 4, 1, 3, 5)]
    with pytest.raises(FormatError, match="already holds prepared data"):
        prepare(src, out, tokenizer="byte")
    meta2 = prepare([src / "0.txt"], out, tokenizer="byte", overwrite=True)
    assert [s["file"] for s in meta2["shards"]] == ["data00.bin"]
    assert sorted(p.name for p in out.glob("*.bin")) == ["data00.bin"]  # stale shards removed


def test_existing_sentencepiece_tokenizer(tmp_path, sp_model_proto, sp_oracle):
    (tmp_path / "tokenizer.model").write_bytes(sp_model_proto)
    text = corpus.documents()[3]
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    meta = prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=tmp_path / "tokenizer.model")
    assert meta["tokenizer"]["kind"] == "sentencepiece"
    ids = read_shard(tmp_path / "out" / "data00.bin")
    assert ids.tolist() == [1] + sp_oracle.encode(text)
    assert isinstance(load_tokenizer(tmp_path / "out"), SentencePieceTokenizer)


def test_bad_inputs(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FormatError, match="nope.txt: input file does not exist"):
        prepare(tmp_path / "nope.txt", out)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(FormatError, match="empty.txt: text file is empty"):
        prepare(tmp_path / "empty.txt", out)
    (tmp_path / "latin1.txt").write_bytes("fine\nalso fine\ncaf\xe9".encode("latin-1"))
    with pytest.raises(FormatError, match=r"latin1.txt: line 3 is not UTF-8 text \(byte 18"):
        prepare(tmp_path / "latin1.txt", out)
    (tmp_path / "nodata").mkdir()
    with pytest.raises(FormatError, match="nodata: directory holds no .txt, .jsonl, .json, .parquet or .arrow files"):
        prepare(tmp_path / "nodata", out)
    with pytest.raises(FormatError, match="list of input files is empty"):
        prepare([], out)
    with pytest.raises(ConfigError, match="vocab_size 1000 given"):
        prepare(None, out, tokenizer="byte", vocab_size=1000)
    with pytest.raises(FormatError, match="missing_tok"):
        prepare(None, out, tokenizer=str(tmp_path / "missing_tok"))
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare(None, out, val_fraction=1.0)


def test_large_vocab_writes_uint32_shards(tmp_path):
    """A tokenizer with > 65536 ids gets *.u32.bin shards; ids above 65535 survive the round trip."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"filler{i}": i for i in range(3, 70000)}}
    vocab.update({ch: 70000 + i for i, ch in enumerate(sorted(alphabet))})  # every byte maps above 65535
    hf = HF(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("big vocabulary, é", encoding="utf-8")
    meta = prepare(tmp_path / "a.txt", tmp_path / "out", tokenizer=tmp_path / "tokenizer.json")
    assert meta["dtype"] == "uint32" and meta["shards"][0]["file"] == "data00.u32.bin"
    ids = read_shard(tmp_path / "out" / "data00.u32.bin", meta["vocab_size"])
    assert ids[0] == 1 and ids[1:].min() >= 70000
    assert ids[1:].tolist() == hf.encode("big vocabulary, é").ids
    assert load_tokenizer(tmp_path / "out").decode(ids) == "big vocabulary, é"


def write_llama2c_shards(folder, sp, n_shards=3):
    """Shards the way llama2.c's tinystories.py writes them: every story encoded with BOS, uint16, no header."""
    folder.mkdir()
    docs = corpus.documents()
    for i in range(n_shards):
        ids = [t for doc in docs[i * 4:(i + 1) * 4] for t in [sp.bos_id()] + sp.encode(doc)]
        np.array(ids, dtype=np.uint16).tofile(folder / f"data{i:02d}.bin")
    return folder


def test_llama2c_shard_folder_trains_as_it_is_first_shard_validation(tmp_path, sp_model_proto, sp_oracle):
    folder = write_llama2c_shards(tmp_path / "tok512", sp_oracle)
    (tmp_path / "tok512.model").write_bytes(sp_model_proto)
    meta = prepare(folder, tmp_path / "out", tokenizer=tmp_path / "tok512.model")
    assert meta["layout"] == "llama2c" and meta["vocab_size"] == 512 and len(meta["shards"]) == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "tokenizer.model"]  # the shards stay in place
    val = TokenDataset(tmp_path / "out", seq_len=16, split="val")
    train = TokenDataset(tmp_path / "out", seq_len=16, split="train")
    assert [os.path.basename(p) for p in val.paths] == ["data00.bin"]
    assert [os.path.basename(p) for p in train.paths] == ["data01.bin", "data02.bin"]
    assert (val.segments[0][1] == np.fromfile(folder / "data00.bin", dtype="<u2")).all()  # whole shard, unchanged
    batch = train.sample_batch(np.random.default_rng(0), 4)
    stream = np.concatenate([np.fromfile(folder / f"data0{i}.bin", dtype="<u2") for i in (1, 2)]).tolist()
    text = ",".join(map(str, stream))
    assert all(",".join(map(str, row)) in text for row in batch.tolist())  # windows of the train shards
    assert isinstance(load_tokenizer(tmp_path / "out"), SentencePieceTokenizer)


def test_llama2c_shard_folder_errors_name_the_file(tmp_path, sp_model_proto, sp_oracle):
    folder = write_llama2c_shards(tmp_path / "tok512", sp_oracle)
    with pytest.raises(FormatError, match=r"data00.bin: token id \d+ .*tokenizer 'byte' has 258 ids.*tok<N>.model"):
        prepare(folder, tmp_path / "out")  # the default byte tokenizer does not fit these ids
    model = tmp_path / "tok512.model"
    model.write_bytes(sp_model_proto)
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    with pytest.raises(FormatError, match=r"notes.bin: not a llama2.c shard"):
        prepare(folder, tmp_path / "out", tokenizer=model)
    (folder / "notes.bin").unlink()
    np.arange(1, 400, dtype="<u4").tofile(folder / "data03.bin")
    with pytest.raises(FormatError, match=r"data03.bin: every other uint16 id is 0: these look like uint32"):
        prepare(folder, tmp_path / "out", tokenizer=model)
    for name in ("data01.bin", "data02.bin", "data03.bin"):
        (folder / name).unlink()
    with pytest.raises(FormatError, match=r"1 llama2.c shard\(s\); .*first shard is the validation split"):
        prepare(folder, tmp_path / "out", tokenizer=model)


def test_fusegrad_train_on_a_llama2c_shard_folder(tmp_path, sp_model_proto, sp_oracle, capsys):
    from fusegrad.cli.main import main
    from fusegrad.train.trainer import load_model

    folder = write_llama2c_shards(tmp_path / "tok512", sp_oracle)
    args = ["train", "--data", str(folder), "--preset", "tiny", "--max_steps", "3", "--warmup_steps", "1",
            "--batch_size", "2", "--seq_len", "16", "--eval_interval", "3", "--eval_batches", "2", "--workers", "1",
            "--sample_tokens", "0", "--plot", "false", "--progress", "false", "--quiet"]
    assert main(args + ["--out_dir", str(tmp_path / "bad")]) == 2  # the default byte tokenizer does not fit
    err = capsys.readouterr().err
    assert "data00.bin: token id" in err and "the tokenizer 'byte' has 258 ids" in err and "--tokenizer" in err
    (tmp_path / "tok512.model").write_bytes(sp_model_proto)
    assert main(args + ["--out_dir", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "tok512.model")]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 3 and np.isfinite(metrics[-1]["val_loss"])
    model, tok = load_model(tmp_path / "run")
    assert model.config.vocab_size == 512 and isinstance(tok, SentencePieceTokenizer)
    val = TokenDataset(tmp_path / "run" / "data", seq_len=16, split="val")  # llama2.c's first shard
    assert [os.path.basename(p) for p in val.paths] == ["data00.bin"]
    want = np.mean([model.loss(b).item() for b in val.iter_batches(2, 2)])
    assert metrics[-1]["val_loss"] == pytest.approx(want, rel=1e-5)


def _tinystories_jsonl_gz(path, n=120):
    """TinyStories as its JSON records hold it (a story and fields beside it), as gzipped JSON Lines."""
    from tests.data.test_sources import stories

    records = stories(n, seed=3)
    path.write_bytes(gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()))
    return [r["story"] for r in records]


def test_a_dataset_is_encoded_in_batches_as_each_tokenizer_encodes_one_story(tmp_path, monkeypatch, sp_model_proto,
                                                                           sp_oracle):
    """Batches of a few stories (encoded together, on every core where the tokenizer can) and small shards give,
    story by story, the ids that sentencepiece, tokenizers and run.c's rescanning merge loop give one at a time."""
    from tokenizers import Tokenizer as HF

    import importlib

    from fusegrad.data.tokenizer import Llama2cTokenizer
    from tests.data.test_llama2c_tokenizer import rescan_encode
    from tests.tokenizers_made import trained_bpe

    monkeypatch.setattr(importlib.import_module("fusegrad.data.prepare"), "BATCH_CHARS", 2000)  # not the function
    texts = _tinystories_jsonl_gz(tmp_path / "stories.jsonl.gz")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(sp_model_proto)
    sp = load_tokenizer(tmp_path / "sp")
    l2c = Llama2cTokenizer.from_sentencepiece(sp)
    l2c.save(tmp_path)
    hf_dir = trained_bpe(tmp_path, [("bytes", True)])
    hf = HF.from_file(str(hf_dir / "tokenizer.json"))
    oracles = {"sp": lambda t: [1] + sp_oracle.encode(t),
               "tokenizer.bin": lambda t: [1] + rescan_encode(l2c, t),
               "tokenizer.json": lambda t: [0] + hf.encode(t, add_special_tokens=False).ids}  # <s> is id 0 there
    for name, oracle in oracles.items():
        out = tmp_path / f"out-{name}"
        meta = prepare(tmp_path / "stories.jsonl.gz", out, tokenizer=tmp_path / name, text_field="story",
                       shard_tokens=3000)
        assert meta["documents"] == len(texts) and len(meta["shards"]) > 2, name
        ids = np.concatenate([read_shard(out / s["file"]) for s in meta["shards"]]).tolist()
        assert ids == [t for text in texts for t in oracle(text)], name
        second = read_shard(out / meta["shards"][1]["file"]).tolist()
        assert second[0] == ids[0], name  # every shard starts at a story's BOS: whole documents per shard


def test_preparing_a_large_text_holds_a_batch_in_memory_not_the_corpus(tmp_path):
    """40 MB of stories with the byte tokenizer: the old prepare held every id as a Python int (about 1 GB)."""
    import subprocess
    import sys

    story = "Once upon a time, there was a little girl named Lily. She loved to play outside.\n" * 5
    n = (40 << 20) // len(story + "<|endoftext|>\n")
    with open(tmp_path / "big.txt", "w") as f:
        for _ in range(n):
            f.write(story + "<|endoftext|>\n")
    code = ("import sys; from fusegrad.data.prepare import prepare; m = prepare(sys.argv[1], sys.argv[2]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(m['documents'], m['tokens'], int(hwm) // 1024)")
    docs, tokens, peak_mb = map(int, subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.txt"),
                                                     str(tmp_path / "out")], capture_output=True, text=True,
                                                    check=True).stdout.split())
    assert docs == n and tokens == n * len(story)  # BOS + each story stripped of its last "\n"
    assert peak_mb < 400, f"prepare peaked at {peak_mb} MB for a 40 MB text"


def test_fusegrad_prepare_and_train_read_a_dataset_naming_its_text_field(tmp_path, capsys):
    from fusegrad.cli.main import main

    texts = _tinystories_jsonl_gz(tmp_path / "stories.jsonl.gz", n=60)
    assert main(["prepare", str(tmp_path / "stories.jsonl.gz"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stories.jsonl.gz: line 1 has no 'text' field (its text fields: story, " \
        "summary, source); name the field with --text_field" in err
    assert main(["prepare", str(tmp_path / "stories.jsonl.gz"), "--out", str(tmp_path / "data"),
                 "--text_field", "story"]) == 0
    assert "from 60 documents" in capsys.readouterr().out
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert _documents_in(tmp_path / "data", meta) == texts
    args = ["train", "--data", str(tmp_path / "stories.jsonl.gz"), "--text_field", "story", "--preset", "tiny",
            "--max_steps", "2", "--batch_size", "2", "--seq_len", "16", "--eval_interval", "2", "--eval_batches",
            "1", "--workers", "1", "--sample_tokens", "0", "--plot", "false", "--progress", "false", "--quiet",
            "--out_dir", str(tmp_path / "run")]
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["documents"] == 60
