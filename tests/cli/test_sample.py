"""`fusegrad chat`: each turn is what transformers' greedy generate() gives on the conversation so far, rendered
with apply_chat_template; the KV cache of the earlier turns is kept."""
import io

import numpy as np
import pytest

from fusegrad.cli.main import main
from fusegrad.core.errors import ShapeError
from fusegrad.models.generate import Conversation, Sampling, stream


def test_chat_replies_equal_transformers_greedy_generation_turn_after_turn(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.data.test_chat import make_hf_model

    path = make_hf_model(tmp_path / "m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    eos = model.generation_config.eos_token_id

    def their_reply(messages):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        out = model.generate(torch.tensor([ids["input_ids"]]), max_new_tokens=8, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)[0, len(ids["input_ids"]):].tolist()
        return tokenizer.decode([t for t in out if t not in eos], skip_special_tokens=True)  # as fusegrad decodes

    turns = ["Hi", "What is a list?", "And a tuple?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(turns[:2] + ["", "/reset", turns[2], "/exit", "ignored"])))
    made = []
    reply = Conversation.reply
    monkeypatch.setattr(Conversation, "reply", lambda self, *a: made.append(self) or reply(self, *a))
    assert main(["chat", "--checkpoint", str(path), "--system", "Answer briefly.", "--temperature", "0",
                 "--max_new_tokens", "8"]) == 0
    printed = capsys.readouterr().out
    messages, wanted = [{"role": "system", "content": "Answer briefly."}], []
    for i, turn in enumerate(turns):
        if i == 2:  # after /reset: the system message only
            messages = messages[:1]
        messages.append({"role": "user", "content": turn})
        wanted.append(their_reply(messages))
        messages.append({"role": "assistant", "content": wanted[-1]})
    assert printed == "".join(w + "\n" for w in wanted)
    lengths = [len(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]) for k in (2, 4)]
    assert made[0].computed < sum(lengths) + 3 * 8  # the second turn did not run the first one again


def test_conversation_reuses_the_cache_as_far_as_the_prompt_agrees_and_grows_it():
    from fusegrad.models import Llama
    from fusegrad.models.generate import generate

    model = Llama.from_preset("tiny", seed=2, max_seq_len=128)
    chat, V = Conversation(model, Sampling(temperature=0.0)), model.config.vocab_size
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, V, 5)]
    run = []  # positions each turn runs without a cache: its prompt and all its new ids but the last
    for step in range(4):  # each prompt extends the last reply; the fourth changes prompt[3]
        got = list(chat.reply(prompt, 6))
        assert prompt + got == generate(model, prompt, 6, temperature=0.0), step
        run.append(len(prompt) + len(got) - 1)
        prompt = prompt + got + [int(t) for t in rng.integers(0, V, 3)]
        if step == 2:
            prompt[3] = (prompt[3] + 1) % V
    assert chat.cache.max_len >= len(prompt) - 3 > 11  # grown from the first turn's 5 + 6
    assert chat.computed == sum(run) - (run[0] + run[1] + 3)  # turns 2 and 3 keep all before them, turn 4 three
    with pytest.raises(ShapeError, match="a cache holding 0 of 4 positions cannot continue a prompt of 3 ids by 5"):
        list(stream(model, [1, 2, 3], 5, Sampling(temperature=0.0), cache=model.new_cache(1, 4)))
