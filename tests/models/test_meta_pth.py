"""Meta's own checkpoints (params.json + consolidated.00.pth) and llama2.c's ckpt.pt, read without torch.

The oracle is Meta's model.py formulation written out in float64 torch here: RoPE as complex multiplication of
interleaved pairs (`view_as_complex`), Llama 3's `apply_scaling` per frequency. It shares no code with fusegrad's
q/k permutation; transformers then reads fusegrad's Hugging Face export of the same model."""
import json
import math
import os

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.models import Llama

torch = pytest.importorskip("torch")


def meta_hidden(args):
    """The FFN width Meta's model.py derives from params.json (multiple_of, ffn_dim_multiplier)."""
    hidden = int(2 * 4 * args["dim"] / 3)
    if args.get("ffn_dim_multiplier"):
        hidden = int(args["ffn_dim_multiplier"] * hidden)
    return args["multiple_of"] * ((hidden + args["multiple_of"] - 1) // args["multiple_of"])


def meta_weights(args, vocab=61, hidden=40, tied=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim, heads = args["dim"], args["n_heads"]
    kv, hd = args.get("n_kv_heads") or heads, dim // heads

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.3).to(torch.bfloat16)

    w = {"tok_embeddings.weight": r(vocab, dim), "norm.weight": 1 + r(dim)}
    if not tied:
        w["output.weight"] = r(vocab, dim)
    for i in range(args["n_layers"]):
        w.update({f"layers.{i}.attention.wq.weight": r(heads * hd, dim), f"layers.{i}.attention.wk.weight": r(kv * hd, dim),
                  f"layers.{i}.attention.wv.weight": r(kv * hd, dim), f"layers.{i}.attention.wo.weight": r(dim, heads * hd),
                  f"layers.{i}.feed_forward.w1.weight": r(hidden, dim), f"layers.{i}.feed_forward.w2.weight": r(dim, hidden),
                  f"layers.{i}.feed_forward.w3.weight": r(hidden, dim), f"layers.{i}.attention_norm.weight": 1 + r(dim),
                  f"layers.{i}.ffn_norm.weight": 1 + r(dim)})
    return w


def apply_scaling(freqs, factor, low=1.0, high=4.0, old=8192):
    """llama-models' apply_scaling, frequency by frequency."""
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out, dtype=torch.float64)


