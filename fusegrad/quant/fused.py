"""A frozen fused projection (fusegrad's q/k/v in one weight, gate/up in one) kept as its Hugging Face modules'
quantized parts, each on its own: NF4 as bitsandbytes packs a module (nf4.FusedNF4), or the blocks a GGUF file
stores (ggml.FusedGGML; the parts of one projection may differ in type). Dequantizing puts every part's rows in
the fused layout; `dequantize_on(backend, out)` runs the backend kernel of the subclass's format.

A part has .shape (rows, cols), .size, .nbytes, .format (its type's name), .dequantize() and .dequantize_into(out).
"""
from __future__ import annotations

import numpy as np


class Fused:
    """parts [(part, unpermute or None)]: unpermute maps a part's dequantized rows (out_p, in) to their order in
    the fused weight. `span`: the trace span of one dequantization (fusegrad.finetune.lora)."""
    span = "dequantize"

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = (sum(q.shape[0] for q, _ in parts), parts[0][0].shape[1])

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for q, _ in self.parts)

    def formats(self) -> dict:
        """{format name: bytes held in it}: what the memory report lists."""
        out = {}
        for q, _ in self.parts:
            out[q.format] = out.get(q.format, 0) + q.nbytes
        return out

    def dequantize_on(self, backend, out=None):
        """The float32 (out, in) weight as `backend`'s array, through its kernel, into `out` when given."""
        raise NotImplementedError

    def dequantize_with(self, dequantize_part, concatenate):
        """The fused weight from each part's dequantize_part(part) (e.g. a device backend's kernel)."""
        return concatenate([dequantize_part(q) if f is None else f(dequantize_part(q)) for q, f in self.parts])

    def dequantize(self) -> np.ndarray:
        """float32 (out, in): every part dequantized and put in the fused layout (the host reference)."""
        out = np.empty(self.shape, np.float32)
        lo = 0
        for q, unpermute in self.parts:
            rows = out[lo:lo + q.shape[0]]
            if unpermute is None:
                q.dequantize_into(rows)
            else:
                rows[...] = unpermute(q.dequantize())
            lo += q.shape[0]
        return out
