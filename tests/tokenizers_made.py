"""Tokenizers the tests train with `tokenizers`, one of each kind llama.cpp and GGUF name: byte-level BPE with
each pre-tokenizer (GPT-2, SmolLM, Llama 3, Qwen2) and Llama 2's sentencepiece-style BPE with byte fallback; and
a sentencepiece model with the llama2.c tokenizer.bin made from it."""
import os

from fusegrad.data.tokenizer import load_tokenizer
from fusegrad.models import Llama
from fusegrad.models.export import export_model

TEXT = "Once upon a time,\n  a cat said: «wörld» ~ 42!"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def trained_bpe(directory, steps) -> str:
    """A byte-level BPE trained by `tokenizers` on English, code and numbers with the pre-tokenizer `steps`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True) if kind == "digits" else
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=arg) if kind == "bytes" else
        pre_tokenizers.Split(Regex(arg), behavior="isolated") for kind, arg in steps])
    hf.decoder = decoders.ByteLevel()
    corpus = [TEXT, "I'll say it's 1234 o'clock, they're   here.\n\n\tdef f(x): return x**2 # 3.14159"] * 50
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(directory / "tokenizer.json"))
    return directory


def sentencepiece_style_bpe(directory, prepend: bool) -> str:
    """Llama 2's / Mistral's kind of tokenizer.json, trained by `tokenizers`: BPE over "▁"-for-space pieces with
    byte fallback to <0xXX> pieces; "▁" put before the text by a Prepend normalizer, or by a Metaspace
    pre-tokenizer (prepend_scheme "first", as newer files say it; "never" when not `prepend`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    if prepend:
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    corpus = [TEXT, "I'll say it's 1234 o'clock, they're   here.\n\n\tdef f(x): return x**2 the theta"] * 50
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    hf.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"] + bytes_))
    hf.save(str(directory / "tokenizer.json"))
    return directory


def sentencepiece_and_llama2c(directory, model_proto) -> tuple:
    """The sentencepiece tokenizer of `model_proto` (Llama 2's kind: BPE, byte fallback) and the llama2.c
    tokenizer.bin that fusegrad's llama2.c export makes from it, each loaded from its own folder in `directory`."""
    (directory / "sp").mkdir()
    (directory / "sp" / "tokenizer.model").write_bytes(model_proto)
    sp = load_tokenizer(directory / "sp")
    export_model(Llama.from_preset("tiny", vocab_size=sp.vocab_size), directory / "sp.bin", "llama2c", sp)
    (directory / "l2c").mkdir()
    os.replace(directory / "tokenizer.bin", directory / "l2c" / "tokenizer.bin")
    return sp, load_tokenizer(directory / "l2c")


def tiktoken_file(path, vocab_size=1000) -> bytes:
    """A tiktoken BPE file (Llama 3's tokenizer.model format) written to `path` and returned: a byte-level BPE that
    `tokenizers` trains on CPython's docs (fusegrad's embedded corpus) plus code, numbers and other scripts with
    Llama 3's split; a token's rank is its id, which the trainer gives in merge order after the 256 bytes."""
    import base64

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from fusegrad.data import corpus_documents

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    extra = [TEXT, "Привет, мир! Это тест. 日本語のテキストです。 🤖🎉 12345 + 678 = 13023"] * 20
    hf.train_from_iterator(corpus_documents() + extra, trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # GPT-2's byte symbols, back to their bytes:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_of = {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(b for b in range(256)
                                                                                   if b not in keep)}}
    assert set(byte_of) == set(alphabet)
    vocab = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
    data = b"".join(base64.b64encode(bytes(byte_of[c] for c in s)) + b" %d\n" % i for s, i in vocab)
    path.write_bytes(data)
    return data
