import json
import sys
import types

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.backends import get_backend
from fusegrad.train.trainer import Trainer, TrainConfig, TrainingError, load_model, train


def tiny(tmp_path, **kw):
    base = dict(preset="tiny", batch_size=2, seq_len=16, max_steps=8, warmup_steps=2, eval_interval=4,
                eval_batches=2, ckpt_interval=4, out_dir=str(tmp_path / "run"), progress=False, plot=False,
                sample_tokens=0, quiet=True, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_gives_a_bitwise_identical_loss_trajectory(tmp_path):
    full = Trainer(tiny(tmp_path / "a")).run()
    full_losses = Trainer(tiny(tmp_path / "a", resume=True)).history["loss"]

    first = Trainer(tiny(tmp_path / "b", max_steps=8, ckpt_interval=3))
    for _ in range(5):  # stop "mid-run": the last checkpoint is at step 3
        first.train_step()
        if first.step % 3 == 0:
            first.save()
    resumed = Trainer(tiny(tmp_path / "b", resume=True))
    assert resumed.step == 3
    resumed.run()
    assert resumed.history["loss"] == full_losses  # exact equality, not approximate
    assert full["step"] == resumed.step == 8


def test_training_lowers_the_validation_loss(tmp_path):
    trainer = Trainer(tiny(tmp_path, max_steps=40, eval_interval=20, lr=3e-3))
    result = trainer.run()
    val = trainer.history["val_loss"]
    assert val[-1] < val[0] - 0.3, val
    assert result["val_loss"] == val[-1]


def test_gradient_accumulation_averages(tmp_path):
    """Two micro-batches of 2 give the grads of one batch of 4 (same windows)."""
    trainer = Trainer(tiny(tmp_path))
    rng_batches = np.random.default_rng(0).integers(0, trainer.model.config.vocab_size, (4, 17))
    trainer.model.loss(rng_batches).backward()
    whole = {n: t.grad.copy() for n, t in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    for half in (rng_batches[:2], rng_batches[2:]):
        (trainer.model.loss(half) * 0.5).backward()
    for n, t in trainer.model.named_parameters():
        np.testing.assert_allclose(t.grad, whole[n], rtol=1e-4, atol=1e-6, err_msg=n)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    trainer.run()
    before = (tmp_path / "run" / "checkpoint.safetensors").read_bytes()
    trainer.cfg.max_steps = 12
    trainer.model.params["norm"].data[:] = np.nan
    with pytest.raises(TrainingError, match="step 9: loss is nan"):
        trainer.run()
    assert (tmp_path / "run" / "checkpoint.safetensors").read_bytes() == before


def test_resume_with_another_model_is_refused(tmp_path):
    Trainer(tiny(tmp_path)).run()
    with pytest.raises(TrainingError, match="differs from this run"):
        Trainer(tiny(tmp_path, resume=True, dim=64))


def test_checkpoint_loads_for_sampling(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    trainer.run()
    model, tokenizer = load_model(tmp_path / "run")
    assert tokenizer.kind == "byte"
    for name, t in trainer.model.params.items():
        np.testing.assert_array_equal(model.params[name].data, t.data)
    text = trainer.sample("The", 10)
    assert isinstance(text, str) and text.startswith("The")


def test_bad_settings_name_the_setting(tmp_path):
    with pytest.raises(fg.ConfigError, match="unknown preset 'huge'"):
        Trainer(tiny(tmp_path, preset="huge"))
    with pytest.raises(fg.FormatError, match="no such data"):
        Trainer(tiny(tmp_path, data=str(tmp_path / "missing")))
    with pytest.raises(fg.ConfigError, match="batch_size"):
        Trainer(tiny(tmp_path, batch_size=0))


def test_every_step_and_evaluation_goes_to_metrics_jsonl_and_tensorboard(tmp_path, monkeypatch):
    scalars = []

    class Writer:  # tensorboard.summary.Writer's interface, recording what it is given
        def __init__(self, directory):
            self.directory = directory

        def add_scalar(self, tag, data, step):
            scalars.append((self.directory, tag, data, step))

        def close(self):
            scalars.append("closed")
    summary = types.ModuleType("tensorboard.summary")
    summary.Writer = Writer
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setitem(sys.modules, "tensorboard.summary", summary)
    trainer = Trainer(tiny(tmp_path))
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == trainer.history["step"] == list(range(1, 9))
    assert [r["loss"] for r in lines] == trainer.history["loss"]
    assert [r["lr"] for r in lines] == trainer.history["lr"]
    assert all(r["tokens_per_s"] > 0 for r in lines)
    assert [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r] == list(
        zip(trainer.history["val_step"], trainer.history["val_loss"]))
    run_dir = str(tmp_path / "run")
    assert (run_dir, "loss", lines[0]["loss"], 1) in scalars and (run_dir, "val_loss", lines[-1]["val_loss"], 8) in scalars
    assert scalars[-1] == "closed"
    # a resumed run appends its steps
    trainer.cfg.max_steps = 10
    trainer.run()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 11))


def assert_nothing_left_behind():
    """The process after a run: no tracer, numpy the default backend, a float32 GEMM on numpy (exact)."""
    assert not fg.TRACER.enabled
    assert get_backend().name == "numpy" and fg.tensor([1.0]).backend.name == "numpy"
    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)  # large enough to offload
    np.testing.assert_array_equal((fg.tensor(a) @ fg.tensor(a)).numpy(), a @ a)


