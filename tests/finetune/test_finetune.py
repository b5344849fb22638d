"""Fine-tuning runs end to end: data, masked loss, no-padding groups, exact resume, classification, CLI,
merge, and bad input."""
import argparse
import dataclasses
import json
import os

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.finetune import data as ftdata
from fusegrad.finetune.losses import masked_classifier_cross_entropy
from fusegrad.finetune.peft_io import load_adapter
from fusegrad.finetune.trainer import FinetuneConfig, Finetuner, finetune
from fusegrad.models import Llama
from fusegrad.models.llama import LlamaConfig

BASE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=258, max_seq_len=64)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    Llama(LlamaConfig(**BASE), seed=1).save_pretrained(d / "base")
    rng = np.random.default_rng(0)
    with open(d / "qa.jsonl", "w") as f:
        for _ in range(24):
            a, b = rng.integers(0, 5, 2)
            f.write(json.dumps({"prompt": f"{a}+{b}=" + "x" * int(rng.integers(0, 3)), "completion": str(a + b)}) + "\n")
    with open(d / "cls.csv", "w") as f:
        f.write("text,label\n")
        for i in range(30):
            word = ["cat", "dog", "emu"][i % 3]
            f.write(f"{word} {'!' * (i % 4)},{i % 3}\n")
    return d


def cfg(base, out, **kw):
    kw = {"model": str(base / "base"), "data": str(base / "qa.jsonl"), "tokenizer": "byte", "out": str(out),
          "batch_size": 6, "max_steps": 4, "rank": 2, "quiet": True, "eval_interval": 2, "ckpt_interval": 2, **kw}
    return FinetuneConfig(**kw)


