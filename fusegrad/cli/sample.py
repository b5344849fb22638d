"""`fusegrad sample` and `fusegrad chat`: text from a model, printed as it is generated.

    fusegrad sample --checkpoint runs/default --prompt "The list"
    fusegrad sample --checkpoint hf_dir --chat --prompt "What is a list?" --top_k 40 --repetition_penalty 1.1
    fusegrad chat --checkpoint hf_dir --system "Answer briefly."     # a user turn a line; /reset, /exit
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from fusegrad.backends import get_backend
from fusegrad.cli import export
from fusegrad.core.tensor import tensor
from fusegrad.data.chat import chat_text
from fusegrad.data.tokenizer import tokenizer_for_model
from fusegrad.models.generate import Conversation, Sampling, declared_sampling, stream
from fusegrad.models.llama import Llama

SAMPLING_FIELDS = [f.name for f in dataclasses.fields(Sampling)]


def model_and_tokenizer(args) -> tuple:
    """(model, tokenizer, the base model's path) of --checkpoint (--adapter folded in, in memory, the weights on
    --backend) and --tokenizer."""
    model, own, path = export.load_merged(args.checkpoint, args.adapter)
    if args.backend != "numpy" or args.device:  # the weights go to the device once; generation runs there
        be = get_backend(f"{args.backend}:{args.device}" if args.device else args.backend)
        model = Llama(model.config, params={n: tensor(t.numpy(), backend=be) for n, t in model.params.items()},
                      backend=be)
    return model, tokenizer_for_model(path, model.config.vocab_size, own, args.tokenizer, args.force_tokenizer), path


def _model(args):
    """(model, tokenizer, sampling) as the options and the checkpoint say."""
    model, tokenizer, path = model_and_tokenizer(args)
    declared = declared_sampling(path)
    given = {f: getattr(args, f) for f in SAMPLING_FIELDS if getattr(args, f) is not None}
    sampling = Sampling(**{**declared, **given})  # the command line over what the model declares
    if set(declared) - set(given):
        print(f"sampling: {', '.join(f'{f} {getattr(sampling, f)}' for f in SAMPLING_FIELDS)} (the model's "
              f"{', '.join(sorted(set(declared) - set(given)))} as {path} declares)", file=sys.stderr)
    return model, tokenizer, sampling


def _cmd_sample(args) -> int:
    model, tokenizer, sampling = _model(args)
    if args.chat:  # the prompt as a one-turn conversation, in the model's own chat template
        prompt = _chat_ids(tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.prompt_ids(args.prompt)
    for i in range(args.num_samples):
        shown = Shown(tokenizer, [] if args.chat else prompt)  # chat: the assistant's reply only
        for token in stream(model, prompt, args.max_new_tokens, sampling, args.seed + i, tokenizer.eos_ids):
            shown.add(token)
        shown.end()
        if i + 1 < args.num_samples:
            print("---")
    return 0


def _cmd_chat(args) -> int:
    """A conversation with the model: each line of stdin a user turn, each reply printed as it comes. The
    KV cache of the conversation so far is kept (fusegrad.models.generate.Conversation)."""
    model, tokenizer, sampling = _model(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages, chat = list(system), Conversation(model, sampling, args.seed, tokenizer.eos_ids)
    _chat_ids(tokenizer, system + [{"role": "user", "content": ""}])  # no template, or one refusing a system
    # message: said before the first turn is read
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = _chat_ids(tokenizer, messages)
        if len(prompt) >= model.config.max_seq_len:
            print(f"(the conversation's {len(prompt)} tokens fill the model's context of "
                  f"{model.config.max_seq_len}: /reset to start again)", file=sys.stderr)
            messages.pop()
            continue
        shown = Shown(tokenizer, [])
        reply = []
        for token in chat.reply(prompt, args.max_new_tokens):
            if token not in tokenizer.eos_ids:
                reply.append(token)
                shown.add(token)
        shown.end()
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})


def _chat_ids(tokenizer, messages) -> list:
    text = chat_text(tokenizer, messages, add_generation_prompt=True)
    return tokenizer.encode(text, bos=False, eos=False)  # the template places its special tokens itself


class Shown:
    """Text printed as its tokens come: the decoding of all the ids so far, less what is already on screen; a
    character still incomplete (U+FFFD at the end: a multi-byte character split over tokens) waits for the
    next token."""

    def __init__(self, tokenizer, ids):
        self.tokenizer, self.ids, self.printed = tokenizer, list(ids), ""
        self._show(final=False)

    def add(self, token):
        self.ids.append(token)
        self._show(final=False)

    def end(self):
        self._show(final=True)
        print(flush=True)

    def _show(self, final):
        text = self.tokenizer.decode(self.ids)
        text = text if final else text.rstrip("\ufffd")
        if text.startswith(self.printed):
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def model_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --adapter, --tokenizer, --force_tokenizer, --backend, --device: what model_and_tokenizer reads."""
    p.add_argument("--checkpoint", required=True,
                   help="run dir, checkpoint.safetensors, HF dir, .gguf, llama2.c .bin, or a fine-tune's adapter dir")
    p.add_argument("--adapter", default="", help="a PEFT LoRA adapter dir (from `fusegrad finetune --out`)")
    p.add_argument("--tokenizer", default="", help="tokenizer file or dir, when none lies beside the model")
    p.add_argument("--force_tokenizer", "--force-tokenizer", action="store_true",
                   help="use --tokenizer byte on a model whose vocabulary is not bytes")
    p.add_argument("--backend", default="numpy", help="where to run: numpy, torch[:cuda|mps|cpu], ... "
                                                       "(default numpy)")
    p.add_argument("--device", default="", help="with --backend torch: cuda, mps or cpu (empty: the best present)")


