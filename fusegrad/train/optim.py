"""AdamW with decoupled weight decay (torch.optim.AdamW semantics) and global gradient-norm clipping.

Updates run in place on each parameter's float32 `.data` with one shared scratch buffer, so a step
allocates nothing per parameter. The math is the backend's `adamw_update` kernel, run where the
parameters live.

>>> import fusegrad as fg, numpy as np
>>> w = fg.tensor([[1.0, -2.0]], requires_grad=True)
>>> w.grad = np.float32([[0.5, 0.5]])
>>> opt = AdamW([("w", w)], lr=0.1, weight_decay=0.0)
>>> opt.step()
>>> print(w.data)   # the first Adam step moves each weight by lr * sign(grad)
[[ 0.9 -2.1]]
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.core.tensor import Tensor

_CLIP_CHUNK = 1 << 16  # elements converted to float64 at a time when a grad's float32 dot overflows


def decays_by_default(name: str, p) -> bool:
    """Matrices decay; 1-D parameters (RMSNorm weights, biases) do not."""
    return p.data.ndim >= 2


def decays_except_embeddings(name: str, p) -> bool:
    """Like `decays_by_default`, and token embeddings ('embed' in the name) do not decay either."""
    return p.data.ndim >= 2 and "embed" not in name


def _named(params) -> list:
    """Tensors or (name, Tensor) pairs -> [(name, Tensor)], unnamed ones called param.<i>."""
    out = []
    for i, item in enumerate(params):
        name, t = item if isinstance(item, tuple) else (f"param.{i}", item)
        if not isinstance(t, Tensor):
            raise ConfigError(f"AdamW: parameter {name} is a {type(t).__name__}, expected a fusegrad Tensor")
        out.append((name, t))
    return out


class AdamW:
    """AdamW over fusegrad Tensors.

    params: Tensors, (name, Tensor) pairs, or param groups `{"params": [...], "weight_decay": wd}`.
    Plain lists are split by `decays(name, tensor)` (default: no decay on 1-D params; pass
    `decays_except_embeddings` to spare embeddings too); explicit groups keep their own weight_decay.
    `lr` is a plain attribute: the training loop sets it from the schedule before each `step()`.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1, decays: Callable = decays_by_default):
        self.lr, self.betas, self.eps = float(lr), (float(betas[0]), float(betas[1])), float(eps)
        self.weight_decay = float(weight_decay)
        params = list(params)
        if not params:
            raise ConfigError("AdamW: got an empty parameter list")
        if isinstance(params[0], dict):
            entries = [(n, t, float(g.get("weight_decay", weight_decay))) for g in params for n, t in _named(g["params"])]
        else:
            entries = [(n, t, self.weight_decay if decays(n, t) else 0.0) for n, t in _named(params)]
        self.names = [n for n, _, _ in entries]
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ConfigError(f"AdamW: duplicate parameter names {dup}")
        for n, t, _ in entries:
            if t.dtype != np.float32:
                raise ShapeError(f"AdamW: parameter {n} is {t.dtype}; the optimizer updates float32 in place")
        self.params = [t for _, t, _ in entries]
        self.decay = [wd for _, _, wd in entries]
        # moments and scratch live where the parameters do (a torch device keeps them on the device)
        xp = self.params[0].backend.xp
        self.exp_avg = [xp.zeros_like(t.data) for t in self.params]
        self.exp_avg_sq = [xp.zeros_like(t.data) for t in self.params]
        self.steps = [0] * len(self.params)  # per parameter, like torch: a param without grad does not step
        self._scratch = xp.empty((max(t.numel() for t in self.params),), dtype=xp.float32,
                                 device=self.params[0].backend.device)

    def step(self, grad_scale=1.0) -> None:
        """One update of every parameter with a grad, from the grads times `grad_scale` (a gradient clip's
        `clip_factor`: a float, or a 0-d array where the parameters live); the grads are left as they are."""
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if p.grad.shape != p.data.shape:
                raise ShapeError(f"AdamW: grad of {self.names[i]} is {p.grad.shape}, parameter is {p.data.shape}")
            self.steps[i] += 1
            tmp = self._scratch[: p.numel()].reshape(p.data.shape)
            update = p.backend.adamw_update  # numpy: the JIT kernel for float32, else the reference
            update(p.data, p.grad, self.exp_avg[i], self.exp_avg_sq[i], self.lr, beta1, beta2,
                   self.eps, self.decay[i], self.steps[i], tmp=tmp, grad_scale=grad_scale)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """Nested dict of numpy arrays (moments) and JSON-able numbers, keyed by parameter name."""
        def host_copy(p, m):
            return m.copy() if isinstance(m, np.ndarray) else np.array(p.backend.to_numpy(m))

        return {"steps": dict(zip(self.names, self.steps)),
                "exp_avg": {n: host_copy(p, m) for n, p, m in zip(self.names, self.params, self.exp_avg)},
                "exp_avg_sq": {n: host_copy(p, v) for n, p, v in zip(self.names, self.params, self.exp_avg_sq)},
                "hyper": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                          "weight_decay": dict(zip(self.names, self.decay))}}

    def load_state_dict(self, state: dict) -> None:
        """Restore moments and step counts saved by `state_dict` (hyperparameters stay as constructed)."""
        for key in ("steps", "exp_avg", "exp_avg_sq"):
            if key not in state:
                raise FormatError(f"AdamW.load_state_dict: missing '{key}' (have {sorted(state)})")
            missing = [n for n in self.names if n not in state[key]]
            if missing:
                raise FormatError(f"AdamW.load_state_dict: '{key}' has no entry for parameters {missing}")
        for i, (n, p) in enumerate(zip(self.names, self.params)):
            for key, dest in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                arr = np.asarray(state[key][n])
                if arr.shape != p.data.shape:
                    raise FormatError(f"AdamW.load_state_dict: {key} of {n} has shape {arr.shape}, "
                                      f"parameter has {p.data.shape}")
                dest[i] = p.backend.asarray(np.array(arr, dtype=np.float32))  # numpy: the same array
            self.steps[i] = int(state["steps"][n])


