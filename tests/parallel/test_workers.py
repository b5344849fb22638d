"""Data parallel over worker processes: the same grads and trajectory as one process, clear errors, clean exit."""
import dataclasses
import os
import signal

import numpy as np
import pytest

from fusegrad.core.errors import ConfigError, ShapeError
from fusegrad.core.tensor import Tensor
from fusegrad.models import Llama
from fusegrad.parallel.workers import ProcessDataParallel, WorkerError, choose_workers, layout
from fusegrad.train.optim import AdamW
from fusegrad.train.trainer import Trainer, TrainConfig


def twin(model):
    """The same weights in private arrays: the one-process oracle."""
    return Llama(model.config, params={n: Tensor(p.data.copy(), requires_grad=True) for n, p in model.params.items()})


def batch(rows, seed=0, cols=17):
    return np.random.default_rng(seed).integers(0, 64, (rows, cols))


@pytest.mark.parametrize("workers, rows", [(2, 4), (2, 5), (3, 5)])
def test_grads_and_loss_match_one_process(workers, rows):
    model = Llama.from_preset("tiny", seed=1)
    oracle = twin(model)
    tokens = batch(rows)
    want = oracle.loss(tokens)
    (want * 0.25).backward()
    with ProcessDataParallel(model, workers) as dp:
        got = dp.loss_backward(tokens, grad_scale=0.25)
    assert got == pytest.approx(want.item(), rel=1e-6)
    for name, p in model.params.items():
        np.testing.assert_allclose(p.grad, oracle.params[name].grad, rtol=1e-4, atol=1e-7, err_msg=name)


def test_each_workers_busy_time_is_counted_and_taken():
    model = Llama.from_preset("tiny", seed=1)
    with ProcessDataParallel(model, 2) as dp:
        dp.loss_backward(batch(4))
        dp.loss_backward(batch(4, seed=1))
        first = dp.take_busy_s()
        assert len(first) == 2 and min(first) > 0  # this process's slices, then the helper's
        assert dp.take_busy_s() == [0.0, 0.0]
        dp.loss_backward(batch(4))
        assert 0 < max(dp.take_busy_s()) < sum(first)  # one step's, not the two before


def test_grads_add_to_what_is_there():
    model = Llama.from_preset("tiny", seed=1)
    oracle = twin(model)
    for p in list(model.params.values()) + list(oracle.params.values()):
        p.grad = np.ones(p.shape, np.float32)
    oracle.loss(batch(4)).backward()
    with ProcessDataParallel(model, 2) as dp:
        dp.loss_backward(batch(4))
    for name, p in model.params.items():
        np.testing.assert_allclose(p.grad, oracle.params[name].grad, rtol=1e-4, atol=1e-6, err_msg=name)


def test_helpers_compute_with_the_weights_the_optimizer_wrote():
    model = Llama.from_preset("tiny", seed=2)
    oracle = twin(model)
    opts = [AdamW(m.named_parameters(), lr=1e-2) for m in (model, oracle)]
    losses = [[], []]
    with ProcessDataParallel(model, 2) as dp:
        for _ in range(4):
            losses[0].append(dp.loss_backward(batch(4)))  # one batch, learnt step by step
            loss = oracle.loss(batch(4))
            loss.backward()
            losses[1].append(loss.item())
            for opt in opts:
                opt.step()
                opt.zero_grad()
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert losses[0][-1] < losses[0][0]  # the weights did move, in the helper too


def test_a_helper_error_names_its_cause_and_the_pool_goes_on():
    model = Llama.from_preset("tiny", seed=1)
    with ProcessDataParallel(model, 2) as dp:
        tokens = batch(4)
        tokens[3, 0] = 999  # in the helper's slice
        with pytest.raises(WorkerError, match="token id 999 is outside the vocabulary"):
            dp.loss_backward(tokens)
        model.zero_grad()
        assert np.isfinite(dp.loss_backward(batch(4)))


def test_after_a_failure_in_either_process_the_next_step_is_right():
    model = Llama.from_preset("tiny", seed=1)
    oracle = twin(model)
    with ProcessDataParallel(model, 3) as dp:
        for bad_row in (0, 2):  # in the main process's slice, then in the first helper's (the second answers)
            tokens = batch(6)
            tokens[bad_row, 0] = 999
            with pytest.raises((ShapeError, WorkerError), match="token id 999"):
                dp.loss_backward(tokens)
            model.zero_grad()
        got = dp.loss_backward(batch(6, seed=4))
    want = oracle.loss(batch(6, seed=4))
    want.backward()
    assert got == pytest.approx(want.item(), rel=1e-6)
    np.testing.assert_allclose(model.params["norm"].grad, oracle.params["norm"].grad, rtol=1e-4, atol=1e-7)


def test_a_dead_helper_is_a_clear_error():
    model = Llama.from_preset("tiny", seed=1)
    with ProcessDataParallel(model, 2) as dp:
        dp.helpers[0][1].kill()
        dp.helpers[0][1].wait()
        with pytest.raises(WorkerError, match="worker process died"):
            dp.loss_backward(batch(4))


