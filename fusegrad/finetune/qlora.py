"""QLoRA: every projection of the frozen base stored in NF4 (bitsandbytes' layout, double-quantized
scales, fusegrad.quant.nf4), dequantized on the fly for each GEMM (span "nf4_dequantize"), LoRA on top.

The fp32 projection weights are dropped from `model.params`; embeddings, norms and the classifier stay
fp32 (as in QLoRA, where only Linear layers are 4-bit). Only a transient fp32 copy of one projection
exists at a time, during its GEMM.

>>> from fusegrad.models import Llama
>>> from fusegrad.finetune.lora import LoraConfig
>>> model = Llama.from_preset("tiny", seed=0)
>>> lora, report = attach_qlora(model, LoraConfig(targets=("q", "v"), r=4))
>>> report["ratio"] <= 0.16, "layers.0.wqkv" in model.params
(True, False)
"""
from __future__ import annotations

from fusegrad.finetune.lora import PROJECTIONS, LoraConfig, attach_lora
from fusegrad.quant.nf4 import quantize_nf4


def quantize_projections(model, blocksize: int = 64, double_quant: bool = True) -> tuple:
    """-> ({fused name: NF4Tensor}, report) and removes those weights from model.params.

    report: {"fp32_bytes", "nf4_bytes", "ratio"} over the quantized weights (packed codes + all scales).
    """
    quantized = {}
    for i in range(model.config.n_layers):
        for kind in PROJECTIONS:
            name = f"layers.{i}.{kind}"
            quantized[name] = quantize_nf4(model.params.pop(name).numpy(), blocksize, double_quant)
    fp32 = sum(4 * q.size for q in quantized.values())
    nf4 = sum(q.nbytes for q in quantized.values())
    return quantized, {"fp32_bytes": fp32, "nf4_bytes": nf4, "ratio": nf4 / fp32}


def attach_qlora(model, config: LoraConfig, blocksize: int = 64, double_quant: bool = True) -> tuple:
    """Quantize the projections to NF4, freeze the rest, attach LoRA -> (Lora, memory report)."""
    quantized, report = quantize_projections(model, blocksize, double_quant)
    return attach_lora(model, config, quantized=quantized), report
