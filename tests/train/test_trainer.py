import numpy as np
import pytest

import fusegrad as fg
from fusegrad.train.trainer import Trainer, TrainConfig, TrainingError, load_model


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
    with pytest.raises(fg.ShapeError, match="unknown preset 'huge'"):
        Trainer(tiny(tmp_path, preset="huge"))
    with pytest.raises(fg.FormatError, match="no such data"):
        Trainer(tiny(tmp_path, data=str(tmp_path / "missing")))
    with pytest.raises(fg.ShapeError, match="batch_size"):
        Trainer(tiny(tmp_path, batch_size=0))
