"""Documents read from datasets in the shapes they are published in, checked against the standard library's and
pyarrow's own readers of the same files."""
import bz2
import gzip
import io
import json
import lzma
import random
import tarfile

import pytest

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.data import sources
from fusegrad.data.sources import Documents, kind_of


def stories(n=40, seed=0):
    """TinyStories-like records: a story (with paragraphs, quotes and non-ASCII) and the fields beside it."""
    rng = random.Random(seed)
    words = ["Once", "upon", "a", "time,", "Lily", "saw", "a", "big", "red", "ball.", '"Yes!"', "said", "Mom.",
             "The", "sun", "was", "happy", "\u00e9t\u00e9", "\u6f22\u5b57", "\U0001f600"]
    return [{"story": "\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 60)))
                                  for _ in range(rng.randint(1, 3))),
             "instruction": {"prompt:": "Write a story.", "words": ["ball", "sun"], "features": []},
             "summary": "A girl plays.", "source": "GPT-4"} for _ in range(n)]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 7 bytes: every record, separator and multi-byte character meets a block boundary somewhere."""
    monkeypatch.setattr(sources, "_BLOCK", 7)


def test_tinystories_v2_text_splits_at_the_separator_and_strips_each_story(tmp_path):
    texts = [r["story"] for r in stories()]
    path = tmp_path / "TinyStoriesV2-GPT4-valid.txt"
    path.write_text("".join(t + "\n<|endoftext|>\n" for t in texts), encoding="utf-8")
    assert list(Documents(path)) == texts
    inline = tmp_path / "inline.txt"  # separators inside lines too, and none after the last document
    inline.write_text("<|endoftext|>".join(texts), encoding="utf-8")
    assert list(Documents(inline)) == texts
    verbatim = tmp_path / "one.txt"  # no separator: one document exactly as it is
    verbatim.write_text("\n  " + texts[0] + "\n\n", encoding="utf-8")
    assert list(Documents(verbatim)) == ["\n  " + texts[0] + "\n\n"]
    assert list(Documents(path, separator="")) == [path.read_text(encoding="utf-8")]
    paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    assert list(Documents(path, separator="\\n\\n")) == paragraphs and len(paragraphs) > len(texts)


def test_json_list_jsonl_parquet_and_arrow_give_each_records_text_field(tmp_path):
    records = stories()
    texts = [r["story"] for r in records]
    (tmp_path / "data00.json").write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    assert list(Documents(tmp_path / "data00.json", text_field="story")) == texts
    (tmp_path / "compact.json").write_text(json.dumps(records, separators=(",", ":")), encoding="utf-8")
    assert list(Documents(tmp_path / "compact.json", text_field="story")) == texts
    lines = [json.dumps({"text": t}) for t in texts] + ['{"text": null}', '{"text": ""}', "", '"a bare string"']
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert list(Documents(tmp_path / "train.jsonl")) == texts + ["a bare string"]
    (tmp_path / "lines.json").write_text("\n".join(lines), encoding="utf-8")  # JSON Lines named .json
    assert list(Documents(tmp_path / "lines.json")) == texts + ["a bare string"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts) + 1)), "text": texts + [None]})
    pq.write_table(table, tmp_path / "train-00000-of-00001.parquet", row_group_size=7)
    assert list(Documents(tmp_path / "train-00000-of-00001.parquet")) == \
        [t for t in pq.read_table(tmp_path / "train-00000-of-00001.parquet").column("text").to_pylist() if t]
    # Arrow as Hugging Face datasets writes its cache and save_to_disk files (IPC stream), and the IPC file format
    for name, new in (("data-00000-of-00001.arrow", pa.ipc.new_stream), ("file-format.arrow", pa.ipc.new_file)):
        with new(str(tmp_path / name), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=7):
                writer.write_batch(batch)
        assert list(Documents(tmp_path / name)) == texts, name


def test_compressed_files_and_tar_archives_read_as_their_contents(tmp_path):
    records = stories()
    texts = [r["story"] for r in records]
    raw = json.dumps(records).encode()
    plain = list(Documents(_write(tmp_path / "d.json", raw), text_field="story"))
    assert plain == texts
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress),
                             (".zst", lambda b: __import__("zstandard").ZstdCompressor().compress(b))):
        path = _write(tmp_path / f"d.json{suffix}", compress(raw))
        assert list(Documents(path, text_field="story")) == texts, suffix
    archive = tmp_path / "TinyStories_all_data.tar.gz"  # data00.json ... as the published archive holds them
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(3):
            _add(tar, f"data{i:02d}.json", json.dumps(records[i * 10:(i + 1) * 10]).encode())
        _add(tar, "README.md", b"not a dataset file: skipped")
        _add(tar, "extra/more.jsonl.gz", gzip.compress(b'{"story": "From a compressed member."}\n'))
    assert list(Documents(archive, text_field="story")) == texts[:30] + ["From a compressed member."]
    zstd = __import__("zstandard")  # tarfile cannot open .tar.zst itself before Python 3.14
    tar_bytes = gzip.decompress(archive.read_bytes())
    packed = _write(tmp_path / "stories.tar.zst", zstd.ZstdCompressor().compress(tar_bytes))
    assert list(Documents(packed, text_field="story")) == texts[:30] + ["From a compressed member."]
    with pytest.raises(FormatError, match=r"cut.tar.zst: not a readable tar archive"):
        list(Documents(_write(tmp_path / "cut.tar.zst", packed.read_bytes()[:-20]), text_field="story"))


def test_a_directory_reads_every_file_of_a_known_kind_sorted(tmp_path):
    _write(tmp_path / "b" / "2.jsonl", b'{"text": "two"}\n')
    _write(tmp_path / "1.txt", b"one")
    _write(tmp_path / "3.txt.gz", gzip.compress(b"three"))
    _write(tmp_path / "notes.md", b"skipped")
    docs = Documents(tmp_path)
    assert [p.split("/")[-1] for p in docs.paths] == ["1.txt", "3.txt.gz", "2.jsonl"]  # sorted by path
    assert list(docs) == ["one", "three", "two"]
    assert kind_of("x.tar.gz") == ("tar", "") and kind_of("x.tar.zst") == ("tar", ".zst") and kind_of("x.jsonl.zst") == ("jsonl", ".zst") and kind_of("x.md") is None


def test_json_files_that_are_not_datasets_are_skipped_in_a_directory_and_refused_alone(tmp_path):
    """A model beside the data (config.json, a one-line tokenizer_config.json), a run's metrics.jsonl."""
    records = stories(5)
    _write(tmp_path / "data00.json", json.dumps(records).encode())
    _write(tmp_path / "model" / "config.json", json.dumps({"hidden_size": 8}, indent=2).encode())
    _write(tmp_path / "model" / "tokenizer_config.json", json.dumps({"bos_token": "<s>"}).encode())
    _write(tmp_path / "run" / "metrics.jsonl", b'{"step": 1, "loss": 2.5}\n')
    with pytest.warns(UserWarning, match="skipped .*config.json: a .json dataset is a list of records"):
        assert list(Documents(tmp_path, text_field="story")) == [r["story"] for r in records]
    with pytest.warns(UserWarning), pytest.raises(FormatError, match=r"no documents in 4 files; skipped: .*data00.json: "
                                                                     r"record 0 has no 'text' field \(its text fields: "
                                                                     r"story, summary, source\)"):
        list(Documents(tmp_path))
    with pytest.raises(FormatError, match="config.json: a .json dataset is a list of records"):
        list(Documents(tmp_path / "model" / "config.json"))


