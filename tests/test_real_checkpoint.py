"""A real pretrained checkpoint as published (SmolLM2-135M-Instruct, bf16; tests/real_checkpoint.py), against
transformers on the same files."""
import pytest

from fusegrad.data.chat import chat_example, chat_text
from fusegrad.data.tokenizer import BPETokenizer, load_tokenizer
from tests.real_checkpoint import smollm2_dir

transformers = pytest.importorskip("transformers")

MESSAGES = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"}]


@pytest.fixture(scope="module")
def model_dir():
    return smollm2_dir()


def test_its_tokenizer_loads_with_its_own_special_tokens_and_chat_template(model_dir):
    ours, theirs = load_tokenizer(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    assert isinstance(ours, BPETokenizer) and ours.vocab_size == 49152
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (theirs.bos_token_id, theirs.eos_token_id, False)
    for text in ("Once upon a time", "  def f(x):\n\treturn x ** 2  # é"):
        assert ours.encode(text) == theirs.encode(text)
    ids, mask = chat_example(ours, MESSAGES[:3])
    assert ids == list(theirs.apply_chat_template(MESSAGES[:3], tokenize=True, return_dict=True)["input_ids"])
    assert ours.decode([i for i, m in zip(ids, mask) if m]).startswith("Paris.")
    assert chat_text(ours, MESSAGES, add_generation_prompt=True) == \
        theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