def meta_logits(w, args, tokens):
    w = {k: v.double() for k, v in w.items()}
    dim, heads = args["dim"], args["n_heads"]
    kv, hd, eps = args.get("n_kv_heads") or heads, dim // heads, args.get("norm_eps", 1e-5)
    freqs = 1.0 / args.get("rope_theta", 10000.0) ** (torch.arange(0, hd, 2).double() / hd)
    if args.get("use_scaled_rope"):
        freqs = apply_scaling(freqs, args["rope_scaling_factor"])
    B, T = tokens.shape
    cis = torch.polar(torch.ones(T, hd // 2, dtype=torch.float64), torch.outer(torch.arange(T).double(), freqs))

    def norm(x, g):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    def rope(x):  # (B, T, h, hd): pairs (0, 1), (2, 3), ... as complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    h = w["tok_embeddings.weight"][torch.as_tensor(tokens)]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(args["n_layers"]):
        p = lambda n: w[f"layers.{i}.{n}.weight"]  # noqa: E731
        x = norm(h, p("attention_norm"))
        q = rope((x @ p("attention.wq").T).view(B, T, heads, hd))
        k = rope((x @ p("attention.wk").T).view(B, T, kv, hd)).repeat_interleave(heads // kv, 2)
        v = (x @ p("attention.wv").T).view(B, T, kv, hd).repeat_interleave(heads // kv, 2)
        att = torch.softmax((q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3)) / math.sqrt(hd) + mask, -1)
        h = h + (att @ v.transpose(1, 2)).transpose(1, 2).reshape(B, T, dim) @ p("attention.wo").T
        x = norm(h, p("ffn_norm"))
        h = h + (torch.nn.functional.silu(x @ p("feed_forward.w1").T) * (x @ p("feed_forward.w3").T)) @ p("feed_forward.w2").T
    out = w.get("output.weight", w["tok_embeddings.weight"])
    return (norm(h, w["norm.weight"]) @ out.T).numpy()


LLAMA2 = {"dim": 32, "multiple_of": 8, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-05, "vocab_size": -1}
LLAMA32 = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 61, "ffn_dim_multiplier": 1.5,
           "multiple_of": 8, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
           "rope_scaling_factor": 32.0}


@pytest.mark.parametrize("args, tied", [(LLAMA2, False), (LLAMA32, True)], ids=["llama2", "llama3.2"])
def test_a_meta_download_gives_metas_logits_and_exports_as_transformers_reads_it(args, tied, tmp_path):
    transformers = pytest.importorskip("transformers")
    w = meta_weights(args, tied=tied)
    d = tmp_path / "original"
    d.mkdir()
    torch.save({**w, "rope.freqs": torch.ones(4)}, d / "consolidated.00.pth")  # Llama 2 also saved its freqs
    (d / "params.json").write_text(json.dumps(args))
    tokens = np.random.default_rng(0).integers(0, 61, (2, 24))
    want = meta_logits(w, args, tokens)
    model = Llama.from_pretrained(d)
    assert model.config.tie_embeddings == tied and model.config.hidden_dim == 40
    with fg.no_grad():
        np.testing.assert_allclose(model.logits(tokens).numpy(), want, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(hf(torch.as_tensor(tokens)).logits.numpy(), want, rtol=1e-4, atol=1e-4)


def test_llama2c_ckpt_pt_reads_model_args_and_skips_the_optimizer(tmp_path):
    args = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": None, "vocab_size": 61, "hidden_dim": None,
            "multiple_of": 8, "norm_eps": 1e-05, "max_seq_len": 32, "dropout": 0.0}
    w = {k: v.float() for k, v in meta_weights(args).items()}
    ckpt = {"model": {"_orig_mod." + k: v for k, v in w.items()}, "model_args": args, "iter_num": 2000,
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(61, 32)}},
                          "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.95), "params": [0]}]},
            "best_val_loss": torch.tensor(1.25), "config": {"batch_size": 128, "dataset": "tinystories"}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    model = Llama.from_pretrained(tmp_path / "ckpt.pt")
    assert model.config.max_seq_len == 32 and not model.config.tie_embeddings
    tokens = np.random.default_rng(1).integers(0, 61, (1, 32))
    with fg.no_grad():
        np.testing.assert_allclose(model.logits(tokens).numpy(), meta_logits(w, args, tokens), rtol=1e-4, atol=1e-4)


def test_what_a_meta_checkpoint_cannot_say_is_named(tmp_path):
    args = dict(LLAMA32)
    w = meta_weights(args, tied=True)
    torch.save(w, tmp_path / "consolidated.00.pth")
    del args["rope_scaling_factor"]
    (tmp_path / "params.json").write_text(json.dumps(args))
    with pytest.raises(fg.FormatError, match=r"params.json: use_scaled_rope without rope_scaling_factor: Llama 3.1 "
                                             r"scales by 8, Llama 3.2 by 32"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**args, "dim": "32"}))
    with pytest.raises(fg.FormatError, match=r"params.json: dim = '32', not a whole number"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(LLAMA32))
    torch.save({k: v for k, v in w.items() if "layers.1.attention.wk" not in k}, tmp_path / "consolidated.00.pth")
    with pytest.raises(fg.FormatError, match=r"consolidated.00.pth \(Meta names\): no tensor "
                                             r"'model.layers.1.self_attn.k_proj.weight'"):
        Llama.from_pretrained(tmp_path)
    torch.save(w, tmp_path / "consolidated.00.pth")
    torch.save({**w, "layers.0.extra.weight": torch.zeros(4, 4)}, tmp_path / "consolidated.01.pth")
    with pytest.raises(fg.FormatError, match=r"consolidated.00.pth: no tensor 'layers.0.extra.weight', which another "
                                             r"shard holds"):
        Llama.from_pretrained(tmp_path)
    torch.save({**w, "layers.1.attention.wk.weight": torch.zeros(8, 32)}, tmp_path / "consolidated.01.pth")
    with pytest.raises(fg.FormatError, match=r"consolidated.01.pth: tensor 'layers.1.attention.wk.weight' has shape "
                                             r"\(8, 32\), consolidated.00.pth's \(16, 32\): not slices of one model"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "consolidated.01.pth").unlink()
    torch.save(w, tmp_path / "bare.pt")
    (tmp_path / "params.json").unlink()
    with pytest.raises(fg.FormatError, match=r"bare.pt: no model_args inside and no params.json beside it"):
        Llama.from_pretrained(tmp_path / "bare.pt")


