"""LoRA adapters on fusegrad's fused projections, with the base frozen (or quantized: NF4 or a GGUF file's
blocks, see qlora.py).

Targets are the seven Llama projections q, k, v, o, gate, up, down. q/k/v share the fused `wqkv` and
gate/up share `w13`, so one fused projection may carry up to three adapters. Each part p has its own
A_p (r, in) and B_p (out_p, r); the A's of one projection are stacked into ONE tensor (P r, in), so
    y = x W^T,   u = dropout(x) A^T * s  (one GEMM, (N, P r)),   y[:, rows_p] += u_p B_p^T
and the delta of a part without an adapter is never formed (no zeros). s = alpha / r (rsLoRA:
alpha / sqrt(r)). The backward runs only dx through the frozen W (no dW GEMM), plus the small
LoRA GEMMs: dB_p = g_p^T u_p, du_p = s g_p B_p, dA = du^T x (A's own layout: A is used as
matmul_nt's right operand), dx += du A.

Like PEFT: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so step 0 is the base.
One dropout mask is drawn per fused projection (PEFT draws one per module; the distribution is equal).

DoRA (`dora=True`, PEFT's use_dora) gives each part a magnitude m_p (out_p,), initialised to the row norms of
W_p, and scales the part's rows by c_p = m_p / ||W_p + s B_p A_p||_row, the norm a constant of the step (DoRA's
section 4.3, as PEFT detaches it): y[:, rows_p] = c_p (x W_p^T + u_p B_p^T). Backward: dm_p = sum_N g_p z_p / norm
with z_p the unscaled rows, and g_p c_p flows on as the LoRA gradient does. With dropout, as PEFT, the base term
that c_p scales is the dropped-out x's: y_p = x W_p^T + (c_p - 1) x_d W_p^T + c_p l_p.

>>> from fusegrad.models import Llama
>>> model = Llama.from_preset("tiny", seed=0)
>>> lora = attach_lora(model, LoraConfig(targets=("q", "v"), r=4, alpha=8))
>>> sorted(n for n, _ in lora.named_parameters())[:3]
['layers.0.wqkv.lora_A', 'layers.0.wqkv.lora_B.q', 'layers.0.wqkv.lora_B.v']
>>> model.loss(np.zeros((1, 5), np.int64)).backward()
>>> [t.grad is None for t in model.params.values()][:2]   # the base is frozen
[True, True]
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError, ShapeError
from fusegrad.core.tensor import Tensor, is_grad_enabled, tensor
from fusegrad.core.trace import span
from fusegrad.models.hf_names import HF_MODULES, fused_parts, in_features
from fusegrad.ops._util import check_float, result

# target -> (fused parameter kind, index of the part inside it)
TARGETS = {"q": ("wqkv", 0), "k": ("wqkv", 1), "v": ("wqkv", 2), "o": ("wo", 0),
           "gate": ("w13", 0), "up": ("w13", 1), "down": ("w2", 0)}
ALIASES = {**{m.split(".")[1]: t for t, m in HF_MODULES.items()},
           "wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate", "w3": "up", "w2": "down"}
PROJECTIONS = ("wqkv", "wo", "w13", "w2")


def parse_targets(spec) -> tuple:
    """"q,v" / ["q_proj", "v_proj"] / "all" -> canonical targets in model order; ConfigError if unknown."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if items == ["all"]:
        return tuple(TARGETS)
    out = []
    for item in items:
        name = ALIASES.get(item, item)
        if name not in TARGETS:
            raise ConfigError(f"lora: unknown target module {item!r}; choose from {', '.join(TARGETS)} "
                             f"(or HF names {', '.join(m.split('.')[1] for m in HF_MODULES.values())}, or 'all')")
        out.append(name)
    if not out:
        raise ConfigError("lora: no target modules given (e.g. --lora_targets q,v)")
    return tuple(t for t in TARGETS if t in out)


def part_rows(config, target: str) -> tuple:
    """-> (fused kind, row slice of the part inside the fused weight, in_features)."""
    kind, index = TARGETS[target]
    return kind, fused_parts(config, kind)[index][1], in_features(config, target)