def test_a_run_leaves_no_backend_offload_tracer_behind(tmp_path):
    pytest.importorskip("torch")
    result = train(tiny(tmp_path, max_steps=2, offload_gemm="ane-sim", trace=str(tmp_path / "trace.json")))
    assert result["step"] == 2 and json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert_nothing_left_behind()
    trainer = Trainer(tiny(tmp_path / "torch", max_steps=2, backend="torch", device="cpu"))
    assert type(trainer.model.params["norm"].data).__module__ == "torch"
    trainer.run()
    assert_nothing_left_behind()


def test_a_run_that_raised_leaves_nothing_behind(tmp_path):
    trainer = Trainer(tiny(tmp_path, offload_gemm="ane-sim", trace=str(tmp_path / "trace.json")))
    trainer.model.params["norm"].data[:] = np.nan
    with pytest.raises(TrainingError, match="step 1: loss is nan"):
        trainer.run()
    assert_nothing_left_behind()


# -- init_from: continued pretraining / full fine-tuning of a pretrained model ------------------------------
def first_batch(trainer):
    """The batch of the first step: the data sampler's first draw from the run's seed."""
    return trainer.train_data.sample_batch(np.random.default_rng(trainer.cfg.seed), trainer.cfg.batch_size)


def test_init_from_a_hf_dir_uses_its_weights_and_tokenizer(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fusegrad.data import corpus
    from fusegrad.data.shards import read_shard
    from tests.data.test_chat import make_hf_model

    model_dir = make_hf_model(tmp_path / "hf")
    docs = corpus.documents()[:2]
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    trainer = Trainer(tiny(tmp_path, preset="default", init_from=str(model_dir), data=str(tmp_path), max_steps=1,
                           workers=1, eval_interval=0))
    theirs = transformers.AutoTokenizer.from_pretrained(model_dir)
    shard = read_shard(tmp_path / "run" / "data" / "data00.bin").tolist()  # no BOS added: EOS ends each document
    assert shard == [t for doc in docs for t in theirs.encode(doc) + [theirs.eos_token_id]]
    batch = first_batch(trainer)
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        logits = hf(torch.tensor(batch[:, :-1])).logits
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.tensor(batch[:, 1:]).flatten()).item()
    trainer.run()
    assert trainer.history["loss"][0] == pytest.approx(want, rel=1e-5)  # the pretrained weights were used
    from fusegrad.data.tokenizer import load_tokenizer
    assert load_tokenizer(tmp_path / "run").eos_ids == load_tokenizer(model_dir).eos_ids == [2, 0]  # both stop a sample


