"""`fusegrad perplexity`: the loss transformers computes on the same windows of the same tokens."""
import math
import re

import numpy as np
import pytest

from fusegrad.cli.main import main
from fusegrad.data.corpus import documents
from fusegrad.data.prepare import prepare
from fusegrad.data.shards import list_shards, read_shard


def printed(capsys) -> dict:
    out = capsys.readouterr().out
    m = re.match(r"perplexity ([\d.]+): ([\d.]+) nats per token, ([\d.]+) bits per byte over ([\d,]+) tokens "
                 r"\((\d+) windows of (\d+)\)", out)
    assert m, out
    return dict(zip(("perplexity", "loss", "bpb", "tokens", "windows", "seq_len"),
                    [float(m[1]), float(m[2]), float(m[3]), int(m[4].replace(",", "")), int(m[5]), int(m[6])]))


def test_perplexity_equals_transformers_loss_on_the_same_windows(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fusegrad.data.tokenizer import load_tokenizer
    from tests.data.test_chat import make_hf_model

    path = make_hf_model(tmp_path / "m")
    text = tmp_path / "docs.txt"
    text.write_text("\n<|endoftext|>\n".join(documents()[30:36]))
    prepared = tmp_path / "prepared"
    prepare(text, prepared, tokenizer=load_tokenizer(path), val_fraction=0.0)
    ids = np.concatenate([read_shard(p) for p in list_shards(prepared)]).astype(np.int64)
    T = 32
    windows = [ids[o:o + T + 1] for o in range(0, len(ids) - T, T)][:40]  # overlapping by one token
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        losses = [model(torch.tensor(w[None]), labels=torch.tensor(w[None])).loss.item() for w in windows]
    theirs = float(np.mean(losses))  # every window predicts T tokens: the mean of means is the token mean
    assert main(["perplexity", "--checkpoint", str(path), "--data", str(text), "--seq_len", str(T),
                 "--max_tokens", str(40 * T)]) == 0
    ours = printed(capsys)
    assert (ours["tokens"], ours["windows"], ours["seq_len"]) == (40 * T, 40, T)
    assert ours["loss"] == pytest.approx(theirs, abs=2e-4) and ours["perplexity"] == pytest.approx(math.exp(theirs),
                                                                                                   rel=3e-4)
    tok = load_tokenizer(path)
    n_bytes = sum(len(tok.decode(w[1:]).encode()) for w in windows)
    assert ours["bpb"] == pytest.approx(theirs * 40 * T / math.log(2) / n_bytes, rel=3e-4)

    prepare(text, tmp_path / "split", tokenizer=tok, val_fraction=0.5)  # a prepared directory: its val part
    assert main(["perplexity", "--checkpoint", str(path), "--data", str(tmp_path / "split"), "--seq_len", str(T)]) == 0
    assert printed(capsys)["tokens"] < len(ids) / 2
    prepare(text, tmp_path / "bytes", tokenizer="byte")  # made by another tokenizer: refused, naming both
    assert main(["perplexity", "--checkpoint", str(path), "--data", str(tmp_path / "bytes")]) == 2
    assert re.search(r"bytes: its tokens were made by another tokenizer \(byte\) than the model's \(.*tokenizer.json\)",
                     capsys.readouterr().err)


def test_training_lowers_the_perplexity_of_the_run_on_its_own_val_split(tmp_path, capsys):
    from fusegrad.train.trainer import TrainConfig, train

    out = tmp_path / "run"
    train(TrainConfig(out_dir=str(out), max_steps=60, eval_interval=0, quiet=True, progress=False, plot=False,
                      sample_tokens=0, workers=1))
    assert main(["perplexity", "--checkpoint", str(out), "--data", str(out / "data"), "--seq_len", "64"]) == 0
    trained = printed(capsys)
    assert trained["perplexity"] < 40 and trained["bpb"] == pytest.approx(trained["loss"] / math.log(2), rel=0.02)