def _generation_options(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    model_options(p)
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config.json or "
                                                      "GGUF sampling keys, else 0.8)")
    p.add_argument("--top_p", "--top-p", type=float, help="nucleus: the smallest set of tokens with this much "
                                                           "probability (default: the model's, else 0.9)")
    p.add_argument("--top_k", "--top-k", type=int, help="the k most likely tokens only (0 = off; default: the "
                                                         "model's, else 0)")
    p.add_argument("--min_p", "--min-p", type=float, help="tokens at least min_p times as likely as the most likely "
                                                           "(0 = off; default: the model's, else 0)")
    p.add_argument("--repetition_penalty", "--repetition-penalty", type=float,
                   help="divide the logits of ids already in the context by this, as transformers does (1 = off; "
                        "default: the model's, else 1)")
    p.add_argument("--repeat_last_n", "--repeat-last-n", type=int,
                   help="the repetition penalty looks at the last n ids only, as llama.cpp's penalty_last_n (-1 = "
                        "the whole context, as transformers; 0 = none; default: the model's, a GGUF's 64, else -1)")
    p.add_argument("--seed", type=int, default=0)


def add_parser(subparsers) -> None:
    """Register `sample` and `chat` on the `fusegrad` command's subparsers."""
    p = subparsers.add_parser("sample", help="generate text from a checkpoint")
    _generation_options(p, 200)
    p.add_argument("--prompt", default="")
    p.add_argument("--num_samples", "--num-samples", type=int, default=1)
    p.add_argument("--chat", action="store_true", help="the prompt is a user turn in the model's chat template; "
                                                       "prints the assistant's reply")
    p.set_defaults(func=_cmd_sample)
    p = subparsers.add_parser("chat", help="a conversation with a chat model, a user turn a line of stdin",
                              description="Chat with a model in its own chat template: each line of stdin is a "
                                          "user turn; /reset starts again, /exit (or end of input) stops.")
    _generation_options(p, 512)
    p.add_argument("--system", default="", help="a system message before the conversation")
    p.set_defaults(func=_cmd_chat)
