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
