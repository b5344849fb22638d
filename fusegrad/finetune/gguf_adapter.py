"""A LoRA adapter as llama.cpp's GGUF adapter: `llama-cli -m base.gguf --lora adapter.gguf`, Ollama's ADAPTER.

One pair per adapted module, named after the base file's tensor: blk.{i}.attn_q.weight.lora_a (r, in) and
.lora_b (out, r), B's rows in the base file's order (`gguf_rows`: fusegrad's for llama, Hugging Face's for
qwen2). llama.cpp scales B A by adapter.lora.alpha / r, so alpha is written as fusegrad's scaling x r (rsLoRA
included). Classification heads have no place in it.

>>> import tempfile, os
>>> from fusegrad.models import Llama
>>> from fusegrad.finetune.lora import LoraConfig, attach_lora
>>> lora = attach_lora(Llama.from_preset("tiny"), LoraConfig(targets=("q", "v"), r=4, alpha=8))
>>> path = os.path.join(tempfile.mkdtemp(), "a.gguf")
>>> write_gguf_adapter(lora, path)
['blk.0.attn_q.weight.lora_a', 'blk.0.attn_q.weight.lora_b', 'blk.0.attn_v.weight.lora_a', ...]
"""
from __future__ import annotations

import numpy as np

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.models.export import GGUF_PARTS, gguf_arch, gguf_file, gguf_rows

DTYPES = ("f32", "f16")


def write_gguf_adapter(lora, path, dtype: str = "f32") -> list:
    """Write `lora`'s adapters to `path` (atomically) -> the tensor names written."""
    import gguf

    if dtype not in DTYPES:
        raise ConfigError(f"export: a GGUF adapter holds {', '.join(DTYPES)} tensors, not {dtype!r}")
    if lora.head is not None:
        raise FormatError(f"export {path}: a classification head has no place in a llama.cpp adapter; merge it "
                          f"into a Hugging Face directory instead")
    if lora.config.dora:
        raise FormatError(f"export {path}: DoRA's magnitudes have no place in a llama.cpp adapter (B A only); "
                          f"merge the adapter (`fusegrad merge`) and export the merged model instead")
    c, host = lora.model.config, lora.model.backend.to_numpy
    names = []
    with gguf_file(path, gguf_arch(c)) as w:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, lora.config.scaling * lora.config.r)
        for name, proj in lora.projections.items():
            i = int(name.split(".")[1])
            for t in proj.targets:
                for side, a in (("a", host(proj.A_part(t))), ("b", gguf_rows(c, t, host(proj.B[t].data)))):
                    a = np.ascontiguousarray(a, dtype=np.float32)
                    if not np.isfinite(a).all():
                        raise FormatError(f"export {path}: the {t} adapter of layer {i} holds NaN or inf")
                    names.append(f"blk.{i}.{GGUF_PARTS[t]}.weight.lora_{side}")
                    w.add_tensor(names[-1], a if dtype == "f32" else a.astype(np.float16))
    return names
