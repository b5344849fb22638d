import json
import os

import pytest
from hypothesis import given, settings, strategies as st

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.data import corpus
from fusegrad.data.tokenizer import BPETokenizer, ByteTokenizer, SentencePieceTokenizer, load_tokenizer

# ---- byte ----

@given(st.text())
def test_byte_encode_is_utf8_bytes_plus_specials(text):
    tok = ByteTokenizer()
    raw = list(text.encode("utf-8"))  # oracle: Python's UTF-8 codec
    assert tok.encode(text, bos=False) == raw
    assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + raw + [tok.eos_id]
    assert tok.decode(tok.encode(text, eos=True)) == text


def test_byte_ids_and_save_load(tmp_path):
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (258, 256, 257)
    tok.save(tmp_path)
    for path in (tmp_path, tmp_path / "byte_tokenizer.json", "byte"):
        loaded = load_tokenizer(path)
        assert isinstance(loaded, ByteTokenizer) and loaded.to_json() == tok.to_json()
    assert json.loads((tmp_path / "byte_tokenizer.json").read_text())["kind"] == "byte"


@pytest.mark.parametrize("bad", [258, -1, 10**6])
def test_decode_out_of_vocab_names_the_id(bad):
    with pytest.raises(ShapeError, match=f"token id {bad} "):
        ByteTokenizer().decode([104, bad])


# ---- BPE (Hugging Face tokenizers) ----

@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    tok = BPETokenizer.train(corpus.documents()[:20], vocab_size=400)
    d = tmp_path_factory.mktemp("bpe")
    tok.save(d)
    return tok, d


def test_bpe_train_vocab_and_specials(bpe):
    tok, _ = bpe
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (400, 1, 2)
    text = corpus.documents()[0]
    ids = tok.encode(text, bos=False)
    assert len(ids) < 0.6 * len(text.encode("utf-8"))  # merges were learned: well under one token per byte
    assert max(ids) < tok.vocab_size


def test_bpe_matches_hf_tokenizers_on_saved_file(bpe, sample_texts):
    from tokenizers import Tokenizer as HF

    tok, d = bpe
    hf = HF.from_file(str(d / "tokenizer.json"))  # oracle: the library reading our saved file
    loaded = load_tokenizer(d)
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == tok.vocab_size
    for text in sample_texts:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, bos=False) == ids == loaded.encode(text, bos=False)
        assert loaded.decode([1] + ids + [2]) == hf.decode(ids) == text


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_bpe_roundtrip_any_text(bpe, text):
    tok, _ = bpe
    assert tok.decode(tok.encode(text, eos=True)) == text


def test_bpe_corrupt_or_foreign_json(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(FormatError, match="tokenizer.json"):
        load_tokenizer(bad)
    from tokenizers import Tokenizer as HF, models

    HF(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(bad))
    with pytest.raises(FormatError, match="no BOS/EOS"):
        load_tokenizer(tmp_path)


def test_bpe_small_text_stops_short_of_target():
    tok = BPETokenizer.train(["abc abc"], vocab_size=1000)
    assert 259 < tok.vocab_size < 1000 and tok.decode(tok.encode("abc cab")) == "abc cab"


def test_bpe_vocab_too_small():
    with pytest.raises(ConfigError, match="vocab_size 100"):
        BPETokenizer.train(["abc"], vocab_size=100)


# ---- sentencepiece ----

def test_sentencepiece_matches_sentencepiece(sp_model_proto, sp_oracle, sample_texts, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model_proto)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (sp_oracle.vocab_size(), 1, 2)
    for text in sample_texts:
        ids = sp_oracle.encode(text)
        assert tok.encode(text, bos=True, eos=True) == [1] + ids + [2]
        assert tok.decode([1] + ids + [2]) == sp_oracle.decode(ids)
    out = tmp_path / "saved"
    tok.save(out)
    again = load_tokenizer(out)
    assert isinstance(again, SentencePieceTokenizer) and again.encode("x y z") == tok.encode("x y z")
    with pytest.raises(ShapeError, match=f"token id {tok.vocab_size} "):
        tok.decode([tok.vocab_size])


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10])
def test_sentencepiece_corrupt_model(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(FormatError, match=str(path)):
        load_tokenizer(path)


# ---- dispatch ----

def test_load_tokenizer_bad_paths(tmp_path):
    with pytest.raises(FormatError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FormatError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(FormatError, match="unknown tokenizer file type"):
        load_tokenizer(tmp_path / "vocab.txt")
    (tmp_path / "t.json").write_bytes(b"\xff\xfe")
    with pytest.raises(FormatError, match="t.json"):
        load_tokenizer(os.path.join(tmp_path, "t.json"))
