"""Fine-tuning data: records (JSON Lines, JSON, Parquet, Arrow, CSV) -> token examples, and batches with no padding.

Language modelling: a record holds `text`, or `prompt` + `completion` (loss on the completion only
unless mask_prompt=False), or a chat `messages` list of {"role", "content"} (or ShareGPT's `conversations` of
{"from", "value"}) rendered with the tokenizer's own chat template (loss on the assistant turns only; a record's
`tools` go to the template), `prompt` + `completion` as lists of such messages (TRL's conversational form), or Alpaca's
`instruction`, `input`, `output` (a chat when the tokenizer has a template; else Alpaca's own prompt). Text gets
a BOS only where the tokenizer adds one. Classification: `text` + `label` (an integer class id in
[0, num_classes): a JSON int or, in CSV, digits; a JSON `true`, a float such as 1.0 or "1.5" is refused, never
cast). Datasets that name these fields otherwise say so with RecordFields.
A file must be UTF-8 text; JSON's NaN/Infinity are refused. Every refusal is a FormatError naming the file and
line (or record, or row).
Batches group examples of EQUAL length: a step's examples are split into (B_g, T_g) groups that run
one after another, so no position is padding and nothing is computed for it.

>>> from fusegrad.data.tokenizer import ByteTokenizer
>>> ex = lm_examples([{"prompt": "ab", "completion": "c"}], ByteTokenizer(), max_len=16)
>>> ex[0].tokens.tolist(), ex[0].loss_mask.tolist()   # BOS a b | c EOS: loss on c and EOS only
([256, 97, 98, 99, 257], [False, False, True, True])
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import re

import numpy as np

from fusegrad.core.errors import FormatError
from fusegrad.data.chat import chat_example
from fusegrad.data.sources import Records, kind_of


@dataclasses.dataclass
class Example:
    tokens: np.ndarray  # (T+1,) int64 for lm (inputs and shifted targets); (T,) for classify
    loss_mask: np.ndarray | None = None  # (T,) bool: which targets count (lm)
    label: int = -1  # classify


SPLITS = {"train": ("train",), "val": ("valid", "validation", "val", "dev"), "test": ("test",)}


def dataset_splits(path) -> tuple:
    """(train, val or None) of `--data`: a file is all training data; so is a directory, unless some of its files
    are named for their split as published datasets name them (train.jsonl, valid.jsonl and test.jsonl as mlx-lm
    wants them; train-00000-of-00002.parquet, validation-..., test-... as the Hugging Face Hub has them): then
    the train files train, the valid / validation / val / dev files validate, and the test files are left out."""
    if not os.path.isdir(path):
        return path, None
    files = {split: [] for split in SPLITS}
    for found in sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)):
        name = os.path.basename(found).lower()
        split = next((s for s, names in SPLITS.items() if re.match(rf"(?:{'|'.join(names)})(?:[-_.]|$)", name)), None)
        if split is not None and os.path.isfile(found) and (kind_of(found) or name.endswith(".csv")):
            files[split].append(found)
    if not files["train"]:
        return path, None
    return files["train"], files["val"] or None


def read_records(path) -> list:
    """The records of a data file, directory or list of files -> list of dicts, each with `_where` (the file and
    its line, record or row) and `_path`. JSON Lines, JSON lists, Parquet and Arrow (compressed, in tar archives or
    directories: fusegrad.data.sources.Records, with JSON's NaN and Infinity refused), or CSV with a header row."""
    if isinstance(path, (list, tuple)):
        return [r for p in path for r in read_records(p)]
    path = os.fspath(path)
    if path.endswith(".csv"):
        records = _csv_records(path)
    else:
        records = [{**r, "_where": where} for r, where in Records(path, allow_nan=False)]
    for r in records:
        r["_path"] = path
    return records


def _csv_records(path) -> list:
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such data file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise FormatError(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column})"
                          ) from None
    records = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for row in reader:
            if None in row or None in row.values():  # more fields than the header, or fewer
                raise FormatError(f"{path}: line {reader.line_num}: the row's field count differs from the header's "
                                  f"({len(reader.fieldnames)}: {','.join(reader.fieldnames)})")
            records.append({**row, "_where": f"{path}: line {reader.line_num}"})
    except csv.Error as exc:
        raise FormatError(f"{path}: line {reader.line_num}: malformed CSV: {exc}") from None
    if not records:
        raise FormatError(f"{path}: holds no records")
    return records


def _where(r) -> str:
    return r.get("_where", "record")