@dataclasses.dataclass
class LoraConfig:
    targets: tuple = ("q", "v")
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    seed: int = 0

    def __post_init__(self):
        self.targets = parse_targets(self.targets)
        if int(self.r) < 1:
            raise ConfigError(f"lora: rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _base_weight(base, be, out=None):
    """The fp32 weight (out, in) of a base: a Tensor's array, or a quantized base (NF4 or a GGUF file's blocks)
    dequantized for this GEMM where backend `be` keeps its arrays (into `out` when given)."""
    if isinstance(base, Tensor):
        return base.data
    with span(base.span, "quant", shape=base.shape):
        return base.dequantize_on(be, out)


def lora_linear(x: Tensor, base, A: Tensor | None, Bs: list, slices: list, scaling: float,
                dropout_mask=None, weight_buffer=None, Ms: list = ()) -> Tensor:
    """x (..., in) -> (..., out) = x W^T + scaling * per-part (x A_p^T) B_p^T in rows `slices`; with DoRA
    magnitudes Ms[p] (out_p,), each part's rows scaled by Ms[p] / ||W_p + scaling B_p A_p||_row.

    base: Tensor (out, in) (frozen or not) or quantized (fused.Fused: NF4, GGUF blocks); A (P r, in) stacked per
    part; Bs[p] (out_p, r). dropout_mask (N, in): 0 or 1/(1-p) per element of x, applied to the LoRA branch only
    (as PEFT). weight_buffer: a float32 (out, in) array of x's backend that a quantized base is dequantized into
    right before each of its two GEMMs (forward, dx), so neither allocates; its contents are not kept.
    """
    out_f, in_f = base.shape
    if x.ndim < 1 or x.shape[-1] != in_f:
        raise ShapeError(f"lora_linear: x has shape {x.shape}, base weight expects {in_f} features (shape {base.shape})")
    tensors = [x] + ([A] if A is not None else []) + list(Bs) + list(Ms)
    check_float("lora_linear", *[(f"input{i}", t) for i, t in enumerate(tensors)])
    P = len(Bs)
    r = A.shape[0] // P if P else 0
    be = x.backend
    x2 = x.data.reshape(-1, in_f)  # (N, in)
    W = _base_weight(base, be, weight_buffer)
    y = be.gemm(x2, W, trans_b=True)  # (N, out)
    xa = x2 if dropout_mask is None else x2 * dropout_mask
    us = None
    if P:
        with span("lora_forward", "lora", parts=P, r=r):
            us = be.gemm(xa, A.data, trans_b=True)  # (N, P r)
            us *= scaling
            for p, (rows, B) in enumerate(zip(slices, Bs)):  # y[:, rows] += u_p B_p^T, no temporary
                be.gemm_accumulate(y[:, rows], us[:, p * r:(p + 1) * r], B.data, trans_b=True)
    norms, zs = [], []  # DoRA: per part ||W_p + s B_p A_p||_row (out_p,), and z_p (N, out_p), what c_p scales
    if Ms:
        with span("dora", "lora", parts=P):
            for p, (rows, B, M) in enumerate(zip(slices, Bs, Ms)):
                V = be.gemm(B.data, A.data[p * r:(p + 1) * r])  # (out_p, in)
                V *= scaling
                V += W[rows]
                norms.append(((V * V).sum(1)) ** 0.5)
                if dropout_mask is None:  # z_p = x W_p^T + l_p, l_p = u_p B_p^T: y_p itself
                    z = y[:, rows] * 1.0
                else:  # as PEFT: the dropped-out x through the base too, z_p = x_d W_p^T + l_p
                    z = be.gemm(xa, W[rows], trans_b=True)
                    be.gemm_accumulate(z, us[:, p * r:(p + 1) * r], B.data, trans_b=True)
                y[:, rows] += z * (M.data / norms[-1] - 1.0)  # y_p = x W_p^T + (c_p - 1) z_p + l_p
                zs.append(z if M.requires_grad else None)
    base_t = base if isinstance(base, Tensor) else None
    inputs = tuple(tensors) + ((base_t,) if base_t is not None else ())

    def backward(g):
        g2 = g.reshape(-1, out_f)  # (N, out)
        gl = g2  # the gradient of the LoRA branch: g_p c_p in DoRA's rows
        dBs, dA, du, dMs = [], None, None, []
        if Ms:  # dm_p, and g_p c_p (in a copy: g may be read elsewhere)
            gl = g2 * 1.0
            for rows, M, norm, z in zip(slices, Ms, norms, zs):
                dMs.append((g2[:, rows] * z).sum(0) / norm if M.requires_grad else None)
                gl[:, rows] *= M.data / norm
        if P:
            with span("lora_backward", "lora", parts=P, r=r):
                du = be.xp.empty_like(us)
                for p, (rows, B) in enumerate(zip(slices, Bs)):
                    gp = gl[:, rows]  # (N, out_p) view
                    dBs.append(be.gemm(gp, us[:, p * r:(p + 1) * r], trans_a=True) if B.requires_grad else None)
                    du[:, p * r:(p + 1) * r] = be.gemm(gp, B.data)
                du *= scaling
                dA = be.gemm(du, xa, trans_a=True) if A.requires_grad else None  # (P r, in)
        dx = None
        if x.requires_grad:
            Wd = _base_weight(base, be, weight_buffer)
            dx = be.gemm(gl if dropout_mask is None else g2, Wd)  # (N, in): the only GEMM the frozen base costs
            if P and dropout_mask is None:  # (without dropout DoRA's z_p holds x W_p^T: c_p g_p covers it)
                be.gemm_accumulate(dx, du, A.data)
            elif P:
                dxa = be.gemm(du, A.data)  # the dropped-out x's: the LoRA branch and DoRA's (c_p - 1) x_d W_p^T
                for rows, M in zip(slices, Ms):
                    be.gemm_accumulate(dxa, gl[:, rows] - g2[:, rows], Wd[rows])
                dx += dxa * dropout_mask
            dx = dx.reshape(x.shape)
        grads = [dx] + ([dA] if A is not None else []) + dBs + dMs
        if base_t is not None:
            grads.append(be.gemm(g2, x2, trans_a=True) if base_t.requires_grad else None)
        return tuple(grads)
    return result(y.reshape(x.shape[:-1] + (out_f,)), "lora_linear", inputs, backward)


class LoraProjection:
    """One fused projection with its base (Tensor or quantized: fused.Fused) and its parts' adapters; Llama calls
    it."""

    def __init__(self, name: str, base, parts: list, state: "Lora"):
        self.name, self.base, self.state = name, base, state
        self.targets = [t for t, _ in parts]
        self.slices = [rows for _, rows in parts]
        self.A, self.B, self.M = None, {}, {}  # M: DoRA's magnitudes, per target

    def __call__(self, x: Tensor) -> Tensor:
        s, mask = self.state, None
        if s.training and s.config.dropout > 0 and self.targets and is_grad_enabled():
            keep = s.rng.random(x.shape[:-1] + (x.shape[-1],)) >= s.config.dropout
            mask = x.backend.asarray((keep / (1.0 - s.config.dropout)).reshape(-1, x.shape[-1]), x.dtype)  # h2d
        return lora_linear(x, self.base, self.A, [self.B[t] for t in self.targets], self.slices,
                           s.config.scaling, mask, s.weight_buffer(self.base, x.backend),
                           [self.M[t] for t in self.targets if t in self.M])

    def parameters(self) -> list:
        return [] if self.A is None else [self.A] + [self.B[t] for t in self.targets] + \
            [self.M[t] for t in self.targets if t in self.M]

    @property
    def rng(self):
        """The Generator this projection's dropout draws from (None without dropout): checkpointing rewinds it."""
        return self.state.rng if self.state.config.dropout > 0 and self.targets else None

    def gemm_shapes(self, tokens: int) -> set:
        """(m, k, n) of the LoRA GEMMs of a step on `tokens` rows: u = x A^T, y_p += u_p B_p^T; backward
        dB_p = g_p^T u_p, du_p = g_p B_p, dA = du^T x, dx += du A (the base's are the model's)."""
        if self.A is None:
            return set()
        pr, d_in = self.A.shape
        shapes = {(tokens, d_in, pr), (pr, tokens, d_in), (tokens, pr, d_in)}
        for t in self.targets:
            d_out, r = self.B[t].shape
            shapes |= {(tokens, r, d_out), (d_out, tokens, r), (tokens, d_out, r)}
        return shapes

    def A_part(self, target: str) -> np.ndarray:
        r = self.state.config.r
        p = self.targets.index(target)
        return self.A.data[p * r:(p + 1) * r]

    def delta(self, target: str) -> np.ndarray:
        """scaling * B A for one part: (out_p, in), what merging adds to the base rows."""
        return self.state.config.scaling * (self.B[target].data @ self.A_part(target))

    def merged_rows(self, target: str, W_rows: np.ndarray) -> np.ndarray:
        """The part's rows of the merged weight from its base rows W_rows (out_p, in): W + s B A, and with DoRA
        scaled row by row to its magnitude, m / ||W + s B A||_row."""
        V = W_rows + self.delta(target)
        if target in self.M:
            V *= (self.M[target].data / ((V * V).sum(1)) ** 0.5)[:, None]
        return V


class Lora:
    """The adapters attached to a model: parameters, train/eval mode, the dropout RNG, merge."""

    def __init__(self, model, config: LoraConfig):
        self.model, self.config = model, config
        self.projections = {}  # fused parameter name -> LoraProjection
        self.training = True
        self.rng = np.random.default_rng(config.seed + 1)  # dropout masks
        self.head = None  # a classifier head read with the adapter (peft_io.load_adapter)
        self.weight_buffers = {}  # backend -> flat float32 array, the size of the largest quantized base seen

    def weight_buffer(self, base, be):
        """The (out, in) view of this Lora's one buffer on backend `be` that quantized `base` is dequantized
        into for each GEMM (None for a Tensor base): every such GEMM shares it, as only one runs at a time."""
        if isinstance(base, Tensor):
            return None
        n, key = math.prod(base.shape), (be.name, str(be.device))
        if key not in self.weight_buffers or self.weight_buffers[key].shape[0] < n:
            self.weight_buffers[key] = be.asarray(np.empty(n, np.float32))
        return self.weight_buffers[key][:n].reshape(base.shape)

    def named_parameters(self) -> list:
        out = []
        for name, proj in self.projections.items():
            if proj.A is not None:
                out.append((f"{name}.lora_A", proj.A))
                out += [(f"{name}.lora_B.{t}", proj.B[t]) for t in proj.targets]
                out += [(f"{name}.lora_magnitude.{t}", proj.M[t]) for t in proj.targets if t in proj.M]
        return out

    def parameters(self) -> list:
        return [t for _, t in self.named_parameters()]

    def train(self, flag: bool = True) -> "Lora":
        self.training = flag
        return self

    def state_dict(self) -> dict:
        """{name: host array} (a device's arrays are copied to the host, for checkpoints)."""
        return {n: t.numpy() for n, t in self.named_parameters()}

    def load_state_dict(self, state: dict, where: str = "lora") -> None:
        for n, t in self.named_parameters():
            arr = state.get(n)
            if arr is None or arr.shape != t.shape:
                raise FormatError(f"{where}: LoRA parameter {n} is missing or has shape "
                                  f"{None if arr is None else arr.shape}, expected {t.shape}")
            t.data = t.backend.asarray(np.array(arr, dtype=t.dtype))

    def merge(self) -> None:
        """Fold every adapter into its base weight (W[rows_p] += s B_p A_p; DoRA: scaled to m_p) and detach them all.
        A quantized base is dequantized first (merging into 4-bit codes would lose the delta)."""
        be = self.model.backend
        for name, proj in self.projections.items():
            W = be.to_numpy(_base_weight(proj.base, be)).astype(self.model.dtype)  # a copy
            for t, rows in zip(proj.targets, proj.slices):
                W[rows] = be.to_numpy(proj.merged_rows(t, be.asarray(W[rows]))).astype(W.dtype)
            self.model.params[name] = tensor(W, dtype=self.model.dtype, backend=be)
            self.model.adapters.pop(name, None)
        self.projections = {}


def freeze(model) -> None:
    """requires_grad=False on every base parameter: no dW work for them, only their dx."""
    for t in model.params.values():
        t.requires_grad = False
        t.grad = None


def attach_lora(model, config: LoraConfig, quantized: dict | None = None) -> Lora:
    """Freeze the model and attach LoRA adapters to every layer's target parts (PEFT init).

    quantized: {fused name: fused.Fused} bases (QLoRA); those projections get a LoraProjection even
    without targets, so their GEMMs dequantize on the fly.
    """
    c, quantized = model.config, quantized or {}
    freeze(model)
    lora = Lora(model, config)
    rng = np.random.default_rng(config.seed)
    for i in range(c.n_layers):
        for kind in PROJECTIONS:
            name = f"layers.{i}.{kind}"
            parts = []
            for t in config.targets:
                k, rows, in_f = part_rows(c, t)
                if k == kind:
                    out_f = rows.stop - rows.start
                    if config.r > min(in_f, out_f):
                        raise ConfigError(f"lora: rank {config.r} is larger than {t} ({name}: out {out_f}, "
                                         f"in {in_f}); use r <= {min(in_f, out_f)}")
                    parts.append((t, rows))
            base = quantized.get(name, model.params.get(name))
            if not parts and name not in quantized:
                continue
            proj = LoraProjection(name, base, parts, lora)
            in_f = base.shape[1]
            if parts:
                bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)) as torch.nn.Linear and PEFT
                proj.A = tensor(rng.uniform(-bound, bound, (len(parts) * config.r, in_f)), dtype=model.dtype,
                                requires_grad=True, backend=model.backend)
                for t, rows in parts:
                    proj.B[t] = tensor(np.zeros((rows.stop - rows.start, config.r)), dtype=model.dtype,
                                       requires_grad=True, backend=model.backend)
                if config.dora:  # m = ||W_p||_row, so step 0 is the base (B = 0)
                    W = model.backend.to_numpy(_base_weight(base, model.backend)).astype(np.float64)
                    for t, rows in parts:
                        proj.M[t] = tensor(np.sqrt((W[rows] ** 2).sum(1)), dtype=model.dtype, requires_grad=True,
                                           backend=model.backend)
            lora.projections[name] = proj
            model.adapters[name] = proj
    return lora
