"""`fusegrad finetune` and `fusegrad merge`.

    fusegrad finetune --model stories15M.bin --tokenizer tokenizer.bin --data chat.jsonl --out runs/ft
    fusegrad finetune --config ft.yaml --lora_targets q,k,v,o --rank 16 --qlora
    fusegrad finetune --model hf_dir --data reviews.csv --task classify --num_classes 2 --out runs/cls
    fusegrad merge --model stories15M.bin --adapter runs/ft --out merged.bin      # = fusegrad export --adapter
"""
from __future__ import annotations

from fusegrad.cli.config import add_dataclass_args, config_from_args
from fusegrad.cli.export import DTYPES, FORMATS, export
from fusegrad.finetune.trainer import FinetuneConfig, finetune

HELP = {"model": "base model: llama2.c .bin or Hugging Face directory",
        "data": "JSONL ({'text'}, {'prompt','completion'} or chat {'messages': [{'role','content'}, ...]}: loss on "
                "the assistant turns; classify: {'text','label'}) or CSV with a header",
        "out": "directory for the PEFT adapter and the resumable state",
        "tokenizer": "'byte', a tokenizer file/dir (default: the one beside the model)",
        "force_tokenizer": "use --tokenizer byte on a model whose vocabulary is not bytes (its ids mean other tokens)",
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


def _cmd_merge(args) -> int:
    fmt = export(args.model, args.out, args.format, args.adapter, dtype=args.dtype, force=args.force)
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
    p.add_argument("--out", required=True, help="output: a directory (hf), a .bin (llama2c) or a .gguf file")
    p.add_argument("--format", default="", choices=("",) + FORMATS, help="default: from --out's name")
    p.add_argument("--dtype", default="", choices=("",) + DTYPES, help="gguf tensor type (default f16)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_cmd_merge)
