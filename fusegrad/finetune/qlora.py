"""QLoRA: every projection of the frozen base stored in NF4 as bitsandbytes stores each Hugging Face module
(q, k, v, o, gate, up, down quantized each on its own, double-quantized scales; fusegrad.quant.nf4),
dequantized on the fly for each GEMM (span "nf4_dequantize") into one float32 buffer the Lora keeps (the
size of the largest projection), LoRA on top.

Embeddings, norms and the classifier stay fp32 (as in QLoRA, where only Linear layers are 4-bit). Load
with `Llama.from_pretrained(path, quantize="nf4")` and the fp32 projections never exist: each module is
quantized as it is read. A model already in memory is quantized here, projection by projection.

>>> from fusegrad.models import Llama
>>> from fusegrad.finetune.lora import LoraConfig
>>> model = Llama.from_preset("tiny", seed=0)
>>> lora, report = attach_qlora(model, LoraConfig(targets=("q", "v"), r=4))
>>> report["ratio"] <= 0.16, "layers.0.wqkv" in model.params
(True, False)
"""
from __future__ import annotations

from fusegrad.finetune.lora import PROJECTIONS, LoraConfig, attach_lora
from fusegrad.models.hf_names import quantize_parts, split_to_hf


def quantize_projections(model, blocksize: int = 64, double_quant: bool = True) -> tuple:
    """-> ({fused name: FusedNF4}, report); moves the projection weights from model.params to
    model.quantized (those already there stay).

    report: {"fp32_bytes", "nf4_bytes", "ratio"} over the quantized weights (packed codes + all scales).
    """
    c = model.config
    for i in range(c.n_layers):
        for kind in PROJECTIONS:
            name = f"layers.{i}.{kind}"
            if name not in model.quantized:
                parts = [a for _, a in split_to_hf(c, kind, model.params.pop(name).numpy())]
                model.quantized[name] = quantize_parts(c, kind, parts, blocksize, double_quant)
    fp32 = sum(4 * q.size for q in model.quantized.values())
    nf4 = sum(q.nbytes for q in model.quantized.values())
    return dict(model.quantized), {"fp32_bytes": fp32, "nf4_bytes": nf4, "ratio": nf4 / fp32}


def attach_qlora(model, config: LoraConfig, blocksize: int = 64, double_quant: bool = True) -> tuple:
    """Quantize the projections to NF4 (unless loaded so), freeze the rest, attach LoRA -> (Lora, report)."""
    quantized, report = quantize_projections(model, blocksize, double_quant)
    return attach_lora(model, config, quantized=quantized), report