def test_close_frees_the_shared_memory_and_keeps_the_weights():
    from multiprocessing import shared_memory

    model = Llama.from_preset("tiny", seed=1)
    before = {n: p.data.copy() for n, p in model.params.items()}
    dp = ProcessDataParallel(model, 2)
    names, procs = [b.name for b in dp.blocks], [proc for _, proc in dp.helpers]
    dp.close()
    for name in names:
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)
    assert all(proc.poll() is not None for proc in procs)
    for name, p in model.params.items():
        assert p.data.base is None and np.array_equal(p.data, before[name])


def test_helpers_rss_counts_the_shared_blocks_once():
    model = Llama.from_preset("tiny", seed=1)
    with ProcessDataParallel(model, 2) as dp:
        dp.loss_backward(batch(2))
        shared = sum(b.size for b in dp.blocks) / 2 ** 20
        dp._send(dp.helpers[0][0], ("rss",))
        helper = dp._receive(*dp.helpers[0])
        assert dp.helpers_peak_rss_mb() == pytest.approx(helper - shared, abs=1.0)
        assert 20 < helper < 2000  # a Python process with numpy and numba, in MB


def test_a_helpers_peak_rss_is_its_own_not_that_of_the_process_that_started_it():
    """Linux keeps a parent's ru_maxrss in a child through fork and exec: a bench that loaded a model before its
    workers started reported that model in every worker."""
    ballast = np.ones(75_000_000)  # 600 MB touched here, before the helpers start
    with ProcessDataParallel(Llama.from_preset("tiny", seed=1), 2) as dp:
        dp.loss_backward(batch(2))
        dp._send(dp.helpers[0][0], ("rss",))
        helper = dp._receive(*dp.helpers[0])
    assert ballast.sum() and 20 < helper < 500


def test_too_little_shared_memory_is_refused_before_anything_is_written(tmp_path):
    from fusegrad.parallel.workers import check_shared_memory

    check_shared_memory(1 << 20, str(tmp_path))  # a real filesystem with room
    with pytest.raises(WorkerError, match=r"need 1048576 MB of shared memory .* --shm-size"):
        check_shared_memory(1 << 40, str(tmp_path))


def test_bad_requests_are_refused():
    model = Llama.from_preset("tiny", seed=1)
    with pytest.raises(ConfigError, match="workers must be >= 2"):
        ProcessDataParallel(model, 1)
    with ProcessDataParallel(model, 2) as dp, pytest.raises(ShapeError, match="1 rows does not split over 2"):
        dp.loss_backward(batch(1))
    with pytest.raises(ConfigError, match="workers 9 must be 0"):
        choose_workers(9, rows=4, eligible=True)
    assert layout([("w", (5,))]) == ({"w": (0, (5,))}, 64)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_with_two_workers_follows_one_process(tmp_path, grad_accum):
    def run(workers):
        cfg = TrainConfig(preset="tiny", batch_size=4, seq_len=16, max_steps=5, warmup_steps=1, eval_interval=0,
                          ckpt_interval=0, out_dir=str(tmp_path / f"w{workers}"), progress=False, plot=False,
                          sample_tokens=0, quiet=True, seed=5, workers=workers, grad_accum=grad_accum)
        trainer = Trainer(cfg)
        assert (trainer.workers is not None) == (workers > 1)
        trainer.run()
        return trainer.history["loss"]
    np.testing.assert_allclose(run(2), run(1), rtol=1e-4)


def test_trainer_falls_back_to_one_process_when_shared_memory_is_short(tmp_path, monkeypatch):
    from fusegrad.parallel import workers

    def short(nbytes, shm_dir=workers.SHM_DIR):
        raise WorkerError(f"worker processes need {nbytes} bytes of shared memory")
    monkeypatch.setattr(workers, "check_shared_memory", short)
    cfg = dict(preset="tiny", batch_size=4, seq_len=16, max_steps=1, eval_interval=0, ckpt_interval=0,
               progress=False, plot=False, sample_tokens=0, quiet=True)
    assert Trainer(TrainConfig(out_dir=str(tmp_path / "auto"), **cfg)).workers is None  # auto: one process
    with pytest.raises(WorkerError, match="shared memory"):
        Trainer(TrainConfig(out_dir=str(tmp_path / "two"), workers=2, **cfg))  # asked for: the reason


def test_a_stopped_helper_is_a_clear_error_not_a_hang():
    model = Llama.from_preset("tiny", seed=1)
    with ProcessDataParallel(model, 2) as dp:
        dp.loss_backward(batch(4))
        pid = dp.helpers[0][1].pid
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(WorkerError, match=f"worker process {pid} is stopped"):
                dp.loss_backward(batch(4))
        finally:
            os.kill(pid, signal.SIGCONT)


def test_helpers_build_only_fusegrad_model_classes():
    from fusegrad.parallel.workers import _fusegrad_class

    assert _fusegrad_class("fusegrad.models.llama.Llama") is Llama
    for name in ("os.system", "numpy.random.default_rng", "fusegrad.core.fileio.os"):
        with pytest.raises(WorkerError, match="fusegrad.models classes only"):
            _fusegrad_class(name)


