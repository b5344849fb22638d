"""`fusegrad export` (and `fusegrad merge`, the same code with an adapter): a run, a checkpoint, or a base model
with a LoRA adapter folded in, written as a Hugging Face directory, a llama2.c `.bin` or a GGUF file; or the
adapter alone as llama.cpp's GGUF LoRA adapter (gguf-lora).

    fusegrad export runs/default --format gguf --out model.gguf --dtype q8_0
    fusegrad export runs/default --out model-Q4_K_M.gguf --dtype q4_k_m   # llama-quantize's Q4_K_M, byte for byte
    fusegrad export runs/default --out model-Q3_K_M.gguf --dtype q3_k_m   # also q2_k, q3_k_s/l, q4_k_s, q5_k_*, q6_k
    fusegrad export hf_dir --adapter runs/ft --format llama2c --out merged.bin
    fusegrad export runs/ft --out merged_hf      # an adapter dir alone: its base_model_name_or_path, merged
    fusegrad export runs/ft --format gguf-lora --out ft-lora.gguf   # for llama.cpp's --lora, beside the base GGUF
"""
from __future__ import annotations

import os

from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.data.tokenizer import tokenizer_for_model
from fusegrad.finetune.gguf_adapter import write_gguf_adapter
from fusegrad.finetune.peft_io import adapter_base_model, load_adapter
from fusegrad.models.export import GGUF_DTYPES, export_model
from fusegrad.models.generate import declared_sampling
from fusegrad.train.trainer import load_model

FORMATS = ("hf", "llama2c", "gguf", "gguf-lora")
DTYPES = GGUF_DTYPES  # gguf's tensor types and llama.cpp's K-quant mixes (an adapter: f32, f16)


def export(src, out, fmt: str = "", adapter: str = "", tokenizer: str = "", dtype: str = "",
           force: bool = False) -> str:
    """Write the model at `src` (with `adapter` merged) to `out` in `fmt` (default: from out's name: .bin ->
    llama2c, .gguf -> gguf, else an hf directory), its tokenizer beside it -> the format written."""
    out = os.fspath(out)
    fmt = fmt or ("llama2c" if out.endswith(".bin") else "gguf" if out.endswith(".gguf") else "hf")
    if fmt not in FORMATS:
        raise ConfigError(f"export: --format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype and (not fmt.startswith("gguf") or dtype not in DTYPES):
        raise ConfigError(f"export: --dtype is gguf's tensor type ({', '.join(DTYPES)}), got {dtype!r} for {fmt}")
    target = os.path.join(out, "config.json") if fmt == "hf" else out
    if os.path.exists(target) and not force:
        raise FormatError(f"{target}: already exists; pass --force to overwrite")
    if fmt == "gguf-lora":
        _, _, _, lora = load_adapted(src, adapter)
        if lora is None:
            raise ConfigError(f"export: gguf-lora writes an adapter; {src} is not an adapter directory (or pass "
                              f"--adapter)")
        write_gguf_adapter(lora, out, dtype or "f32")
        return fmt
    model, own, src = load_merged(src, adapter)
    tok = tokenizer_for_model(src, model.config.vocab_size, own, tokenizer) if tokenizer or own else None
    export_model(model, out, fmt, tokenizer=tok, dtype=dtype or None, sampling=declared_sampling(src))
    return fmt


def load_adapted(src, adapter: str = ""):
    """-> (model, its own tokenizer or None, the model's path, its Lora or None): the model at `src` with
    `adapter` attached; `src` an adapter directory alone loads the base model its adapter_config.json names."""
    base = None if adapter else adapter_base_model(src)
    if base is not None:
        src, adapter = base, src
    model, own = load_model(src)
    return model, own, src, load_adapter(adapter, model) if adapter else None


def load_merged(src, adapter: str = ""):
    """`load_adapted`, with the adapter folded into the weights -> (model, its own tokenizer or None, its path)."""
    model, own, src, lora = load_adapted(src, adapter)
    if lora is not None:
        lora.merge()
    return model, own, src


def _cmd_export(args) -> int:
    fmt = export(args.src, args.out, args.format, args.adapter, args.tokenizer, args.dtype, args.force)
    print(f"exported {args.src}{' + ' + args.adapter if args.adapter else ''}: {args.out} ({fmt})")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a run, checkpoint or base + adapter as HF, llama2.c or GGUF")
    p.add_argument("src",
                   help="run dir, checkpoint.safetensors, HF dir, .gguf, llama2.c .bin, or a fine-tune's adapter dir")
    p.add_argument("--out", required=True, help="output: a directory (hf), a .bin (llama2c) or a .gguf file (gguf, "
                                                "gguf-lora)")
    p.add_argument("--format", default="", choices=("",) + FORMATS, help="default: from --out's name")
    p.add_argument("--dtype", default="", choices=("",) + DTYPES,
                   help="gguf tensor type (f32 f16 bf16 q8_0 q5_0 q4_0; default f16) or a llama.cpp K-quant file type "
                        "as llama-quantize writes it (q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k)")
    p.add_argument("--adapter", default="", help="a PEFT LoRA adapter dir to merge into the weights first")
    p.add_argument("--tokenizer", default="", help="tokenizer file/dir, when none lies beside the model")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_cmd_export)