def test_init_from_a_llama2c_bin_and_from_a_run_dir(tmp_path):
    from fusegrad.data import corpus
    from fusegrad.data.tokenizer import BPETokenizer
    from fusegrad.models import Llama

    tok = BPETokenizer.train(corpus.documents()[:20], 400)
    (tmp_path / "m").mkdir()
    tok.save(tmp_path / "m")  # tokenizer.json beside the .bin
    Llama.from_preset("tiny", vocab_size=tok.vocab_size, seed=7).save_llama2c(tmp_path / "m" / "model.bin")
    text = tmp_path / "a.txt"
    text.write_text(corpus.documents()[30])
    trainer = Trainer(tiny(tmp_path, preset="default", init_from=str(tmp_path / "m" / "model.bin"), data=str(text),
                           max_steps=2, workers=1))
    assert trainer.tokenizer.vocab_size == tok.vocab_size and trainer.model.config.dim == 32
    want = Llama.from_pretrained(tmp_path / "m" / "model.bin").loss(first_batch(trainer)).item()
    trainer.run()
    assert trainer.history["loss"][0] == pytest.approx(want, rel=1e-5)
    again = Trainer(tiny(tmp_path / "2", preset="default", init_from=str(tmp_path / "run"), data=str(text),
                         max_steps=1, workers=1))  # a run dir: its last weights and its tokenizer
    want = trainer.model.loss(first_batch(again)).item()
    again.run()
    assert again.history["loss"][0] == pytest.approx(want, rel=1e-5)


def test_init_from_a_gguf_file_uses_its_weights_and_the_tokenizer_inside(tmp_path):
    from fusegrad.data import corpus
    from fusegrad.data.tokenizer import BPETokenizer
    from fusegrad.models import Llama
    from fusegrad.models.export import export_model

    tok = BPETokenizer.train(corpus.documents()[:20], 400)
    export_model(Llama.from_preset("tiny", vocab_size=tok.vocab_size, seed=7), tmp_path / "m.gguf", "gguf", tok, "f32")
    text = tmp_path / "a.txt"
    text.write_text(corpus.documents()[30])
    trainer = Trainer(tiny(tmp_path, preset="default", init_from=str(tmp_path / "m.gguf"), data=str(text),
                           max_steps=2, workers=1))  # nothing beside the file: the tokenizer is inside
    assert trainer.tokenizer.vocab_size == tok.vocab_size and trainer.model.config.dim == 32
    assert trainer.tokenizer.encode(corpus.documents()[30][:200]) == tok.encode(corpus.documents()[30][:200])
    want = Llama.from_pretrained(tmp_path / "m.gguf").loss(first_batch(trainer)).item()
    trainer.run()
    assert trainer.history["loss"][0] == pytest.approx(want, rel=1e-5)


def test_init_from_refuses_what_cannot_be_right(tmp_path):
    from fusegrad.models import Llama

    Llama.from_preset("tiny", vocab_size=600, seed=1).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "byte_tokenizer.json").write_text('{"kind": "byte"}')
    with pytest.raises(fg.ConfigError, match="brings its own model and tokenizer; drop dim, preset"):
        Trainer(tiny(tmp_path, init_from=str(tmp_path / "m"), dim=64))
    with pytest.raises(fg.ConfigError, match="seq_len 4096 exceeds the context"):
        Trainer(tiny(tmp_path, preset="default", init_from=str(tmp_path / "m"), seq_len=4096))
    (tmp_path / "m" / "byte_tokenizer.json").unlink()  # a 600-id model and no tokenizer: byte ids mean nothing to it
    with pytest.raises(fg.FormatError, match=r"no tokenizer found beside the model"):
        Trainer(tiny(tmp_path, preset="default", init_from=str(tmp_path / "m")))
    with pytest.raises(fg.FormatError, match=r"byte tokenizer on the model .*m, whose 600-id vocabulary is not bytes"):
        Trainer(tiny(tmp_path, preset="default", init_from=str(tmp_path / "m"), tokenizer="byte"))
    forced = Trainer(tiny(tmp_path, preset="default", init_from=str(tmp_path / "m"), tokenizer="byte",
                          force_tokenizer=True, workers=1))
    assert forced.model.config.vocab_size == 600 and forced.tokenizer.kind == "byte"


