"""fusegrad: train Llama-family transformers with explicit, fused backward passes.

>>> import fusegrad as fg
>>> x = fg.tensor([[1.0, 2.0]], requires_grad=True)
>>> w = fg.tensor([[3.0], [4.0]], requires_grad=True)
>>> (x @ w).sum().backward()
>>> w.grad.ravel().tolist()
[1.0, 2.0]
"""
__version__ = "0.1.0"

from fusegrad.core.errors import (BackendError, ConfigError, FormatError, FusegradError, GraphError,  # noqa: E402
                                  ShapeError, StorageError)
from fusegrad.core.tensor import Tensor, is_grad_enabled, no_grad, tensor  # noqa: E402
from fusegrad.core.trace import TRACER, trace  # noqa: E402
from fusegrad import backends  # noqa: E402
from fusegrad.backends import gemm_offload, prewarm, use_backend  # noqa: E402
from fusegrad.ops import *  # noqa: E402,F401,F403
