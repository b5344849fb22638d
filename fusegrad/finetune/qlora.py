"""QLoRA: every projection of the frozen base stored in NF4 as bitsandbytes stores each Hugging Face module
(q, k, v, o, gate, up, down quantized each on its own, double-quantized scales; fusegrad.quant.nf4),
dequantized on the fly for each GEMM (span "nf4_dequantize") into one float32 buffer the Lora keeps (the
size of the largest projection), LoRA on top. A GGUF file whose projections are quantized (Q8_0 ... Q6_K)
keeps its own blocks instead (fusegrad.quant.ggml, span "ggml_dequantize"): no second quantization.

Embeddings, norms and the classifier stay fp32 (as in QLoRA, where only Linear layers are 4-bit). Load
with `Llama.from_pretrained(path, quantize="auto")` (or "nf4": NF4 even for a GGUF file's blocks) and the
fp32 projections never exist: each module is quantized (or its blocks copied) as it is read. A model
already in memory is quantized here, projection by projection.

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
from fusegrad.quant.nf4 import nf4_nbytes


def quantize_projections(model, blocksize: int = 64, double_quant: bool = True) -> tuple:
    """-> ({fused name: quantized base}, report); moves the projection weights from model.params to
    model.quantized as NF4 (those already there, NF4 or a GGUF file's blocks, stay).

    report over the quantized weights (packed codes + all scales): "fp32_bytes"; "base_bytes" held; "nf4_bytes"
    what NF4 takes (or would: the same weights in NF4); "ratio" base / fp32; "formats" {format: bytes held}.
    """
    c = model.config
    for i in range(c.n_layers):
        for kind in PROJECTIONS:
            name = f"layers.{i}.{kind}"
            if name not in model.quantized:
                parts = [a for _, a in split_to_hf(c, kind, model.params.pop(name).numpy())]
                model.quantized[name] = quantize_parts(c, kind, parts, blocksize, double_quant)
    bases = model.quantized.values()
    fp32, held = sum(4 * q.size for q in bases), sum(q.nbytes for q in bases)
    formats = {}
    for q in bases:
        for f, n in q.formats().items():
            formats[f] = formats.get(f, 0) + n
    nf4 = sum(nf4_nbytes(p.size, blocksize, double_quant) for q in bases for p, _ in q.parts)
    return dict(model.quantized), {"fp32_bytes": fp32, "base_bytes": held, "nf4_bytes": nf4, "ratio": held / fp32,
                                   "formats": formats}


def describe_base(report: dict) -> str:
    """One line for a run's log: which format the frozen base kept, its bytes against fp32 and NF4.

    >>> describe_base({"fp32_bytes": 800, "base_bytes": 150, "nf4_bytes": 104, "formats": {"Q4_1": 100, "Q6_K": 50}})
    'frozen base projections: Q4_1 100 B + Q6_K 50 B = 150 B, 0.188x fp32 (800 B), 1.44x NF4 (104 B)'
    """
    held, fp32, nf4 = report["base_bytes"], report["fp32_bytes"], report["nf4_bytes"]
    parts = " + ".join(f"{f} {n:,} B" for f, n in sorted(report["formats"].items(), key=lambda kv: -kv[1]))
    total = f" = {held:,} B" if len(report["formats"]) > 1 else ""
    return (f"frozen base projections: {parts}{total}, {held / fp32:.3f}x fp32 ({fp32:,} B), "
            f"{held / nf4:.2f}x NF4 ({nf4:,} B)")


def attach_qlora(model, config: LoraConfig, blocksize: int = 64, double_quant: bool = True) -> tuple:
    """Quantize the projections to NF4 (unless loaded so), freeze the rest, attach LoRA -> (Lora, report)."""
    quantized, report = quantize_projections(model, blocksize, double_quant)
    return attach_lora(model, config, quantized=quantized), report
