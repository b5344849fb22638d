import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusegrad.core.errors import FormatError
from fusegrad.data.tokenizer import Llama2cTokenizer, read_tokenizer_bin, write_tokenizer_bin
from fusegrad.data.tokenizer import SentencePieceTokenizer, load_tokenizer


def test_layout_by_hand(tmp_path):
    path = tmp_path / "tokenizer.bin"
    pieces, scores = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"ab"], [0.0, 0.0, 0.0, -1.5]
    write_tokenizer_bin(path, pieces, scores)
    # Oracle: the FORMATS.md layout assembled with numpy, not struct.
    want = np.array([6], "<u4").tobytes()
    for p, s in zip(pieces, scores):
        want += np.array([s], "<f4").tobytes() + np.array([len(p)], "<i4").tobytes() + p
    assert path.read_bytes() == want
    assert read_tokenizer_bin(path) == (pieces, scores)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.floats(-1e6, 1e6, width=32)), min_size=3, max_size=40))
def test_roundtrip(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.bin"
    pieces, scores = [p for p, _ in records], [s for _, s in records]
    write_tokenizer_bin(path, pieces, scores)
    assert read_tokenizer_bin(path) == (pieces, scores)


def test_matches_sentencepiece(sp_model_proto, sp_oracle, sample_texts, tmp_path):
    """The llama2.c export of a sentencepiece model encodes and decodes like sentencepiece itself."""
    tok = Llama2cTokenizer.from_sentencepiece(SentencePieceTokenizer(sp_model_proto))
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path / "tokenizer.bin")
    assert isinstance(loaded, Llama2cTokenizer)
    assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id) == (sp_oracle.vocab_size(), 1, 2)
    assert loaded.to_json()["kind"] == "llama2c"
    for text in sample_texts:
        ids = sp_oracle.encode(text)
        assert loaded.encode(text, bos=False) == ids
        assert loaded.decode([1] + ids + [2]) == sp_oracle.decode(ids)


def rescan_encode(tok, text):
    """run.c's merge loop as it is written there: rescan the whole sequence for the best-scoring adjacent pair
    (the first of equal scores) and merge it, until no pair is a piece. The oracle of the heap in tokenizer.py."""
    if not text:
        return []
    ids = [tok.ids[b" "]] if b" " in tok.ids else []
    for ch in text:
        b = ch.encode("utf-8")
        ids.extend([tok.ids[b]] if b in tok.ids else [x + 3 for x in b])
    while True:
        best, best_i = -1e10, -1
        for i in range(len(ids) - 1):
            merged = tok.ids.get(tok.pieces[ids[i]] + tok.pieces[ids[i + 1]])
            if merged is not None and tok.scores[merged] > best:
                best, best_i = tok.scores[merged], i
        if best_i < 0:
            return ids
        ids[best_i:best_i + 2] = [tok.ids[tok.pieces[ids[best_i]] + tok.pieces[ids[best_i + 1]]]]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="ab ab\nthe cat\u00e9\u6f22\U0001f600", max_size=80), st.booleans())
def test_merges_equal_run_cs_rescanning_loop_ties_included(sp_model_proto, text, ties):
    """The heap merges what run.c's loop merges, in the same order, with real scores and with every score equal
    (then only the leftmost-first rule decides)."""
    tok = Llama2cTokenizer.from_sentencepiece(SentencePieceTokenizer(sp_model_proto))
    if ties:
        tok = Llama2cTokenizer(tok.pieces, [0.0] * tok.vocab_size)
    assert tok.encode(text, bos=False) == rescan_encode(tok, text)


@pytest.mark.parametrize("data, what", [
    (b"\x01\x00", "too short"),
    (struct.pack("<I", 4) + struct.pack("<fi", 0.0, 9) + b"abc", "byte length 9"),
    (struct.pack("<I", 4) + struct.pack("<fi", 0.0, -2), "byte length -2"),
    (struct.pack("<I", 4) + struct.pack("<fi", 0.0, 1) + b"a" + b"\x00\x00", "truncated"),
    (struct.pack("<I", 4) + struct.pack("<fi", 0.0, 1) + b"a", "needs at least"),
])
def test_corrupt(tmp_path, data, what):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(data)
    with pytest.raises(FormatError, match=what) as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)