def _text(r, key):
    value = r.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{_where(r)}: field {key!r} must be a string, got {value!r}"[:300])
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{_where(r)}: field {key!r} holds a lone surrogate, not UTF-8 text") from None
    return value


@dataclasses.dataclass(frozen=True)
class RecordFields:
    """The names a dataset gives each part of a record (`--text_field`, `--prompt_field`, ...)."""
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"  # a list of {"role", "content"}, or ShareGPT's {"from", "value"} turns
    label: str = "label"


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool"}


def _conversation(r, field):
    """The record's chat as [{"role", "content"}], or None without one: `field`, or ShareGPT's `conversations`
    (where field is the default), whose turns are {"from": "human" | "gpt" | "system", "value"}."""
    turns = r.get(field, r.get("conversations") if field == "messages" else None)
    if turns is None:
        return None
    if isinstance(turns, list) and turns and all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        unknown = next((t["from"] for t in turns if SHAREGPT_ROLES.get(str(t["from"])) is None), None)
        if unknown is not None:
            raise FormatError(f"{_where(r)}: a ShareGPT turn is from {unknown!r}, not one of "
                              f"{', '.join(SHAREGPT_ROLES)}"[:300])
        return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
    return turns


def _label(r, field) -> int:
    """The record's label as an int: a JSON or Parquet int (not a bool, not a float, not a string) or, in a CSV
    file, ASCII digits."""
    raw = r.get(field)
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    from_csv = str(r.get("_path", "")).endswith(".csv")
    if from_csv and isinstance(raw, str) and len(raw) <= 32 and re.fullmatch(r"\s*[+-]?[0-9]+\s*", raw):
        return int(raw)
    raise FormatError(f"{_where(r)}: field {field!r} must be an integer class id, got {raw!r}"[:300])


# Stanford Alpaca's prompt, for a tokenizer without a chat template (its preamble: without an input, with one)
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.", "Below is an instruction that describes a task, paired with an input that "
                   "provides further context. Write a response that appropriately completes the request.")


def _is_alpaca(r, fields) -> bool:
    """An Alpaca record: `instruction` and `output`, with `input` (often empty) and, as LLaMA-Factory adds, `system`.
    It is read as Alpaca unless the record also holds the named prompt and completion fields, or a text field
    was named; `--prompt_field instruction --completion_field output` reads it as Alpaca too (the input is kept)."""
    if "instruction" not in r or "output" not in r or fields.text != "text" and fields.text in r:
        return False
    return (fields.prompt, fields.completion) == ("instruction", "output") or not (
        fields.prompt in r and fields.completion in r)


def _alpaca_example(r, tokenizer, mask_prompt: bool):
    """(ids, trained) of an Alpaca record. With a chat template: [system,] LLaMA-Factory's `history` turns (pairs
    of [instruction, response]), user (the instruction, a blank line and the input when there is one), assistant
    (the output), loss on the assistant's turns. Without: Stanford Alpaca's own prompt (the system field, if any,
    in place of its preamble) + the output + EOS, loss as for a completion."""
    instruction, output = _text(r, "instruction"), _text(r, "output")
    given = _text(r, "input") if r.get("input") not in (None, "") else ""  # Parquet gives None for a missing one
    system = _text(r, "system") if r.get("system") not in (None, "") else None
    history = r.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and
                                                all(isinstance(t, str) for t in h) for h in history):
        raise FormatError(f"{_where(r)}: field 'history' must be a list of [instruction, response] pairs of "
                          f"strings, got {history!r}"[:300])
    if getattr(tokenizer, "chat_template", None):
        user = f"{instruction}\n\n{given}" if given else instruction
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": role, "content": text} for pair in history for role, text in zip(("user", "assistant"), pair)
        ] + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return _chat_example(r, tokenizer, turns, "instruction")
    if history:
        raise FormatError(f"{_where(r)}: an Alpaca record with a 'history' of earlier turns needs a tokenizer with "
                          f"a chat template ({getattr(tokenizer, 'source', tokenizer.kind)} has none)")
    prompt = (system or ALPACA_PREAMBLE[bool(given)]) + f"\n\n### Instruction:\n{instruction}\n\n"
    prompt += (f"### Input:\n{given}\n\n" if given else "") + "### Response:\n"
    return _completion_example(tokenizer, prompt, output, mask_prompt)


def _completion_example(tokenizer, prompt: str, completion: str, mask_prompt: bool):
    """(ids, trained): [BOS] prompt completion EOS, trained on the completion and EOS (on all with mask_prompt off)."""
    head = tokenizer.encode(prompt)
    ids = head + tokenizer.encode(completion, bos=False, eos=True)
    return ids, [int(not mask_prompt)] * len(head) + [1] * (len(ids) - len(head))


