"""Chat conversations rendered with a model's own chat template, exactly as transformers renders them.

A conversation is a list of {"role": ..., "content": ...} messages. The template (jinja2, from the
tokenizer's tokenizer_config.json) is run in jinja2's immutable sandbox with transformers' settings
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII), given the special tokens as strings; the text is then tokenized whole, adding no special
tokens, so the ids equal `apply_chat_template(messages, tokenize=True)`. Training masks everything but
the assistant turns (their content and the template's end-of-turn marks).

>>> template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
>>> render_chat(template, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
'<user>hi</s><assistant>yo</s>'
"""
import datetime
import functools
import json

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fusegrad.core.errors import FormatError

ROLES = ("system", "user", "assistant", "tool")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise FormatError(f"chat template: jinja syntax error at line {e.lineno}: {e.message}") from None


def check_messages(messages, where="chat"):
    """A conversation must be a non-empty list of {"role", "content"} dicts with known roles and string content;
    an assistant turn that calls tools may have `tool_calls` (a list) and no content."""
    if not isinstance(messages, list) or not messages:
        raise FormatError(f"{where}: 'messages' must be a non-empty list, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
        if not isinstance(m, dict) or m.get("role") not in ROLES or not (
                isinstance(m.get("content"), str) or calls and m.get("content") is None):
            raise FormatError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': a string}} (an "
                              f"assistant's may hold 'tool_calls' instead), got {m!r}"[:300])
    return messages


def check_tools(tools, where="chat"):
    """Tools offered to the model: None, or a list of JSON schemas (dicts) as transformers takes them."""
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise FormatError(f"{where}: 'tools' must be a list of JSON schemas (objects), got {tools!r}"[:300])
    return tools


def render_chat(template, messages, add_generation_prompt=False, tools=None, **special_tokens):
    """The conversation as text, as transformers renders it (tools: JSON schemas, or None); special_tokens:
    bos_token, eos_token, ... as strings (None ones are left out)."""
    kwargs = {k: v for k, v in special_tokens.items() if v is not None}
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile(template).render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise FormatError(f"chat template refused the conversation: {e}") from None


def _special_tokens(tokenizer):
    hf = tokenizer.hf
    return {f"{name}_token": hf.id_to_token(i) for name, i in
            (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("pad", tokenizer.pad_id)) if i is not None}


def chat_text(tokenizer, messages, add_generation_prompt=False, tools=None):
    """The conversation rendered with the tokenizer's own chat template (FormatError if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise FormatError(f"{getattr(tokenizer, 'source', tokenizer.kind)}: the tokenizer has no chat_template "
                          f"(tokenizer_config.json); chat data and --chat need a chat model's tokenizer")
    return render_chat(tokenizer.chat_template, check_messages(messages), add_generation_prompt, check_tools(tools),
                       **_special_tokens(tokenizer))


def chat_example(tokenizer, messages, tools=None, first_trained: int = 0):
    """(ids, mask): the rendered conversation's token ids, and 1 for each token of an assistant turn from message
    `first_trained` on (what the loss is taken on; its tool calls too), 0 elsewhere. An assistant turn spans from
    the end of the text rendered up to it with the generation prompt to the end of the text rendered through it."""
    full = chat_text(tokenizer, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first_trained:
            continue
        start = len(chat_text(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)) if i else 0
        through = chat_text(tokenizer, messages[:i + 1], tools=tools)
        if not full.startswith(through) or start > len(through):
            raise FormatError(f"chat template: the conversation rendered through message {i} is not a prefix of the "
                              f"whole; cannot tell which tokens are the assistant's")
        spans.append((start, len(through)))
    ids, offsets = tokenizer.encode_with_offsets(full)
    mask = [int(any(a < e and b > s for s, e in spans)) for a, b in offsets]
    return ids, mask