def run_cli(argv):
    from fusegrad.cli.finetune import add_parser
    parser = argparse.ArgumentParser(prog="fusegrad")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_masked_loss_equals_cross_entropy_on_selected_rows(rng):
    h = fg.tensor(rng.normal(size=(7, 5)), dtype="float64", requires_grad=True)
    w = fg.tensor(rng.normal(size=(11, 5)), dtype="float64", requires_grad=True)
    t = rng.integers(0, 11, 7)
    mask = np.array([0, 1, 1, 0, 1, 0, 1], bool)
    loss = masked_classifier_cross_entropy(h, w, t, mask, denominator=8)
    loss.backward()
    import torch
    th, tw = torch.tensor(h.numpy(), requires_grad=True), torch.tensor(w.numpy(), requires_grad=True)
    sel = torch.tensor(np.flatnonzero(mask))
    ref = torch.nn.functional.cross_entropy(th[sel] @ tw.T, torch.tensor(t)[sel], reduction="sum") / 8
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(h.grad, th.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(w.grad, tw.grad.numpy(), rtol=1e-10)


def test_length_groups_have_no_padding_and_give_the_token_mean(base, tmp_path):
    ft = Finetuner(cfg(base, tmp_path))
    batch = ft.train_set[:6]
    groups = ftdata.group_by_length(batch)
    assert sum(len(g[0]) for g in groups) == 6 and len({g[0].shape[1] for g in groups}) == len(groups)
    denom = ft.denominator(batch, "lm")
    with fg.no_grad():
        grouped = sum(ft.group_loss(*g, denom)[0].item() for g in groups)
        one_by_one = [ft.group_loss(e.tokens[None], e.loss_mask[None], None, int(e.loss_mask.sum()))[0].item()
                      for e in batch]
    weights = [int(e.loss_mask.sum()) for e in batch]
    assert grouped == pytest.approx(np.average(one_by_one, weights=weights), rel=1e-5)


def test_prompt_is_masked_by_default():
    from fusegrad.data.tokenizer import ByteTokenizer
    recs = [{"prompt": "hi ", "completion": "yo"}, {"text": "ab"}]
    ex = ftdata.lm_examples(recs, ByteTokenizer(), max_len=32)
    assert ex[0].loss_mask.tolist() == [False] * 3 + [True] * 3 and ex[1].loss_mask.all()
    assert ftdata.lm_examples(recs, ByteTokenizer(), max_len=32, mask_prompt=False)[0].loss_mask.all()


@pytest.mark.parametrize("workers", [1, 2])
def test_lm_finetune_learns_and_resumes_exactly(base, tmp_path, workers):
    settings = dict(max_steps=4, dropout=0.1, lr=2e-2, eval_interval=4, batch_size=4, workers=workers)
    before = Finetuner(cfg(base, tmp_path / "fresh", **settings)).evaluate()["loss"]
    once = finetune(cfg(base, tmp_path / "once", **settings))
    assert once["val_loss"] < before
    interrupted = Finetuner(cfg(base, tmp_path / "twice", **settings))
    for _ in range(2):
        interrupted.train_step()
    interrupted.save()  # as the checkpoint interval would, then the process dies
    again = finetune(cfg(base, tmp_path / "twice", resume=True, **settings))
    assert again["loss"] == once["loss"] and again["val_loss"] == once["val_loss"]
    from safetensors.numpy import load_file
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("once", "twice"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("settings", [dict(grad_accum=2), dict(qlora=True, lora_targets="all"),
                                      dict(data="cls.csv", task="classify", num_classes=3, pooling="mean")])
def test_two_worker_processes_follow_one_process(base, tmp_path, settings):
    if "data" in settings:
        settings = dict(settings, data=str(base / settings["data"]))
    runs = {}
    for workers in (1, 2):
        run = Finetuner(cfg(base, tmp_path / str(workers), workers=workers, lr=2e-2, **settings))
        assert (run.workers is not None) == (workers == 2)
        run.run()
        runs[workers] = run
    one, two = runs[1], runs[2]
    assert two.workers is None  # stopped at the end of the run
    for key in ("loss", "val_loss") + (("val_accuracy",) if "task" in settings else ()):
        np.testing.assert_allclose(two.history[key], one.history[key], rtol=1e-5, err_msg=key)
    assert one.history["loss"][-1] < one.history["loss"][0]
    for name, a, b in zip(one.optimizer.names, two.optimizer.params, one.optimizer.params):  # the adapters
        np.testing.assert_allclose(a.data, b.data, rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_run_with_workers_leaves_no_process_or_shared_memory_behind(base, tmp_path):
    from multiprocessing import shared_memory

    def start(out):
        run = Finetuner(cfg(base, tmp_path / out, workers=2))
        return run, [b.name for b in run.workers.blocks], [proc for _, proc in run.workers.helpers]

    def gone(names, procs):
        assert all(proc.poll() is not None for proc in procs)
        for name in names:
            with pytest.raises(FileNotFoundError):
                shared_memory.SharedMemory(name=name)

    run, names, procs = start("ok")
    run.run()
    gone(names, procs)
    run, names, procs = start("nan")
    run.lora.parameters()[0].data[...] = np.nan
    with pytest.raises(fg.core.errors.FusegradError, match="step 1: loss is nan"):
        run.run()
    gone(names, procs)


def test_ctrl_c_with_worker_processes_saves_and_exits_cleanly(base, tmp_path):
    import signal
    import subprocess
    import sys

    from fusegrad.train.checkpoint import load_checkpoint

    args = ["finetune", "--model", str(base / "base"), "--data", str(base / "qa.jsonl"), "--tokenizer", "byte",
            "--out", str(tmp_path), "--max_steps", "100000", "--batch_size", "4", "--eval_interval", "0",
            "--ckpt_interval", "100000", "--progress", "false", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "fusegrad.cli.main"] + args, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.getcwd()))
    metrics = tmp_path / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # a few steps done
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and "Traceback" not in err and "Error" not in err, err
    assert "2 worker processes" in err
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert load_checkpoint(tmp_path / "finetune_state.safetensors")["step"] == last >= 3


def test_qlora_finetune_reports_memory(base, tmp_path):
    result = finetune(cfg(base, tmp_path, qlora=True, lora_targets="q,k,v,o,gate,up,down", max_steps=2))
    assert result["memory"]["ratio"] <= 0.16
    assert np.isfinite(result["loss"])


def test_classify_trains_reports_accuracy_and_peft_loads_the_head(base, tmp_path):
    out = tmp_path / "cls"
    res = finetune(cfg(base, out, data=str(base / "cls.csv"), task="classify", num_classes=3, max_steps=12,
                       lr=3e-2, lora_targets="all", val_fraction=0.3, eval_interval=12))
    assert 0.0 <= res["val_accuracy"] <= 1.0 and res["val_accuracy"] > 0.34  # 3 balanced classes: chance 1/3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13)) and metrics[-1]["loss"] == res["loss"]
    assert metrics[-1]["val_loss"] == res["val_loss"] and metrics[-1]["val_accuracy"] == res["val_accuracy"]
    cfgj = json.load(open(out / "adapter_config.json"))
    assert cfgj["task_type"] == "SEQ_CLS" and "score" in cfgj["modules_to_save"]
    model = Llama.from_pretrained(base / "base")
    lora = load_adapter(out, model)
    assert lora.head.shape == (3, BASE["dim"])
    tokens = np.array([[256] + list(b"dog !!")])
    ours = fg.matmul_nt(model.hidden(tokens)[:, -1, :], fg.tensor(lora.head)).numpy()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    hf = transformers.LlamaForSequenceClassification.from_pretrained(base / "base", num_labels=3,
                                                                       dtype=torch.float32)
    pm = PeftModel.from_pretrained(hf, out).eval()
    with torch.no_grad():
        ref = pm(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["hf", "llama2c"])
def test_cli_finetune_then_merge(base, tmp_path, fmt):
    out = tmp_path / "run"
    assert run_cli(["finetune", "--model", str(base / "base"), "--data", str(base / "qa.jsonl"), "--tokenizer",
                    "byte", "--out", str(out), "--max_steps", "3", "--lora-targets", "q,v,down", "--rank", "2",
                    "--lr", "0.05", "--quiet"]) == 0
    model = Llama.from_pretrained(base / "base")
    load_adapter(out, model)
    tokens = np.array([[256, 50, 43, 51, 61]])
    want = model.logits(tokens).numpy()
    dest = tmp_path / ("merged" if fmt == "hf" else "merged.bin")
    assert run_cli(["merge", "--model", str(base / "base"), "--adapter", str(out), "--out", str(dest)]) == 0
    np.testing.assert_allclose(Llama.from_pretrained(dest).logits(tokens).numpy(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(FormatError, match="already exists"):
        run_cli(["merge", "--model", str(base / "base"), "--adapter", str(out), "--out", str(dest)])


def test_cli_help_lists_the_lora_options(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["finetune", "--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and "--lora_targets" in text and "--qlora" in text and "--num_classes" in text


def test_bad_input_gives_clear_errors(base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl: line 3 is not a JSON record: Expecting value \(column 10\)"):
        Finetuner(cfg(base, tmp_path / "a", data=str(bad)))
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 5}\n')
    with pytest.raises(FormatError, match=r"labels.jsonl: line 2: label 5 is outside \[0, num_classes=3\)"):
        Finetuner(cfg(base, tmp_path / "b", data=str(labels), task="classify", num_classes=3))
    with pytest.raises(ConfigError, match="unknown target module 'attn'"):
        Finetuner(cfg(base, tmp_path / "c", lora_targets="q,attn"))
    with pytest.raises(ConfigError, match="rank 40 is larger"):
        Finetuner(cfg(base, tmp_path / "d", rank=40))
    finetune(cfg(base, tmp_path / "e", max_steps=1))
    stamp = os.path.getmtime(tmp_path / "e" / "adapter_model.safetensors")
    with pytest.raises(FormatError, match="--force"):
        Finetuner(cfg(base, tmp_path / "e"))
    assert os.path.getmtime(tmp_path / "e" / "adapter_model.safetensors") == stamp
    other = Llama(LlamaConfig(**{**BASE, "dim": 48, "hidden_dim": 64}), seed=0)
    with pytest.raises(FormatError, match="different base"):
        load_adapter(tmp_path / "e", other)


@pytest.mark.parametrize("kw, match", [(dict(task="regress"), "task must be 'lm' or 'classify'"),
                                       (dict(task="classify"), "needs --num_classes >= 2, got 0"),
                                       (dict(task="classify", num_classes=2, pooling="max"), "pooling must be"),
                                       (dict(batch_size=0), "batch_size"), (dict(max_len=0), "max_len")])
def test_bad_settings_are_config_errors(base, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        Finetuner(cfg(base, tmp_path, **kw))


def test_cli_reads_yaml_and_options_override_it(base, tmp_path, capsys):
    yaml_path = tmp_path / "ft.yaml"
    yaml_path.write_text(f"model: {base / 'base'}\ndata: {base / 'qa.jsonl'}\ntokenizer: byte\nout: {tmp_path / 'o'}\n"
                         f"max_steps: 1\nbatch_size: 3\nrank: 3\nquiet: true\n")
    assert run_cli(["finetune", "--config", str(yaml_path), "--rank", "2"]) == 0
    assert json.load(open(tmp_path / "o" / "adapter_config.json"))["r"] == 2
    assert "accuracy" not in capsys.readouterr().out  # an lm run reports no accuracy


def test_chat_jsonl_is_rendered_by_the_models_template_with_loss_on_assistant_turns_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.data.test_chat import CONVERSATION, make_hf_model

    model = make_hf_model(tmp_path / "hf")
    data = tmp_path / "chat.jsonl"
    hi = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    chats = [CONVERSATION, CONVERSATION[1:3], hi]
    data.write_text("\n".join(json.dumps({"messages": m}) for m in chats * 2) + "\n" + json.dumps({"text": "plain"}))
    ft = Finetuner(FinetuneConfig(model=str(model), data=str(data), out=str(tmp_path / "out"), max_len=256,
                                  val_fraction=0.0, quiet=True, max_steps=2, batch_size=3))
    theirs = transformers.AutoTokenizer.from_pretrained(model)
    rendered = {tuple(theirs.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]): m for m in chats}
    examples = ftdata.lm_examples(ftdata.read_records(data), ft.tokenizer, 256)
    for e in examples[:-1]:
        messages = rendered[tuple(e.tokens.tolist())]  # the ids transformers renders
        trained = theirs.decode(e.tokens[1:][e.loss_mask])
        assert trained == "".join(f"{m['content']}<|im_end|>\n" for m in messages if m["role"] == "assistant")
    assert examples[-1].tokens.tolist() == theirs.encode("plain") + [theirs.eos_token_id]  # no BOS: none is added
    assert np.isfinite(ft.run()["loss"])
    assert run_cli(["finetune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "q"), "--qlora",
                    "--max_steps", "2", "--batch_size", "3", "--lora_targets", "q,k,v,o", "--quiet"]) == 0


def test_byte_tokenizer_on_a_model_with_its_own_is_refused_unless_forced(base, tmp_path):
    from fusegrad.data.tokenizer import BPETokenizer

    model = tmp_path / "m"
    Llama(LlamaConfig(**BASE), seed=1).save_pretrained(model)
    BPETokenizer.train(["the cat sat on the mat. " * 20], vocab_size=260).save(model)
    with pytest.raises(FormatError, match=r"byte tokenizer on the model .*m, whose 258-id vocabulary is that of its "
                                          r"tokenizer .*m/tokenizer.json: byte ids"):
        Finetuner(cfg(base, tmp_path / "a", model=str(model)))
    assert Finetuner(cfg(base, tmp_path / "b", model=str(model), force_tokenizer=True)).tokenizer.kind == "byte"


@pytest.mark.parametrize("name, content, match", [
    ("d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"d.jsonl: line 2 is not UTF-8 text \(invalid continuation byte\)"),
    ("d.csv", b"text,label\nok,0\ncaf\xe9,1\n", r"d.csv: line 3 is not UTF-8 text \(byte 0xe9 at column 4\)"),
    ("n.jsonl", b'{"text": "a", "label": NaN}\n', r"n.jsonl: line 1 is not a JSON record: NaN is not a finite number"),
    ("r.csv", b"text,label\na,0\nb,1,extra\n", r"r.csv: line 3: the row's field count differs from the header's"),
])
def test_non_utf8_non_finite_and_ragged_data_name_the_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FormatError, match=match):
        ftdata.read_records(tmp_path / name)


@pytest.mark.parametrize("label", ["true", "1.0", "1.5", '"1"', "null"])
def test_labels_are_integers_never_cast(tmp_path, label):
    path = tmp_path / "l.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": %s}\n' % label)
    with pytest.raises(FormatError, match=r"l.jsonl: line 2: field 'label' must be an integer class id"):
        ftdata.classify_examples(ftdata.read_records(path), fg.data.tokenizer.ByteTokenizer(), 2, 16)
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("text,label\na,1\nb,1.0\n")
    with pytest.raises(FormatError, match=r"l.csv: line 3: field 'label' must be an integer class id, got '1.0'"):
        ftdata.classify_examples(ftdata.read_records(csv_path), fg.data.tokenizer.ByteTokenizer(), 2, 16)


@pytest.mark.parametrize("what, match", [("dropout_rng", r"finetune_state.safetensors: dropout_rng: bit_generator"),
                                         ("step", r"finetune_state.safetensors: checkpoint field 'step' is missing"),
                                         ("sampler", r"finetune_state.safetensors: checkpoint field 'sampler/epoch'"),
                                         ("history", r"finetune_state.safetensors: checkpoint field 'history'"),
                                         ("int32-head", r"finetune_state.safetensors: tensor head/score is int32")])
def test_finetune_resume_refuses_a_missing_or_mistyped_field(base, tmp_path, what, match):
    from fusegrad.train.checkpoint import load_checkpoint, save_checkpoint

    settings = dict(data=str(base / "cls.csv"), task="classify", num_classes=3, max_steps=2)
    run = Finetuner(cfg(base, tmp_path, **settings))
    run.train_step()
    run.save()
    state = load_checkpoint(run.state_path)
    if what == "int32-head":
        state["head"]["score"] = state["head"]["score"].astype(np.int32)
    elif what == "history":
        state["history"] = "none"
    else:
        del state[what]
    save_checkpoint(run.state_path, state)
    with pytest.raises(FormatError, match=match):
        Finetuner(cfg(base, tmp_path, resume=True, **settings))


def test_finetune_min_lr_follows_lr(base, tmp_path):
    c = cfg(base, tmp_path, lr=1e-5)
    assert c.min_lr is None and c.lr_floor == pytest.approx(1e-6)


def test_two_mpi_ranks_follow_the_single_process_loss_curve(base, tmp_path):
    import shutil
    import subprocess
    import sys

    from fusegrad.train.checkpoint import load_checkpoint

    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        pytest.skip("no mpirun on PATH (pip install mpich)")
    settings = dict(data=str(base / "cls.csv"), task="classify", num_classes=3, max_steps=4, batch_size=4, lr=3e-2,
                    eval_interval=0, ckpt_interval=0)
    finetune(cfg(base, tmp_path / "one", **settings))
    want = load_checkpoint(tmp_path / "one" / "finetune_state.safetensors")["history"]["loss"]
    c = dataclasses.asdict(cfg(base, tmp_path / "two", **settings))
    args = [x for k in (*settings, "model", "tokenizer", "out", "rank") for x in (f"--{k}", str(c[k]))]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", FUSEGRAD_JIT="0")
    run = subprocess.run([mpirun, "-n", "2", sys.executable, "-m", "fusegrad.cli.main", "finetune", "--quiet", *args],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = load_checkpoint(tmp_path / "two" / "finetune_state.safetensors")["history"]["loss"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    odd = subprocess.run([mpirun, "-n", "2", sys.executable, "-m", "fusegrad.cli.main", "finetune", "--quiet", *args,
                          "--batch_size", "3", "--out", str(tmp_path / "odd")],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert odd.returncode != 0 and "batch_size 3 does not split evenly over 2 ranks" in odd.stderr  # the ranks split
