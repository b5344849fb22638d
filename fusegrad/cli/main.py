"""The `fusegrad` command: train | sample | chat | perplexity | prepare | finetune | merge | export | bench | info |
doctor.

    fusegrad train                      # trains a small model on text every Python install has
    fusegrad train --config run.yaml --lr 1e-3 --max_steps 2000
    fusegrad train --init_from hf_dir --data my_texts/    # continued pretraining of a downloaded model
    fusegrad sample --checkpoint runs/default --prompt "The list"
    fusegrad sample --checkpoint hf_dir --chat --prompt "What is a list?"
    fusegrad chat --checkpoint hf_dir   # a conversation, a turn a line of stdin
    fusegrad prepare my_texts/ --out data/mine --tokenizer bpe --vocab_size 4096
    fusegrad info runs/default
    fusegrad doctor                     # every Neural Engine kernel once, against ane-sim: a pasteable report
"""
from __future__ import annotations

import argparse
import difflib
import sys

import numpy as np

from fusegrad.backends import available_backends, get_backend
from fusegrad.backends.ane.doctor import doctor, format_report
from fusegrad.backends.openblas import blas_info
from fusegrad.cli import bench, export, finetune, perplexity, sample
from fusegrad.cli.config import add_dataclass_args, config_from_args
from fusegrad.core.errors import BackendError, FusegradError
from fusegrad.data.prepare import prepare
from fusegrad.data.sources import DEFAULT_SEPARATOR
from fusegrad.train.trainer import TrainConfig, load_model, train


def version() -> str:
    """fusegrad's version, from the top package (imported before any module in it)."""
    return sys.modules["fusegrad"].__version__


def _cmd_train(args) -> int:
    train(config_from_args(TrainConfig, args))
    return 0


def _cmd_prepare(args) -> int:
    meta = prepare(args.inputs or None, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, overwrite=args.overwrite, text_field=args.text_field,
                   separator=args.separator, progress=True)
    print(f"prepared {meta.get('tokens', '?')} tokens from {meta['documents']} documents into {args.out} "
          f"(tokenizer {meta['tokenizer']['kind']}, vocab {meta['vocab_size']})")
    return 0


def usable_backends() -> list:
    """The registered backends that start on this machine (a GPU or the ANE only where one is present)."""
    usable = []
    for name in available_backends():
        try:
            get_backend(name)
        except (BackendError, ImportError):
            continue
        usable.append(name)
    return usable


def _cmd_info(args) -> int:
    blas = blas_info()
    print(f"fusegrad {version()}, numpy {np.__version__}")
    print(f"backends usable here: {', '.join(usable_backends())}")
    print(f"float32 GEMMs: OpenBLAS {blas['blas_core'] or 'not found (numpy uses another BLAS)'} kernels"
          + (f", forced by OPENBLAS_CORETYPE={blas['openblas_coretype_env']}" if blas["openblas_coretype_env"] else ""))
    if args.path:
        model, tokenizer = load_model(args.path)
        print(f"model: {model.config}")
        print(f"parameters: {model.num_params():,}")
        print(f"tokenizer: {tokenizer.to_json() if tokenizer else 'none found'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusegrad", description="Train Llama-family models with fused, "
                                     "explicit backward passes.")
    parser.add_argument("--version", action="version", version=f"fusegrad {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="pre-train a model (no arguments: a small model on the embedded corpus)",
                       description="Pre-train a Llama model. With no arguments: a 0.8M-parameter model on "
                                   "CPython's documentation text, a few minutes on a laptop CPU.")
    add_dataclass_args(p, TrainConfig)
    p.set_defaults(func=_cmd_train)

    sample.add_parser(sub)
    perplexity.add_parser(sub)

    p = sub.add_parser("prepare", help="tokenize text datasets into training shards")
    p.add_argument("inputs", nargs="*", help="files or directories: .txt, .jsonl, .json, .parquet, .arrow, compressed "
                                             "(.gz .bz2 .xz .zst) or in tar archives (none: the embedded corpus)")
    p.add_argument("--out", default="data", help="output directory")
    p.add_argument("--tokenizer", default="byte", help="byte, bpe, or a tokenizer file/dir")
    p.add_argument("--vocab_size", "--vocab-size", type=int, default=None)
    p.add_argument("--val_fraction", "--val-fraction", type=float, default=0.1)
    p.add_argument("--overwrite", action="store_true", help="replace data a previous prepare left in --out")
    p.add_argument("--text_field", "--text-field", default="text",
                   help="the JSON field or Parquet/Arrow column holding a record's text (default text)")
    p.add_argument("--separator", default=DEFAULT_SEPARATOR,
                   help="text between documents in a text file (default <|endoftext|>; '' : a file is one "
                        "document; '\\n\\n': each paragraph)")
    p.set_defaults(func=_cmd_prepare)

    finetune.add_parser(sub)
    export.add_parser(sub)
    bench.add_parser(sub)

    p = sub.add_parser("info", help="describe the installation, or a checkpoint/model")
    p.add_argument("path", nargs="?", help="a run dir, checkpoint, HF dir, .gguf or llama2.c .bin")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("doctor", help="run every Neural Engine kernel once (on the ANE of a Mac, else on ane-sim) "
                                      "and print a report to paste into a bug report; exit 1 if a kernel failed")
    p.set_defaults(func=_cmd_doctor)
    return parser


def _cmd_doctor(args) -> int:
    report = doctor()
    print(format_report(report))
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's own message, with the option each unknown one was probably meant to be
        command = parser._subparsers._group_actions[0].choices.get(args.command) if args.command else parser
        known = [o for action in command._actions for o in action.option_strings]
        hints = [f"{u} (did you mean {m[0]}?)" for u in unknown
                 for m in [difflib.get_close_matches(u.split("=")[0], known, 1)] if u.startswith("-") and m]
        command.error("unrecognized arguments: " + " ".join(unknown) + ("; " + ", ".join(hints) if hints else ""))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except FusegradError as exc:
        print(f"fusegrad {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fusegrad {args.command}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
