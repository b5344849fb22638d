"""Hugging Face tokenizers as their own files define them, and chat templates, against transformers."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from fusegrad.core.errors import FormatError
from fusegrad.data import corpus
from fusegrad.data.chat import chat_example, chat_text
from fusegrad.data.tokenizer import BPETokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")
CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is a list?"},
                {"role": "assistant", "content": "A mutable sequence, é."},
                {"role": "user", "content": "And a tuple?"},
                {"role": "assistant", "content": "An immutable one."}]


def make_hf_dir(path, specials, config, bos_post_processor=None, generation_eos=None):
    """A tokenizer.json trained here plus the config files a Hugging Face model directory carries."""
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(corpus.documents()[:20], trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_post_processor:
        bos = bos_post_processor
        hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, hf.token_to_id(bos))])
    path.mkdir()
    hf.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    if generation_eos is not None:
        (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
    return path


def make_chatml_dir(path):
    """SmolLM2-style: no BOS added, ChatML turns, eos <|im_end|> (2) and <|endoftext|> (0) end generation."""
    return make_hf_dir(path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                       {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                        "chat_template": CHATML}, generation_eos=[2, 0])


def make_hf_model(path, norm=1.0):
    """A tiny LlamaForCausalLM made by transformers (fp32 safetensors) with make_chatml_dir's tokenizer beside it;
    `norm`: the final RMSNorm's weight (0: every logit 0, so greedy decoding picks id 0)."""
    torch = pytest.importorskip("torch")
    make_chatml_dir(path)
    config = transformers.LlamaConfig(vocab_size=load_tokenizer(path).vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
                                      eos_token_id=[2, 0])
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(norm)
    model.save_pretrained(path)
    return path


@pytest.fixture(params=["chatml", "llama3", "llama2"])
def hf_dir(request, tmp_path):
    if request.param == "chatml":
        return make_chatml_dir(tmp_path / "chatml")
    if request.param == "llama3":  # BOS from the post-processor, several eos ids from generation_config.json
        return make_hf_dir(tmp_path / "llama3", ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>",
                                                 "<|im_end|>"],
                           {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": CHATML},
                           bos_post_processor="<|begin_of_text|>", generation_eos=[1, 2])
    return make_hf_dir(tmp_path / "llama2", ["<unk>", "<s>", "</s>"],  # special tokens as AddedToken objects
                       {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False}, "eos_token": "</s>",
                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": LLAMA2},
                       bos_post_processor="<s>")


def test_special_tokens_and_bos_come_from_the_tokenizers_own_files(hf_dir):
    ours, theirs = load_tokenizer(hf_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(ours, BPETokenizer)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
    for text in ("The list", "  spaces and é", "x"):
        assert ours.encode(text) == theirs.encode(text), text  # BOS only where the tokenizer adds one
    generation = json.loads((hf_dir / "generation_config.json").read_text()) if (hf_dir / "generation_config.json").exists() else {}
    assert set(ours.eos_ids) == {theirs.eos_token_id, *generation.get("eos_token_id", [])}


def test_chat_ids_equal_apply_chat_template_and_only_assistant_turns_are_trained(hf_dir):
    ours, theirs = load_tokenizer(hf_dir), transformers.AutoTokenizer.from_pretrained(hf_dir)
    for messages in (CONVERSATION, CONVERSATION[1:3]):
        ids, mask = chat_example(ours, messages)
        expected = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(expected)
        trained = ours.decode([i for i, m in zip(ids, mask) if m])
        assert "mutable sequence, é." in trained and "What is a list" not in trained and "Answer briefly" not in trained
    prompt = chat_text(ours, CONVERSATION[:2], add_generation_prompt=True)
    assert prompt == theirs.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)


def test_saved_tokenizer_keeps_its_special_tokens_for_transformers(hf_dir, tmp_path):
    ours = load_tokenizer(hf_dir)
    ours.save(tmp_path)
    again, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (again.bos_id, again.eos_id, again.add_bos, again.chat_template) == \
        (ours.bos_id, ours.eos_id, ours.add_bos, ours.chat_template)
    assert theirs.encode("The list") == ours.encode("The list")
    assert theirs.apply_chat_template(CONVERSATION, tokenize=False) == chat_text(ours, CONVERSATION)


def test_chat_errors_name_what_is_wrong(tmp_path):
    d = make_hf_dir(tmp_path / "d", ["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>", "chat_template": LLAMA2})
    tok = load_tokenizer(d)
    with pytest.raises(FormatError, match="roles must alternate"):
        chat_example(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(FormatError, match="message 0 must be"):
        chat_example(tok, [{"role": "wizard", "content": "a"}])
    with pytest.raises(FormatError, match="no chat_template"):
        chat_example(BPETokenizer.train(["a b c " * 50], 300), CONVERSATION)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(FormatError, match=r"tokenizer_config.json: bos_token '<nope>' is not in the vocabulary"):
        load_tokenizer(d)
