"""Losses built from the primitive ops (the unfused references for the fused kernels).

>>> import fusegrad as fg
>>> logits = fg.tensor([[2.0, 0.0], [0.0, 2.0]])
>>> round(fg.cross_entropy(logits, fg.tensor([0, 1])).item(), 4)
0.1269
"""
from __future__ import annotations

import numpy as np

from fusegrad.core.errors import ShapeError
from fusegrad.core.tensor import Tensor
from fusegrad.ops.reduce import log_softmax, mean
from fusegrad.ops.shape import getitem


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of integer `targets` (N,) under `logits` (N, V)."""
    if logits.ndim != 2:
        raise ShapeError(f"cross_entropy: logits must be (N, V), got shape {logits.shape}")
    t = targets.data if isinstance(targets, Tensor) else targets
    t = np.asarray(t)
    if t.shape != logits.shape[:1] or not np.issubdtype(t.dtype, np.integer):
        raise ShapeError(f"cross_entropy: targets must be integers of shape ({logits.shape[0]},), "
                         f"got {t.dtype} {t.shape}")
    bad = (t < 0) | (t >= logits.shape[1])
    if bad.any():
        raise ShapeError(f"cross_entropy: target id {int(t[bad][0])} is outside [0, {logits.shape[1]})")
    logp = log_softmax(logits, axis=-1)
    picked = getitem(logp, (np.arange(t.shape[0]), t))
    return -mean(picked)
