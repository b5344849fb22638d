"""`fusegrad finetune` and `fusegrad merge`.

    fusegrad finetune --model stories15M.bin --tokenizer tokenizer.bin --data chat.jsonl --out runs/ft
    fusegrad finetune --config ft.yaml --lora_targets q,k,v,o --rank 16 --qlora
    fusegrad finetune --model hf_dir --data reviews.csv --task classify --num_classes 2 --out runs/cls
    fusegrad merge --model stories15M.bin --adapter runs/ft --out merged.bin
"""
from __future__ import annotations

import os

from fusegrad.cli.config import add_dataclass_args, config_from_args
from fusegrad.core.errors import ConfigError, FormatError
from fusegrad.finetune.peft_io import load_adapter
from fusegrad.finetune.trainer import FinetuneConfig, finetune
from fusegrad.models.llama import Llama

HELP = {"model": "base model: llama2.c .bin or Hugging Face directory",
        "data": "JSONL ({'text'} or {'prompt','completion'}; classify: {'text','label'}) or CSV with a header",
        "out": "directory for the PEFT adapter and the resumable state",
        "tokenizer": "'byte', a tokenizer file/dir (default: the one beside the model)",
        "task": "lm (next-token loss) or classify (head over a pooled hidden state)",
        "lora_targets": "comma list of q,k,v,o,gate,up,down (or HF names, or 'all')",
        "rank": "LoRA rank r", "alpha": "LoRA alpha (scaling alpha/r, or alpha/sqrt(r) with --rslora)",
        "qlora": "store the frozen base projections in NF4 (4-bit), dequantized per GEMM",
        "mask_prompt": "no loss on prompt tokens of prompt/completion records",
        "pooling": "classify: 'last' token or 'mean' over tokens",
        "resume": "continue from out/finetune_state.safetensors",
        "force": "overwrite an adapter already in --out"}


def _cmd_finetune(args) -> int:
    result = finetune(config_from_args(FinetuneConfig, args))
    acc = f", val accuracy {result['val_accuracy']:.3f}" if result.get("val_accuracy") is not None else ""
    val = f", val loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
    print(f"fine-tuned {result['step']} steps: train loss {result['loss']:.4f}{val}{acc}; adapter in {result['out']}")
    return 0


def merge(model_path, adapter_dir, out, fmt: str = "", force: bool = False) -> str:
    """Fold a PEFT adapter into its base and save a plain checkpoint (HF dir, or llama2.c .bin) -> format."""
    fmt = fmt or ("llama2c" if str(out).endswith(".bin") else "hf")
    if fmt not in ("hf", "llama2c"):
        raise ConfigError(f"merge: --format must be hf or llama2c, got {fmt!r}")
    target = os.path.join(out, "model.safetensors") if fmt == "hf" else out
    if os.path.exists(target) and not force:
        raise FormatError(f"{target}: already exists; pass --force to overwrite")
    model = Llama.from_pretrained(model_path)
    lora = load_adapter(adapter_dir, model)
    lora.merge()
    if fmt == "hf":
        model.save_pretrained(out)
    else:
        model.save_llama2c(out)
    return fmt


def _cmd_merge(args) -> int:
    fmt = merge(args.model, args.adapter, args.out, args.format, args.force)
    print(f"merged {args.adapter} into {args.model}: {args.out} ({fmt})")
    return 0


def add_parser(subparsers) -> None:
    """Register `finetune` and `merge` on the `fusegrad` command's subparsers."""
    p = subparsers.add_parser("finetune", help="LoRA/QLoRA fine-tune a pretrained model (lm or classify)",
                              description="Fine-tune a pretrained Llama with LoRA (or QLoRA: NF4 base) on "
                                          "JSONL/CSV data; saves a PEFT-compatible adapter in --out.")
    add_dataclass_args(p, FinetuneConfig, HELP)
    p.set_defaults(func=_cmd_finetune)

    p = subparsers.add_parser("merge", help="fold a LoRA adapter into its base and save a plain checkpoint")
    p.add_argument("--model", required=True, help=HELP["model"])
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    p.add_argument("--out", required=True, help="output: a directory (HF) or a .bin file (llama2.c)")
    p.add_argument("--format", default="", choices=["", "hf", "llama2c"], help="default: from --out's name")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_cmd_merge)
