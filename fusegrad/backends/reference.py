"""Reference implementations of the fused kernels, in plain numpy.

Each is the oracle its faster versions (JIT CPU, torch, Neural Engine) are tested against. Shapes in
comments: B batch, T time, C channels, H heads, D head size, V vocabulary.
"""
from __future__ import annotations

import numpy as np