def _broken(state, what):
    if what == "int32-norm":
        state["params"]["norm"] = state["params"]["norm"].astype(np.int32)
    elif what == "history":
        state["history"] = [1.0, 2.0]
    elif what == "model_config":
        state["model_config"] = "tiny"
    else:
        del state[what]


@pytest.mark.parametrize("what, match", [("data_rng", r"checkpoint.safetensors: data_rng: bit_generator must be"),
                                         ("step", r"checkpoint.safetensors: checkpoint field 'step' is missing"),
                                         ("history", r"checkpoint.safetensors: checkpoint field 'history' is not"),
                                         ("int32-norm", r"checkpoint.safetensors: tensor params/norm is int32\[32\]"),
                                         ("model_config", r"checkpoint.safetensors: checkpoint field 'model_config'")])
def test_resume_and_load_model_refuse_a_checkpoint_with_a_missing_or_mistyped_field(tmp_path, what, match):
    from fusegrad.core.errors import FormatError
    from fusegrad.train.checkpoint import load_checkpoint, save_checkpoint

    trainer = Trainer(tiny(tmp_path, max_steps=1))
    trainer.run()
    state = load_checkpoint(trainer.ckpt_path)
    _broken(state, what)
    save_checkpoint(trainer.ckpt_path, state)
    before = {n: t.data.copy() for n, t in trainer.model.params.items()}
    with pytest.raises(FormatError, match=match):
        trainer.load(trainer.ckpt_path)
    assert all(np.array_equal(t.data, before[n]) for n, t in trainer.model.params.items())  # nothing half-loaded
    if what in ("int32-norm", "model_config"):
        with pytest.raises(FormatError, match=match):
            load_model(trainer.ckpt_path)


def test_an_unwritable_out_dir_is_one_storage_error(tmp_path):
    from fusegrad.core.errors import StorageError

    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"file/run: cannot write"):
        Trainer(tiny(tmp_path / "file"))


def test_tensorboard_reads_the_runs_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = Trainer(tiny(tmp_path))
    trainer.run()
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    loss = events.Tensors("loss")  # tensorboard.summary.Writer stores scalars as 0-d tensors
    assert [e.step for e in loss] == trainer.history["step"]
    np.testing.assert_allclose([float(make_ndarray(e.tensor_proto)) for e in loss], trainer.history["loss"], rtol=1e-6)
    assert [e.step for e in events.Tensors("val_loss")] == trainer.history["val_step"]


def test_checkpointed_activations_train_the_same_trajectory(tmp_path):
    """--checkpoint_activations true changes memory, not the run: the same losses (float32 sum order aside),
    in one process and with worker processes, and a checkpointed run resumes one that was not."""
    plain = Trainer(tiny(tmp_path / "a", max_steps=4, workers=1))
    plain.run()
    for workers in (1, 2):
        run = Trainer(tiny(tmp_path / f"c{workers}", max_steps=4, workers=workers, checkpoint_activations=True))
        assert run.model.config.checkpoint_activations
        run.run()
        np.testing.assert_allclose(run.history["loss"], plain.history["loss"], rtol=1e-5)
    resumed = Trainer(tiny(tmp_path / "a", resume=True, max_steps=5, checkpoint_activations=True))
    assert resumed.step == 4 and resumed.model.config.checkpoint_activations