def test_a_llama3_download_with_its_tiktoken_tokenizer_model_chats_finetunes_and_exports(tmp_path, capsys):
    """Meta's Llama 3.2 layout with its own tokenizer.model (tiktoken's file; trained here): the tokenizer lies
    beside the weights for every command; a chat prompt has the ids of Meta's ChatFormat (written out with
    tiktoken); the Hugging Face export's tokenizer, as transformers reads it, gives the same ids, chat ids and eos
    ids; GGUF names its split llama.cpp's "llama-bpe" and carries the same tokenizer."""
    tiktoken = pytest.importorskip("tiktoken")
    transformers = pytest.importorskip("transformers")
    from tiktoken.load import load_tiktoken_bpe

    from fusegrad.cli.main import main
    from fusegrad.data.chat import chat_text
    from fusegrad.data.tiktoken_vocab import LLAMA3_PATTERN, LLAMA31_SPECIAL
    from fusegrad.data.tokenizer import load_tokenizer
    from fusegrad.models.generate import generate
    from fusegrad.models.gguf_file import read_metadata
    from tests.tokenizers_made import tiktoken_file

    d = tmp_path / "Llama3.2-1B"
    d.mkdir()
    tiktoken_file(d / "tokenizer.model")  # 1000 ranks, then Meta's 256 special tokens
    args = {**LLAMA32, "vocab_size": 1256}
    torch.save(meta_weights(args, vocab=1256, tied=True), d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(args))
    tok = load_tokenizer(d)
    assert (tok.kind, tok.bos_id, tok.add_bos, tok.eos_ids) == ("bpe", 1000, True, [1001, 1008, 1009])

    ranks = load_tiktoken_bpe(str(d / "tokenizer.model"))
    special = {s: len(ranks) + i for i, s in enumerate(LLAMA31_SPECIAL)}
    enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special)

    def header(role):  # Meta's ChatFormat._encode_header
        return [special["<|start_header_id|>"], *enc.encode(role), special["<|end_header_id|>"], *enc.encode("\n\n")]

    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "What is a list, 42?"}]
    metas = [special["<|begin_of_text|>"]] + [i for m in messages for i in header(m["role"]) +
                                              enc.encode(m["content"].strip()) + [special["<|eot_id|>"]]]
    prompt = tok.encode(chat_text(tok, messages, add_generation_prompt=True), bos=False)
    assert prompt == metas + header("assistant")

    chat = ["sample", "--checkpoint", str(d), "--prompt", "What is a list, 42?", "--chat", "--temperature", "0",
            "--max_new_tokens", "6"]
    assert main(chat) == 0
    one_turn = tok.encode(chat_text(tok, messages[1:], add_generation_prompt=True), bos=False)
    reply = generate(Llama.from_pretrained(d), one_turn, 6, temperature=0.0, stop_ids=tok.eos_ids)[len(one_turn):]
    assert capsys.readouterr().out == tok.decode(reply) + "\n"
    assert main(["info", str(d)]) == 0
    assert "'eos_ids': [1001, 1008, 1009]" in capsys.readouterr().out
    conversation = messages + [{"role": "assistant", "content": "A sequence."}]
    (tmp_path / "chat.jsonl").write_text((json.dumps({"messages": conversation}) + "\n") * 4)
    assert main(["finetune", "--model", str(d), "--data", str(tmp_path / "chat.jsonl"), "--out",
                 str(tmp_path / "ft"), "--max_steps", "1", "--batch_size", "1", "--quiet"]) == 0
    assert main(["export", str(d), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello, world! It's 2024-12-31.\n\tdef f(x): return x  # ünïcode 日本 🤖"
    assert theirs(text)["input_ids"] == tok.encode(text) and tok.encode(text)[0] == 1000
    assert theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                      return_dict=True)["input_ids"] == prompt
    config = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (config.bos_token_id, config.eos_token_id) == (1000, [1001, 1008, 1009])
    assert main(["export", str(d), "--out", str(tmp_path / "m.gguf")]) == 0
    assert read_metadata(tmp_path / "m.gguf")["tokenizer.ggml.pre"] == "llama-bpe"
    assert load_tokenizer(tmp_path / "m.gguf").encode(text) == tok.encode(text)


# fairscale's model-parallel split as Meta's model.py declares its layers: ColumnParallelLinear slices the rows
# (wq, wk, wv, w1, w3, output), RowParallelLinear the columns (wo, w2); Llama 2's ParallelEmbedding slices the width,
# Llama 3's VocabParallelEmbedding the vocabulary; norms and rope.freqs are whole in every shard
def split_for_model_parallelism(w, shards, llama3):
    rows = ("wq", "wk", "wv", "w1", "w3", "output")
    out = [{} for _ in range(shards)]
    for name, t in w.items():
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        axis = (0 if llama3 else 1) if module == "tok_embeddings" else 0 if module in rows else \
            1 if module in ("wo", "w2") else None
        for i in range(shards):
            out[i][name] = t.clone() if axis is None else t.chunk(shards, axis)[i].clone()
    return out


def transformers_conversion(tmp_path):
    """write_model of transformers' own convert_llama_weights_to_hf.py (4.46.3, the last release that ships it),
    which joins Meta's shards itself."""
    import importlib.util
    import zipfile

    from tests.real_checkpoint import cache_dir, wheel

    script = os.path.join(cache_dir(), "transformers-4.46.3-convert_llama_weights_to_hf.py")
    if not os.path.isfile(script):
        with zipfile.ZipFile(wheel("transformers==4.46.3", str(tmp_path / "wheel"))) as z:
            os.makedirs(cache_dir(), exist_ok=True)
            with open(script + ".part", "wb") as f:
                f.write(z.read("transformers/models/llama/convert_llama_weights_to_hf.py"))
            os.replace(script + ".part", script)
    spec = importlib.util.spec_from_file_location("convert_llama_weights_to_hf", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_model


@pytest.mark.parametrize("args, version", [(LLAMA2, "2"), (LLAMA32, "3.2")], ids=["llama2-13b-like", "llama3-70b-like"])
def test_a_meta_model_split_for_model_parallelism_is_joined_as_transformers_joins_it(args, version, tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    w = meta_weights(args, vocab=62, hidden=meta_hidden(args), tied=False)  # as Meta's shapes are
    d = tmp_path / "original"
    d.mkdir()
    for i, shard in enumerate(split_for_model_parallelism(w, 2, version != "2")):
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(json.dumps(args))
    tokens = np.random.default_rng(0).integers(0, 62, (2, 24))
    model = Llama.from_pretrained(d)
    with fg.no_grad():  # Meta's forward on the whole weights
        np.testing.assert_allclose(model.logits(tokens).numpy(), meta_logits(w, args, tokens), rtol=1e-4, atol=1e-4)
    write_model = transformers_conversion(tmp_path)
    write_model(str(tmp_path / "theirs"), str(d), llama_version=version, num_shards=2, vocab_size=62)
    theirs = {}
    for f in (tmp_path / "theirs").glob("*.safetensors"):
        theirs |= load_file(f)
    ours = model.state_dict()
    assert set(ours) == set(theirs) - {n for n in theirs if "rotary_emb" in n}
    for name, a in ours.items():  # bf16 weights both ways: the same values
        np.testing.assert_array_equal(a, theirs[name].float().numpy(), err_msg=name)