def grad_norm(params):
    """The global L2 norm of the grads (params without grad are skipped): a float, or for grads on a device a
    0-d device array (no host read).

    Each grad's sum of squares is one BLAS dot in its own dtype (float32: ~1e-5 relative error on a 9 M
    element embedding grad, smaller than torch's own float32 norm), summed across grads in float64; a
    non-finite dot is redone in float64 chunks, so only a real inf/NaN gives a non-finite norm.
    """
    named = [t for _, t in _named(params) if t.grad is not None]
    if named and not isinstance(named[0].grad, np.ndarray):
        be = named[0].backend
        return be.xp.sqrt(be.sum_of_squares([t.grad for t in named]))  # 0-d, on the device
    total = 0.0
    for g in (t.grad for t in named):
        flat = g.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is handled just below
            square_sum = float(np.dot(flat, flat))  # BLAS, in the grad's dtype (blocked sums: ~1e-5 relative)
        if not math.isfinite(square_sum):  # a float32 overflow, or a real inf/NaN: decide in float64
            square_sum = sum(float(np.dot(c, c)) for c in (flat[i:i + _CLIP_CHUNK].astype(np.float64)
                                                           for i in range(0, flat.size, _CLIP_CHUNK)))
        total += square_sum
    return math.sqrt(total)


def clip_factor(norm, max_norm: float, xp=np):
    """What clipping multiplies the grads by: max_norm / (norm + 1e-6) past max_norm (like
    torch.nn.utils.clip_grad_norm_), else 1; also 1 for a non-finite norm (the caller decides to stop). A 0-d
    device norm gives a 0-d device factor (xp: that backend's array namespace, `backend.xp`)."""
    if isinstance(norm, float):
        return max_norm / (norm + 1e-6) if math.isfinite(norm) and norm > max_norm else 1.0
    return xp.where(xp.isfinite(norm) & (norm > max_norm), max_norm / (norm + 1e-6), xp.ones_like(norm))


def clip_grad_norm(params, max_norm: float):
    """Scale all grads in place so their global L2 norm is at most max_norm; return the pre-clip norm
    (`grad_norm`; scaled by `clip_factor`). A training loop instead passes the factor to `AdamW.step`, which
    folds it into its one pass over the grads.

    >>> import fusegrad as fg
    >>> w = fg.tensor([0.0, 0.0], requires_grad=True); w.grad = np.float32([3.0, 4.0])
    >>> clip_grad_norm([w], 1.0)
    5.0
    >>> print(w.grad.round(4))   # scaled by 1 / (5 + 1e-6)
    [0.6 0.8]
    """
    named = [t for _, t in _named(params) if t.grad is not None]
    norm = grad_norm(named)
    xp = named[0].backend.xp if named else np
    scale = clip_factor(norm, max_norm, xp)
    if not (isinstance(scale, float) and scale == 1.0):
        for t in named:
            t.grad *= scale if isinstance(scale, float) else xp.astype(scale, t.grad.dtype)
    return norm
