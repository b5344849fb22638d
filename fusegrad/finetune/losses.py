"""Fine-tuning losses: next-token cross-entropy on selected rows only, and a classifier head.

`masked_classifier_cross_entropy` gathers the rows whose target counts (completion tokens) and runs
the backend's chunked classifier cross-entropy on them alone: prompt rows cost no classifier GEMM and
the (N, V) logits never exist. Its value is sum over selected rows / `denominator`, so the groups of
one step (see data.group_by_length) add up to the mean over all the step's loss tokens.

>>> import fusegrad as fg, numpy as np
>>> h = fg.tensor(np.eye(2, 3), requires_grad=True); w = fg.tensor(np.eye(3))
>>> loss = masked_classifier_cross_entropy(h, w, np.array([0, 2]), np.array([False, True]), denominator=1)
>>> loss.backward(); h.grad[0].tolist()   # the masked row gets no gradient
[0.0, 0.0, 0.0]
"""
from __future__ import annotations

import numpy as np

from fusegrad import ops
from fusegrad.core.errors import ConfigError, ShapeError
from fusegrad.core.tensor import Tensor, is_grad_enabled
from fusegrad.core.trace import span
from fusegrad.ops._util import check_float, result
from fusegrad.ops.llama import logits_chunk_rows


def masked_classifier_cross_entropy(h: Tensor, weight: Tensor, targets, mask, denominator: int,
                                    chunk: int | None = None) -> Tensor:
    """h (N, C), weight (V, C), targets (N,) int, mask (N,) bool -> sum of CE over masked rows / denominator."""
    check_float("masked_classifier_cross_entropy", ("h", h), ("weight", weight))
    targets, mask = np.asarray(targets).reshape(-1), np.asarray(mask, bool).reshape(-1)
    if h.ndim != 2 or targets.shape != (h.shape[0],) or mask.shape != (h.shape[0],):
        raise ShapeError(f"masked_classifier_cross_entropy: need h (N, C), targets (N,), mask (N,); got h {h.shape}, "
                         f"targets {targets.shape}, mask {mask.shape}")
    rows = np.flatnonzero(mask)
    if rows.size == 0:
        raise ShapeError("masked_classifier_cross_entropy: the mask selects no row")
    t = targets[rows]
    if t.min() < 0 or t.max() >= weight.shape[0]:
        raise ShapeError(f"masked_classifier_cross_entropy: target outside [0, {weight.shape[0]})")
    need_dh = is_grad_enabled() and h.requires_grad
    need_dw = is_grad_enabled() and weight.requires_grad
    be = h.backend
    with span("masked_classifier_cross_entropy", "classifier", N=rows.size, V=weight.shape[0]):
        rows_d = be.asarray(rows)  # h2d, with the targets
        mean, dh_sel, dw = be.classifier_cross_entropy(h.data[rows_d], weight.data, t,
                                                       chunk or logits_chunk_rows(weight.shape[0]), need_dh, need_dw)
    frac = rows.size / denominator  # mean over selected rows -> share of the step's mean

    def backward(g):
        scale = g.reshape(()) * frac
        dh = None
        if dh_sel is not None:
            dh = be.xp.zeros_like(h.data)
            dh[rows_d] = dh_sel * scale
        return dh, (dw * scale if dw is not None else None)
    return result(be.asarray(mean * frac, weight.dtype), "masked_classifier_cross_entropy", (h, weight), backward)


def lm_loss(model, tokens, mask, denominator: int) -> Tensor:
    """Next-token loss of tokens (B, T+1) on the targets that mask (B, T) selects: their sum / denominator."""
    h = model.hidden(tokens[:, :-1])  # (B, T, C)
    return masked_classifier_cross_entropy(h.reshape(-1, model.config.dim), model.classifier,
                                           tokens[:, 1:].reshape(-1), mask.reshape(-1), denominator)


def group_loss(model, head, tokens, mask, denominator, labels=None, pooling: str = "last") -> tuple:
    """One equal-length group -> (its share of the step's mean loss, the class logits (B, K) or None): the
    masked next-token loss of tokens (B, T+1), or with a classifier head (K, C) the cross-entropy of the
    pooled hidden states of tokens (B, T) against labels (B,)."""
    if head is None:
        return lm_loss(model, tokens, mask, denominator), None
    logits = ops.matmul_nt(pool(model.hidden(tokens), pooling), head)  # (B, K)
    return ops.cross_entropy(logits, labels) * (len(labels) / denominator), logits


def pool(h: Tensor, how: str = "last") -> Tensor:
    """h (B, T, C) -> (B, C): the last token's state (no padding exists in a group) or the mean over T."""
    if how == "last":
        return h[:, h.shape[1] - 1, :]
    if how == "mean":
        return h.mean(axis=1)
    raise ConfigError(f"pool: pooling must be 'last' or 'mean', got {how!r}")