def test_progress_counts_the_bytes_on_disk_once_per_pass(tmp_path):
    path = _write(tmp_path / "d.jsonl.gz", gzip.compress("".join(json.dumps({"text": r["story"]}) + "\n"
                                                                  for r in stories(200)).encode()))
    docs, seen = Documents(path), []
    docs.progress = seen.append
    assert len(list(docs)) == 200 and sum(seen) == docs.total_bytes() == path.stat().st_size


def test_bad_input_is_named_with_its_file_and_place(tmp_path):
    def fails(content, match, name="bad.jsonl", **kw):
        with pytest.raises(FormatError, match=match):
            list(Documents(_write(tmp_path / name, content), **kw))

    fails(b'{"text": "ok"}\n{"text": "cut\n', r"bad.jsonl: line 2 is not a JSON record: Invalid control character \(column 14\)")
    fails(b'{"story": "x", "summary": "y", "n": 1}\n', r"line 1 has no 'text' field \(its text fields: story, "
                                                       r"summary\); name the field with --text_field")
    fails(b'{"text": 5}\n', r"line 1: field 'text' holds a JSON int, not text")
    fails(b'[1, 2]\n', r"line 1 is a JSON list, not text or an object")
    fails(b'{"text": "caf\xe9"}\n', r"line 1 is not UTF-8 text")
    fails(b'{"text": ""}\n\n', r"bad.jsonl: holds no documents \(no record has text in 'text'\)")
    fails(b'[{"text": "a"} {"text": "b"}]', r"bad.json: record 0 is not followed by ',' or '\]'", "bad.json")
    fails(b'[{"text": "a"}, {"text": ', r"bad.json: record 1 is not valid JSON", "bad.json")
    fails(b'"just a string"', r"a .json dataset is a list of records", "bad.json")
    # the line and byte of invalid UTF-8, as Python's decoder places it in the whole file
    raw = "fine\nalso fine\n".encode() + "\u00e9t\u00e9 ".encode() * 5 + b"caf\xe9\nmore"
    err = pytest.raises(UnicodeDecodeError, raw.decode).value
    fails(raw, rf"latin1.txt: line 3 is not UTF-8 text \(byte {err.start}: invalid continuation byte\)",
          "latin1.txt")
    fails(gzip.compress(json.dumps(stories()).encode())[:-30], r"cut.txt.gz: cannot decompress or read it", "cut.txt.gz")
    fails(b"not a tar file at all" * 40, r"bad.tar: not a readable tar archive", "bad.tar")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "README", b"no dataset here")
    fails(buf.getvalue(), r"empty.tar: the archive holds no files of a known kind", "empty.tar")
    fails(b"x" * 100 + b"<|endoftext|>short", r"long.txt: document 1 holds \d+ characters, more than 50 .*"
                                              r"--separator", "long.txt", max_document_chars=50)
    fails(b"PAR1 not really parquet PAR1", r"fake.parquet: not a readable Parquet file", "fake.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"], "n": [1]}), tmp_path / "cols.parquet")
    with pytest.raises(FormatError, match=r"cols.parquet: no column 'text' \(its text columns: content\)"):
        list(Documents(tmp_path / "cols.parquet"))
    with pytest.raises(FormatError, match=r"cols.parquet: column 'n' holds int64, not text"):
        list(Documents(tmp_path / "cols.parquet", text_field="n"))
    with pa.ipc.new_stream(str(tmp_path / "cols.arrow"), pa.schema([("content", pa.large_string())])) as writer:
        writer.write_batch(pa.record_batch([pa.array(["a"], pa.large_string())], names=["content"]))
    with pytest.raises(FormatError, match=r"cols.arrow: no column 'text' \(its text columns: content\)"):
        list(Documents(tmp_path / "cols.arrow"))
    assert list(Documents(tmp_path / "cols.arrow", text_field="content")) == ["a"]
    fails(b"ARROW1 but nothing else", r"fake.arrow: not a readable Arrow file", "fake.arrow")
    with pytest.raises(FormatError, match="nope.jsonl: input file does not exist"):
        Documents(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="text_field must name a field"):
        Documents(tmp_path / "cols.parquet", text_field="")


def _write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
