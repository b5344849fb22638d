"""AdamW and gradient clipping against torch.optim.AdamW / torch.nn.utils.clip_grad_norm_."""
import doctest
import json

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.backends.numpy_backend import NumpyBackend
from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.train import optim
from fusegrad.train.optim import AdamW, clip_factor, clip_grad_norm, decays_except_embeddings, grad_norm

torch = pytest.importorskip("torch")

SHAPES = {"tok_embeddings": (11, 6), "layers.0.attention_norm": (6,), "layers.0.wqkv": (18, 6), "output": (11, 6)}


def make_params(rng):
    return [(n, fg.tensor(rng.standard_normal(s).astype(np.float32), requires_grad=True)) for n, s in SHAPES.items()]


def torch_adamw(named, decays, lr, betas, wd, eps=1e-8):
    tparams = {n: torch.tensor(t.data.copy(), requires_grad=True) for n, t in named}
    groups = [{"params": [tparams[n] for n, _ in named if decays[n]], "weight_decay": wd},
              {"params": [tparams[n] for n, _ in named if not decays[n]], "weight_decay": 0.0}]
    return tparams, torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


@pytest.mark.parametrize("wd,decays", [(0.1, None), (0.0, None), (0.3, decays_except_embeddings)])
def test_adamw_matches_torch_step_by_step(rng, wd, decays):
    named = make_params(rng)
    kwargs = {} if decays is None else {"decays": decays}
    opt = AdamW(named, lr=3e-3, betas=(0.9, 0.95), weight_decay=wd, **kwargs)
    rule = decays or optim.decays_by_default
    expect_decays = {n: rule(n, t) for n, t in named}
    assert expect_decays["layers.0.attention_norm"] is False
    assert expect_decays["tok_embeddings"] is (decays is None)
    tparams, topt = torch_adamw(named, expect_decays, lr=3e-3, betas=(0.9, 0.95), wd=wd)
    for step in range(6):
        lr = 3e-3 * (1 - step / 10)  # the lr changes between steps, as a schedule does
        opt.lr = lr
        for g in topt.param_groups:
            g["lr"] = lr
        for n, t in named:
            grad = (rng.standard_normal(t.shape) * 10.0 ** rng.integers(-3, 2)).astype(np.float32)
            t.grad = grad
            tparams[n].grad = torch.from_numpy(grad.copy())
        opt.step()
        topt.step()
        for n, t in named:
            np.testing.assert_allclose(t.data, tparams[n].detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=n)
            np.testing.assert_allclose(opt.exp_avg_sq[opt.names.index(n)],
                                       topt.state[tparams[n]]["exp_avg_sq"].numpy(), rtol=1e-6, atol=1e-12)


def test_params_without_grad_are_skipped_like_torch(rng):
    named = make_params(rng)[:2]
    opt = AdamW(named, lr=1e-2)
    tparams, topt = torch_adamw(named, {n: opt.decay[i] > 0 for i, n in enumerate(opt.names)}, 1e-2, (0.9, 0.95), 0.1)
    for step in range(4):
        n, t = named[step % 2]   # alternate which param has a grad
        named[1 - step % 2][1].grad = None
        tparams[named[1 - step % 2][0]].grad = None
        t.grad = rng.standard_normal(t.shape).astype(np.float32)
        tparams[n].grad = torch.from_numpy(t.grad.copy())
        opt.step()
        topt.step()
    assert opt.steps == [2, 2]
    for n, t in named:
        np.testing.assert_allclose(t.data, tparams[n].detach().numpy(), rtol=1e-6, atol=1e-7)


def test_update_is_in_place_float32(rng):
    named = make_params(rng)
    opt = AdamW(named, lr=1e-2)
    buffers = [t.data for _, t in named]
    for _, t in named:
        t.grad = np.ones(t.shape, np.float32)
    opt.step()
    assert all(t.data is b and t.data.dtype == np.float32 for (_, t), b in zip(named, buffers))
    opt.zero_grad()
    assert all(t.grad is None for _, t in named)