def _chat_example(r, tokenizer, messages, field: str, first_trained: int = 0):
    """(ids, trained) of a record's chat, trained on its assistant turns from message `first_trained` on; the
    record's `tools` (JSON schemas, or a JSON string of them) go to the template."""
    tools = r.get("tools")
    if isinstance(tools, str):  # datasets often store the schemas as JSON text
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise FormatError(f"{_where(r)}: field 'tools' is not valid JSON: {e}") from None
    try:
        return chat_example(tokenizer, messages, tools, first_trained)
    except FormatError as e:
        raise FormatError(f"{_where(r)}: {e}") from None
    except UnicodeEncodeError:
        raise FormatError(f"{_where(r)}: field {field!r} holds a lone surrogate, not UTF-8 text") from None


def lm_examples(records, tokenizer, max_len: int, mask_prompt: bool = True, fields=RecordFields()) -> list:
    """Records -> Examples of at most max_len + 1 tokens ([BOS] ... EOS, cut at the right).

    Records whose loss would cover no token after truncation (a prompt longer than max_len) are dropped.
    """
    out = []
    for r in records:
        messages = _conversation(r, fields.messages)
        prompt, completion = r.get(fields.prompt), r.get(fields.completion)
        if messages is not None:
            ids, trained = _chat_example(r, tokenizer, messages, fields.messages)
        elif isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
            ids, trained = _chat_example(r, tokenizer, prompt + completion, fields.prompt, len(prompt))
        elif _is_alpaca(r, fields):
            ids, trained = _alpaca_example(r, tokenizer, mask_prompt)
        elif fields.text in r:
            ids = tokenizer.encode(_text(r, fields.text), eos=True)
            trained = [1] * len(ids)
        elif fields.prompt in r and fields.completion in r:
            ids, trained = _completion_example(tokenizer, _text(r, fields.prompt), _text(r, fields.completion),
                                               mask_prompt)
        else:
            raise FormatError(f"{_where(r)}: a record needs {fields.text!r}, {fields.prompt!r} and "
                              f"{fields.completion!r}, or {fields.messages!r}, or Alpaca's 'instruction' and "
                              f"'output' (has "
                              f"{sorted(k for k in r if not k.startswith('_'))}); name the fields with --text_field, "
                              f"--prompt_field, --completion_field or --messages_field"[:400])
        ids = ids[:max_len + 1]
        mask = np.array(trained[1:len(ids)], bool)  # target t is ids[t + 1]
        if mask.any():
            out.append(Example(np.array(ids, np.int64), mask))
    return out


def classify_examples(records, tokenizer, num_classes: int, max_len: int, fields=RecordFields()) -> list:
    """Records with text + label -> Examples (text, with BOS where the tokenizer adds one, cut to max_len); label
    checked against num_classes."""
    out = []
    for r in records:
        label = _label(r, fields.label)
        if not 0 <= label < num_classes:
            raise FormatError(f"{_where(r)}: label {label} is outside [0, num_classes={num_classes})")
        ids = tokenizer.encode(_text(r, fields.text))[:max_len]
        out.append(Example(np.array(ids, np.int64), label=label))
    return out


def split(examples: list, val_fraction: float, seed: int) -> tuple:
    """A seeded shuffle, then the last val_fraction (at least one example when > 0) is validation."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = int(round(len(examples) * val_fraction)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 else 0), len(examples) - 1)
    return [examples[i] for i in order[:len(order) - n_val]], [examples[i] for i in order[len(order) - n_val:]]


def group_by_length(examples: list) -> list:
    """-> [(tokens (B_g, L), loss_mask (B_g, L-1) or None, labels (B_g,))], one group per distinct length."""
    groups = {}
    for e in examples:
        groups.setdefault(len(e.tokens), []).append(e)
    out = []
    for length in sorted(groups):
        g = groups[length]
        mask = np.stack([e.loss_mask for e in g]) if g[0].loss_mask is not None else None
        out.append((np.stack([e.tokens for e in g]), mask, np.array([e.label for e in g], np.int64)))
    return out


class Sampler:
    """Epochs of seeded permutations, batch_size examples a step; its state is two ints (exact resume)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.pos = 0, 0

    def next_indices(self) -> list:
        out = []
        while len(out) < self.batch_size:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            take = perm[self.pos:self.pos + self.batch_size - len(out)]
            out += take.tolist()
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
