"""`fusegrad finetune` and `fusegrad merge`.

    fusegrad finetune --model stories15M.bin --tokenizer tokenizer.bin --data chat.jsonl --out runs/ft
    fusegrad finetune --config ft.yaml --lora_targets q,k,v,o --rank 16 --qlora
    fusegrad finetune --model hf_dir --data reviews.csv --task classify --num_classes 2 --out runs/cls
    fusegrad merge --model stories15M.bin --adapter runs/ft --out merged.bin      # = fusegrad export --adapter
"""
from __future__ import annotations

from fusegrad.cli.config import SETTINGS, add_dataclass_args, config_from_args
from fusegrad.cli.export import DTYPES, FORMATS, export
from fusegrad.finetune.trainer import FinetuneConfig, finetune


def _cmd_finetune(args) -> int:
    result = finetune(config_from_args(FinetuneConfig, args))
    acc = f", val accuracy {result['val_accuracy']:.3f}" if result.get("val_accuracy") is not None else ""
    val = f", val loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
    print(f"fine-tuned {result['step']} steps: train loss {result['loss']:.4f}{val}{acc}; adapter in {result['out']}")
    return 0


def _cmd_merge(args) -> int:
    fmt = export(args.model, args.out, args.format, args.adapter, dtype=args.dtype, force=args.force)
    print(f"merged {args.adapter} into {args.model}: {args.out} ({fmt})")
    return 0


def add_parser(subparsers) -> None:
    """Register `finetune` and `merge` on the `fusegrad` command's subparsers."""
    p = subparsers.add_parser("finetune", help="LoRA/QLoRA fine-tune a pretrained model (lm or classify)",
                              description="Fine-tune a pretrained Llama with LoRA (or QLoRA: NF4 base) on "
                                          "records (JSONL, JSON, Parquet, Arrow, CSV); saves a PEFT-compatible "
                                          "adapter in --out.")
    add_dataclass_args(p, FinetuneConfig)
    p.set_defaults(func=_cmd_finetune)

    p = subparsers.add_parser("merge", help="fold a LoRA adapter into its base and save a plain checkpoint")
    p.add_argument("--model", required=True, help=SETTINGS["model"][0])
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    p.add_argument("--out", required=True, help="output: a directory (hf), a .bin (llama2c) or a .gguf file")
    p.add_argument("--format", default="", choices=("",) + tuple(f for f in FORMATS if f != "gguf-lora"),
                   help="default: from --out's name")
    p.add_argument("--dtype", default="", choices=("",) + DTYPES, help="gguf tensor type (default f16)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_cmd_merge)