# -- fine-tuning: adapters (LoRA, QLoRA's NF4 bases), masked and classification losses -------------------------------
def adapted_twins(qlora=False, num_classes=0):
    """Two tiny models with equal LoRA adapters on every projection (B != 0, so every adapter grad is) and an
    equal classifier head if num_classes -> [(model, named trainable tensors, worker_adapters kwargs)] x 2."""
    from fusegrad.finetune.lora import LoraConfig, attach_lora
    from fusegrad.finetune.qlora import attach_qlora
    from fusegrad.finetune.trainer import HEAD

    out = []
    for _ in range(2):
        model = Llama.from_preset("tiny", seed=1)
        cfg = LoraConfig(targets="all", r=2, alpha=4, seed=3)
        lora = attach_qlora(model, cfg)[0] if qlora else attach_lora(model, cfg)
        named = lora.named_parameters()
        if num_classes:
            named.append((HEAD, Tensor(np.zeros((num_classes, model.config.dim), np.float32), requires_grad=True)))
        rng = np.random.default_rng(4)
        for _, t in named:
            t.data[...] = rng.normal(0, 0.2, t.shape)
        out.append((model, named, {"lora": dataclasses.asdict(cfg), "num_classes": num_classes}))
    return out


def groups(num_classes=0):
    """Three length groups (tokens, loss mask, labels) as fine-tuning makes them, and the step's denominator."""
    rng = np.random.default_rng(5)
    out = []
    for rows, length in ((2, 9), (3, 12), (1, 17)):
        tokens = rng.integers(0, 64, (rows, length + (0 if num_classes else 1)))
        mask = None if num_classes else rng.random((rows, length)) < 0.6
        if mask is not None:
            mask[:, -1] = True
        out.append((tokens, mask, rng.integers(0, max(num_classes, 1), rows)))
    return out, (6 if num_classes else sum(int(g[1].sum()) for g in out))


@pytest.mark.parametrize("qlora, num_classes, workers", [(False, 0, 2), (True, 0, 3), (False, 3, 2)])
def test_adapter_grads_and_loss_match_one_process(qlora, num_classes, workers):
    from fusegrad.finetune.losses import group_loss
    from fusegrad.finetune.trainer import HEAD, slice_losses, worker_adapters

    (model, named, setup), (oracle, oracle_named, _) = adapted_twins(qlora, num_classes)
    gs, denominator = groups(num_classes)
    head = dict(oracle_named).get(HEAD)
    want = 0.0
    for tokens, mask, labels in gs:  # the oracle: every group in this process, the losses as fine-tuning sums them
        loss = group_loss(oracle, head, tokens, mask, denominator, labels)[0]
        (loss * 0.5).backward()
        want += loss.item()
    # each slice: some groups whole, one split between processes
    split = [gs[0], (gs[1][0][:1], None if num_classes else gs[1][1][:1], gs[1][2][:1])]
    rest = [(gs[1][0][1:], None if num_classes else gs[1][1][1:], gs[1][2][1:]), gs[2]]
    slices = [(split, denominator), (rest, denominator)] + [([], denominator)] * (workers - 2)
    with ProcessDataParallel(model, workers, named, (worker_adapters, setup)) as dp:
        got = dp.backward_slices(slice_losses, slices, grad_scale=0.5)
        assert all(p.grad is None for p in model.params.values())  # the base stays frozen
        # the frozen base lives once, in the shared weight block; the helpers' grad blocks hold the adapters only
        assert all(np.shares_memory(p.data, np.frombuffer(dp.weights.buf, np.uint8)) for p in model.params.values())
        assert all(block.size <= sum(4 * t.numel() for _, t in named) + 64 * len(named) for block in dp.grad_blocks)
    assert got == pytest.approx(want, rel=1e-5)
    assert model.quantized.keys() == oracle.quantized.keys() and bool(model.quantized) == qlora
    for (name, p), (_, q) in zip(named, oracle_named):
        assert np.abs(q.grad).max() > 0, name
        # float32 sums in another order (rows split between processes, 512-bit vector reductions): ~1e-6 of the max
        np.testing.assert_allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5 * np.abs(q.grad).max(), err_msg=name)
        assert p.data.base is None  # out of shared memory after close


def test_adapters_need_their_setup_and_a_module_level_generator():
    from fusegrad.finetune.trainer import slice_losses, worker_adapters

    (model, named, setup), _ = adapted_twins()
    with pytest.raises(ConfigError, match="adapters needs extras= .* and setup="):
        ProcessDataParallel(model, 2)
    with pytest.raises(ConfigError, match="setup must be a function defined at the top level"):
        ProcessDataParallel(model, 2, named, (lambda m: [], {}))
    with ProcessDataParallel(model, 2, named, (worker_adapters, setup)) as dp:
        with pytest.raises(ConfigError, match="generator function yielding scalar losses"):
            dp.backward_slices(worker_adapters, [(), ()])
        with pytest.raises(ShapeError, match="3 slices for 2 worker processes"):
            dp.backward_slices(slice_losses, [([], 1)] * 3)