def test_adamw_update_reference_kernel_against_float64_formula(rng):
    p, g = rng.standard_normal(50).astype(np.float32), rng.standard_normal(50).astype(np.float32)
    m, v = rng.standard_normal(50).astype(np.float32), rng.random(50).astype(np.float32)
    p64, m64, v64 = p.astype(np.float64), m.astype(np.float64), v.astype(np.float64)
    lr, b1, b2, eps, wd, t, clip = 0.01, 0.8, 0.99, 1e-8, 0.05, 7, 0.3
    NumpyBackend().adamw_update(p, g, m, v, lr, b1, b2, eps, wd, t, grad_scale=clip)
    g64 = clip * g.astype(np.float64)
    m64 = b1 * m64 + (1 - b1) * g64
    v64 = b2 * v64 + (1 - b2) * g64 ** 2
    p64 = p64 * (1 - lr * wd) - lr * (m64 / (1 - b1 ** t)) / (np.sqrt(v64 / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(m, m64, rtol=1e-6, atol=1e-7)  # float32 rounding of clip * g, then a sum
    np.testing.assert_allclose(v, v64, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(p, p64, rtol=1e-6, atol=1e-7)


def run(opt, named, grads):
    for gs in grads:
        for (_, t), g in zip(named, gs):
            t.grad = g.copy()
        opt.step()
    return [t.data.copy() for _, t in named]


def test_resume_from_saved_state_is_bitwise_identical(rng, tmp_path):
    from safetensors.numpy import load_file, save_file

    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES.values()] for _ in range(6)]
    named = make_params(rng)
    start = [t.data.copy() for _, t in named]
    straight = run(AdamW(named, lr=1e-2), named, grads)

    for (_, t), s in zip(named, start):
        t.data[...] = s
    opt = AdamW(named, lr=1e-2)
    run(opt, named, grads[:3])
    state = opt.state_dict()
    save_file({f"{k}/{n}": a for k in ("exp_avg", "exp_avg_sq") for n, a in state[k].items()}, tmp_path / "o.st")
    (tmp_path / "o.json").write_text(json.dumps({"steps": state["steps"], "hyper": state["hyper"]}))
    saved_params = [t.data.copy() for _, t in named]

    arrays, meta = load_file(tmp_path / "o.st"), json.loads((tmp_path / "o.json").read_text())
    loaded = {"steps": meta["steps"], **{k: {n: arrays[f"{k}/{n}"] for n in SHAPES} for k in ("exp_avg", "exp_avg_sq")}}
    resumed_named = [(n, fg.tensor(p, requires_grad=True)) for n, p in zip(SHAPES, saved_params)]
    opt2 = AdamW(resumed_named, lr=1e-2)
    opt2.load_state_dict(loaded)
    resumed = run(opt2, resumed_named, grads[3:])
    for a, b in zip(straight, resumed):
        assert a.tobytes() == b.tobytes()


def test_load_state_dict_errors_name_the_parameter(rng):
    named = make_params(rng)
    opt = AdamW(named)
    state = opt.state_dict()
    with pytest.raises(FormatError, match="missing 'exp_avg_sq'"):
        opt.load_state_dict({k: v for k, v in state.items() if k != "exp_avg_sq"})
    del state["exp_avg"]["output"]
    with pytest.raises(FormatError, match="exp_avg.*\\['output'\\]"):
        opt.load_state_dict(state)
    state = opt.state_dict()
    state["exp_avg"]["output"] = np.zeros((2, 2), np.float32)
    with pytest.raises(FormatError, match="exp_avg of output has shape \\(2, 2\\)"):
        opt.load_state_dict(state)


def test_bad_params_raise_clear_errors(rng):
    w = fg.tensor(np.ones((2, 2), np.float32), requires_grad=True)
    with pytest.raises(ConfigError, match="empty"):
        AdamW([])
    with pytest.raises(ConfigError, match="duplicate.*'w'"):
        AdamW([("w", w), ("w", w)])
    with pytest.raises(ConfigError, match="x is a ndarray"):
        AdamW([("x", np.ones(2))])
    with pytest.raises(ShapeError, match="param.0 is float64"):
        AdamW([fg.tensor(np.ones(2), dtype="float64")])
    opt = AdamW([("w", w)])
    w.grad = np.ones(3, np.float32)
    with pytest.raises(ShapeError, match="grad of w is \\(3,\\)"):
        opt.step()


def test_param_groups_keep_their_weight_decay(rng):
    a, b = (fg.tensor(rng.standard_normal((3, 3)).astype(np.float32), requires_grad=True) for _ in range(2))
    opt = AdamW([{"params": [("a", a)], "weight_decay": 0.5}, {"params": [("b", b)]}], weight_decay=0.0)
    assert opt.decay == [0.5, 0.0] and opt.names == ["a", "b"]


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(rng, max_norm):
    shapes = [(30, 20), (20,), (5, 5, 4)]
    ts = [fg.tensor(np.zeros(s, np.float32), requires_grad=True) for s in shapes]
    tt = [torch.zeros(s, requires_grad=True) for s in shapes]
    for t, u in zip(ts, tt):
        t.grad = rng.standard_normal(t.shape).astype(np.float32)
        u.grad = torch.from_numpy(t.grad.copy())
    extra = fg.tensor(np.zeros(3, np.float32), requires_grad=True)  # grad None: ignored
    norm = clip_grad_norm(ts + [extra], max_norm)
    tnorm = torch.nn.utils.clip_grad_norm_(tt, max_norm)
    np.testing.assert_allclose(norm, tnorm.item(), rtol=1e-6)
    for t, u in zip(ts, tt):
        np.testing.assert_allclose(t.grad, u.grad.numpy(), rtol=1e-6, atol=1e-9)
    assert extra.grad is None


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_a_clip_folded_into_adamw_matches_torchs_clip_then_adamw(rng, max_norm):
    """What the training loop runs: grad_norm, then AdamW.step(grad_scale=clip_factor(...)); the grads stay."""
    named = make_params(rng)
    opt = AdamW(named, lr=3e-3)
    tparams, topt = torch_adamw(named, {n: opt.decay[i] > 0 for i, n in enumerate(opt.names)}, 3e-3, (0.9, 0.95), 0.1)
    for step in range(3):
        for n, t in named:
            t.grad = (rng.standard_normal(t.shape) * 3).astype(np.float32)
            tparams[n].grad = torch.from_numpy(t.grad.copy())
        grads = [t.grad.copy() for _, t in named]
        norm = grad_norm(named)
        opt.step(grad_scale=clip_factor(norm, max_norm))
        tnorm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), max_norm)
        topt.step()
        assert norm == pytest.approx(tnorm.item(), rel=1e-6)
        assert all(np.array_equal(t.grad, g) for (_, t), g in zip(named, grads))
        for n, t in named:
            np.testing.assert_allclose(t.data, tparams[n].detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=n)
    assert clip_factor(float("nan"), 1.0) == 1.0 and clip_factor(0.5, 1.0) == 1.0


def test_clip_grad_norm_accuracy_and_nonfinite(rng):
    # a large grad: the float32 dot must stay within 1e-5 of float64 and not be worse than torch's fp32 norm
    g = (rng.standard_normal(2_000_000) * 1e-3 + 1e-4).astype(np.float32)
    t = fg.tensor(np.zeros_like(g), requires_grad=True)
    t.grad = g.copy()
    exact = np.linalg.norm(g.astype(np.float64))
    torch_err = abs(torch.linalg.vector_norm(torch.from_numpy(g)).item() - exact) / exact
    err = abs(clip_grad_norm([("t", t)], 1e9) - exact) / exact
    assert err < 1e-5 and err <= max(torch_err, 1e-6)
    # float32 overflow of the dot (|g| ~ 1e20) is not an inf norm: it is redone in float64
    t.grad = np.full(4, 1e20, np.float32)
    assert clip_grad_norm([t], 1e30) == pytest.approx(2e20, rel=1e-7)
    t.grad = g.copy()
    t.grad[7] = np.inf
    before = t.grad.copy()
    assert clip_grad_norm([t], 1.0) == np.inf
    assert np.array_equal(t.grad, before)


def test_docstring_examples():
    assert doctest.testmod(optim).failed == 0
