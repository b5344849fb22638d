"""`fusegrad perplexity`: how well a model predicts a text, as llama.cpp's llama-perplexity reports it.

    fusegrad perplexity --checkpoint hf_dir --data wiki.test.raw --seq_len 512
    fusegrad perplexity --checkpoint runs/default --data runs/default/data          # a prepared dir: its val part
    fusegrad perplexity --checkpoint hf_dir --adapter runs/chat --data notes/ --max_tokens 20000
"""
from __future__ import annotations

import os
import tempfile

from fusegrad.cli.sample import model_and_tokenizer, model_options
from fusegrad.core.errors import FormatError
from fusegrad.data.prepare import prepare
from fusegrad.data.shards import META_FILE, TokenDataset
from fusegrad.data.sources import DEFAULT_SEPARATOR
from fusegrad.data.tokenizer import load_tokenizer
from fusegrad.train.perplexity import perplexity

PROBE = "The quick brown fox, 1234 naïve cafés — 日本語!\n\tdef f(x): return x"  # ids that tell tokenizers apart


def _cmd_perplexity(args) -> int:
    model, tokenizer, path = model_and_tokenizer(args)
    seq_len = args.seq_len or min(model.config.max_seq_len, 512)
    with tempfile.TemporaryDirectory(prefix="fusegrad-perplexity-") as tmp:
        if os.path.isfile(os.path.join(args.data, META_FILE)):  # shards `fusegrad prepare` made
            theirs = load_tokenizer(args.data)
            if theirs.encode(PROBE) != tokenizer.encode(PROBE) or theirs.vocab_size != tokenizer.vocab_size:
                raise FormatError(f"{args.data}: its tokens were made by another tokenizer "
                                  f"({getattr(theirs, 'source', theirs.kind)}) than the model's "
                                  f"({getattr(tokenizer, 'source', tokenizer.kind)}); give the text instead")
            data = TokenDataset(args.data, seq_len, args.split, vocab_size=model.config.vocab_size)
        else:  # text, datasets, llama2.c's shards: tokenized (or checked) with the model's tokenizer first
            meta = prepare(args.data, tmp, tokenizer=tokenizer, val_fraction=0.0, text_field=args.text_field,
                           separator=args.separator)
            data = TokenDataset(tmp, seq_len, "val" if meta.get("layout") else "train",
                                vocab_size=model.config.vocab_size)
        r = perplexity(model, data, args.batch_size, args.max_tokens, tokenizer)
    print(f"perplexity {r['perplexity']:.4f}: {r['loss']:.4f} nats per token"
          + (f", {r['bits_per_byte']:.4f} bits per byte" if "bits_per_byte" in r else "")
          + f" over {r['tokens']:,} tokens ({r['windows']} windows of {seq_len}) of {args.data}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("perplexity", help="how well a model predicts a text: perplexity, bits per byte",
                              description="The mean next-token loss of a model on a text, in windows of "
                                          "--seq_len tokens: perplexity, nats per token, bits per byte.")
    model_options(p)
    p.add_argument("--data", required=True,
                   help="a text or dataset file or directory (as `fusegrad prepare` reads them), llama2.c's "
                        "shards, or a directory `fusegrad prepare` made (its --split)")
    p.add_argument("--seq_len", "--seq-len", type=int, default=0,
                   help="tokens of context in each window (default: the model's context, at most 512)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=8)
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=None, help="score only the first this many")
    p.add_argument("--split", default="val", choices=("val", "train"), help="of a prepared directory (default val)")
    p.add_argument("--text_field", "--text-field", default="text", help="the JSON field / column of the text")
    p.add_argument("--separator", default=DEFAULT_SEPARATOR, help="between documents in a .txt")
    p.set_defaults(func=_cmd_perplexity)
