"""Fine-tuning data as datasets publish it: JSON Lines, JSON lists, Parquet and Arrow (compressed too), chat as
`messages` or ShareGPT's `conversations`, Alpaca's instruction / input / output, and fields named otherwise
(SST-2's sentence)."""
import gzip
import json

import numpy as np
import pytest

from fusegrad.cli.main import main as run_cli
from fusegrad.core.errors import FormatError
from fusegrad.data.tokenizer import ByteTokenizer, load_tokenizer
from fusegrad.finetune import data as ftdata
from tests.data.test_chat import CONVERSATION, make_chatml_dir

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CHATS = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]


def write_all_kinds(d, rows) -> list:
    """`rows` as .jsonl, .json (a list), .jsonl.gz, .parquet and .arrow (the IPC stream Hugging Face datasets
    writes); the paths."""
    paths = [d / "d.jsonl", d / "d.json", d / "d.jsonl.gz", d / "d.parquet", d / "d.arrow"]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    paths[0].write_text(lines)
    paths[1].write_text(json.dumps(rows, indent=1))
    paths[2].write_bytes(gzip.compress(lines.encode()))
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, paths[3], row_group_size=2)
    with pa.OSFile(str(paths[4]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    return paths


def examples(path, tokenizer, **fields):
    return [(e.tokens.tolist(), e.loss_mask.tolist(), e.label)
            for e in ftdata.lm_examples(ftdata.read_records(path), tokenizer, 256,
                                        fields=ftdata.RecordFields(**fields))]


def test_chat_data_reads_the_same_from_every_kind_of_file_and_as_sharegpt(tmp_path):
    transformers = pytest.importorskip("transformers")
    make_chatml_dir(tmp_path / "tok")
    tokenizer, theirs = load_tokenizer(tmp_path / "tok"), transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    rows = [{"messages": m, "source": "test"} for m in CHATS * 2]
    wanted = [theirs.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in CHATS * 2]
    for path in write_all_kinds(tmp_path, rows):  # Parquet's messages: a list of structs, read back as dicts
        got = examples(path, tokenizer)
        assert [ids for ids, _, _ in got] == wanted, path.name
        trained = [theirs.decode(np.array(ids[1:])[mask]) for ids, mask, _ in got]
        assert trained[2] == "Yo<|im_end|>\n", path.name  # the loss is on the assistant's turns only
    who = {"system": "system", "user": "human", "assistant": "gpt"}
    shared = tmp_path / "sharegpt"
    shared.mkdir()
    sharegpt = [{"conversations": [{"from": who[t["role"]], "value": t["content"]} for t in m]} for m in CHATS * 2]
    for path in write_all_kinds(shared, sharegpt):
        assert [ids for ids, _, _ in examples(path, tokenizer)] == wanted, f"ShareGPT {path.name}"
    named = tmp_path / "named.jsonl"
    named.write_text("".join(json.dumps({"dialog": m}) + "\n" for m in CHATS))
    assert [ids for ids, _, _ in examples(named, tokenizer, messages="dialog")] == wanted[:3]


def test_fields_named_otherwise_are_read_where_the_settings_say(tmp_path):
    qa = [{"question": f"Say {w}.", "answer": w, "id": i} for i, w in enumerate(("yes", "no", "maybe"))]
    usual = [{"prompt": r["question"], "completion": r["answer"]} for r in qa]
    (tmp_path / "usual").mkdir()
    for theirs, ours in zip(write_all_kinds(tmp_path, qa), write_all_kinds(tmp_path / "usual", usual)):
        assert examples(theirs, ByteTokenizer(), prompt="question", completion="answer") == \
            examples(ours, ByteTokenizer()), theirs.name
    with pytest.raises(FormatError, match=r"d.parquet: row 0: a record needs 'text', 'prompt' and 'completion', or "
                                          r"'messages', or Alpaca's 'instruction' and 'output' \(has \['answer', "
                                          r"'id', 'question'\]\); name the fields with --text_field"):
        examples(tmp_path / "d.parquet", ByteTokenizer())
    sst2 = tmp_path / "sst2.parquet"  # a classification dataset: its text is 'sentence', its label an int64
    pq.write_table(pa.Table.from_pylist([{"idx": i, "sentence": s, "label": i % 2}
                                         for i, s in enumerate(["good", "bad", "fine", "awful"])]), sst2)
    got = ftdata.classify_examples(ftdata.read_records(sst2), ByteTokenizer(), 2, 16, ftdata.RecordFields(text="sentence"))
    assert [(bytes(e.tokens[1:].astype(np.uint8)).decode(), e.label) for e in got] == \
        [("good", 0), ("bad", 1), ("fine", 0), ("awful", 1)]


ALPACA = [{"instruction": "Name the capital.", "input": "France", "output": "Paris", "system": ""},
          {"instruction": "Say yes.", "input": "", "output": "yes", "system": None},
          {"instruction": "Say no.", "input": "", "output": "no", "system": "Answer in one word."}]


def test_alpaca_records_keep_their_input_and_are_chats_in_the_models_template(tmp_path):
    transformers = pytest.importorskip("transformers")
    make_chatml_dir(tmp_path / "tok")
    tokenizer, theirs = load_tokenizer(tmp_path / "tok"), transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    chats = [[{"role": "user", "content": "Name the capital.\n\nFrance"}, {"role": "assistant", "content": "Paris"}],
             [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "yes"}],
             [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Say no."},
              {"role": "assistant", "content": "no"}]]
    wanted = [theirs.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in chats]
    history = [["Say hi.", "hi"], ["Say yes.", "yes"]]  # LLaMA-Factory's earlier turns of a multi-turn record
    chats.insert(0, [{"role": r, "content": t} for pair in history for r, t in zip(("user", "assistant"), pair)] +
                 chats[0])
    wanted.insert(0, theirs.apply_chat_template(chats[0], tokenize=True, return_dict=True)["input_ids"])
    rows = [dict(ALPACA[0], history=history)] + ALPACA  # first: Parquet's columns are the first row's
    for path in write_all_kinds(tmp_path, rows):  # an empty or null system field: no system turn
        for named in ({}, {"prompt": "instruction", "completion": "output"}):  # README's older advice reads the same
            got = examples(path, tokenizer, **named)
            assert [ids for ids, _, _ in got] == wanted, (path.name, named)
            assert [theirs.decode(np.array(ids[1:])[mask]) for ids, mask, _ in got] == \
                ["hi<|im_end|>\nyes<|im_end|>\nParis<|im_end|>\n", "Paris<|im_end|>\n", "yes<|im_end|>\n",
                 "no<|im_end|>\n"], path.name


def test_alpaca_records_without_a_chat_template_get_stanford_alpacas_prompt(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA + [{"instruction": "Add.", "output": "3", "input": "1 + 2", "text": "ignored"}]))
    got = examples(path, ByteTokenizer())
    text = [bytes(np.array(ids[1:-1], np.uint8)).decode() for ids, _, _ in got]  # BOS ... EOS
    assert text[0] == ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "Name the capital.\n\n### Input:\nFrance\n\n### Response:\nParis")
    assert text[1] == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                       "the request.\n\n### Instruction:\nSay yes.\n\n### Response:\nyes")
    assert text[2] == "Answer in one word.\n\n### Instruction:\nSay no.\n\n### Response:\nno"
    assert text[3].endswith("### Instruction:\nAdd.\n\n### Input:\n1 + 2\n\n### Response:\n3")  # not its text
    for (ids, mask, _), answer in zip(got, ("Paris", "yes", "no", "3")):  # loss on the output and EOS only
        assert bytes(np.array(ids[1:], np.uint16)[mask][:-1].astype(np.uint8)).decode() == answer
        assert ids[-1] == ByteTokenizer().eos_id and mask[-1]
    named = tmp_path / "named.jsonl"  # a text field named: that field is read
    named.write_text(json.dumps({"instruction": "Add.", "output": "3", "body": "1 + 2 = 3"}) + "\n")
    assert bytes(np.array(examples(named, ByteTokenizer(), text="body")[0][0][1:-1], np.uint8)) == b"1 + 2 = 3"
    bad = tmp_path / "bad.jsonl"
    for record, match in [({"input": 3}, r"line 1: field 'input' must be a string, got 3"),
                          ({"history": [["a"]]}, r"line 1: field 'history' must be a list of \[instruction, "),
                          ({"history": [["a", "b"]]}, r"line 1: an Alpaca record with a 'history' of earlier turns "
                                                      r"needs a tokenizer with a chat template \(byte has none\)")]:
        bad.write_text(json.dumps({"instruction": "Add.", "input": "1 + 2", "output": "3"} | record) + "\n")
        with pytest.raises(FormatError, match=match):
            examples(bad, ByteTokenizer())


# ChatML with tools, in the shape Qwen2.5's template gives them: schemas in a system turn, calls as JSON
TOOLS_TEMPLATE = ("{%- if tools %}<|im_start|>system\nTools:{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
                  "<|im_end|>\n{% endif %}{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}"
                  "<|im_start|>assistant\n{% for call in m.tool_calls %}<tool_call>{{ call.function | tojson }}"
                  "</tool_call>{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                  "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CALLING = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
           {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "It is 18C."}]


def test_tool_calls_and_trls_conversational_prompt_completion_render_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.data.test_chat import make_hf_dir

    make_hf_dir(tmp_path / "tok", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TOOLS_TEMPLATE})
    tokenizer, theirs = load_tokenizer(tmp_path / "tok"), transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    rows = [{"messages": CALLING, "tools": [WEATHER]}, {"messages": CALLING, "tools": json.dumps([WEATHER])},
            {"prompt": turns[:3], "completion": turns[3:]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = examples(path, tokenizer)
    calls = theirs.apply_chat_template(CALLING, tools=[WEATHER], tokenize=True, return_dict=True)["input_ids"]
    assert [ids for ids, _, _ in got] == [calls, calls, theirs.apply_chat_template(turns, tokenize=True,
                                                                                return_dict=True)["input_ids"]]
    trained = [theirs.decode(np.array(ids[1:])[mask]) for ids, mask, _ in got]
    assert trained[0] == trained[1] == ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
                                        '<|im_end|>\nIt is 18C.<|im_end|>\n')  # the call is learnt, not the result
    assert trained[2] == "Goodbye<|im_end|>\n"  # the completion only, not the prompt's assistant turn
    for bad, match in [({"messages": CALLING, "tools": "[{"}, r"line 1: field 'tools' is not valid JSON"),
                       ({"messages": CALLING, "tools": {"name": "x"}}, r"line 1: chat: 'tools' must be a list of "),
                       ({"messages": [{"role": "user", "content": None}]}, r"line 1: chat: message 0 must be")]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(FormatError, match=match):
            examples(path, tokenizer)


def test_fusegrad_finetune_reads_a_parquet_dataset_naming_its_fields(tmp_path, capsys):
    from fusegrad.models import Llama
    from fusegrad.models.llama import LlamaConfig

    Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=258, max_seq_len=64),
          seed=0).save_pretrained(tmp_path / "base")
    rows = [{"question": f"Count to {i}.", "answer": " ".join(map(str, range(i)))} for i in range(2, 12)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    out = tmp_path / "run"
    assert run_cli(["finetune", "--model", str(tmp_path / "base"), "--tokenizer", "byte", "--data",
                    str(tmp_path / "train-00000-of-00001.parquet"), "--prompt_field", "question",
                    "--completion_field", "answer", "--out", str(out), "--max_steps", "2", "--batch_size", "4",
                    "--quiet"]) == 0
    assert (out / "adapter_model.safetensors").exists()
    assert run_cli(["finetune", "--model", str(tmp_path / "base"), "--tokenizer", "byte", "--data",
                    str(tmp_path / "train-00000-of-00001.parquet"), "--text_field", "question", "--out", str(out),
                    "--max_steps", "3", "--batch_size", "4", "--resume", "--quiet"]) != 0
    assert "'prompt_field': ('question', 'prompt')" in capsys.readouterr().err  # a resume reads the same fields


@pytest.mark.parametrize("name, content, match", [
    ("s.jsonl", json.dumps({"conversations": [{"from": "bot", "value": "hi"}]}),
     r"s.jsonl: line 1: a ShareGPT turn is from 'bot', not one of human, gpt, system"),
    ("n.json", '[{"text": "a"}, {"text": "b", "score": NaN}]', r"n.json: record 1 is not valid JSON: NaN is not a finite"),
    ("t.json", '[{"text": "a"}, ["not", "an", "object"]]', r"t.json: record 1 is a JSON list, not an object"),
    ("m.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
     r"m.jsonl: line 1: byte: the tokenizer has no chat_template"),
    ("x.txt", "plain text", r"x.txt: a text file holds no records"),
])
def test_bad_records_name_the_file_and_the_record(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(FormatError, match=match):
        ftdata.lm_examples(ftdata.read_records(tmp_path / name), ByteTokenizer(), 64)


def test_a_validation_file_of_its_own_is_the_val_set_and_all_of_data_trains(tmp_path):
    from fusegrad.finetune.trainer import FinetuneConfig, Finetuner
    from fusegrad.models import Llama
    from fusegrad.models.llama import LlamaConfig

    Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=258, max_seq_len=64),
          seed=0).save_pretrained(tmp_path / "base")
    pq.write_table(pa.Table.from_pylist([{"text": f"train {i}"} for i in range(10)]), tmp_path / "train.parquet")
    (tmp_path / "valid.jsonl").write_text("".join(json.dumps({"text": f"valid {i}"}) + "\n" for i in range(3)))
    ft = Finetuner(FinetuneConfig(model=str(tmp_path / "base"), tokenizer="byte", data=str(tmp_path / "train.parquet"),
                                  val_data=str(tmp_path / "valid.jsonl"), out=str(tmp_path / "run"), quiet=True))
    text = [bytes(e.tokens[1:-1].astype(np.uint8)).decode() for e in ft.train_set + ft.val_set]
    assert sorted(text[:10]) == [f"train {i}" for i in range(10)] and text[10:] == [f"valid {i}" for i in range(3)]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"prompt": "x" * 80, "completion": "y"}) + "\n")
    with pytest.raises(FormatError, match=r"empty.jsonl: no usable example"):
        Finetuner(FinetuneConfig(model=str(tmp_path / "base"), tokenizer="byte", data=str(tmp_path / "train.parquet"),
                                 val_data=str(tmp_path / "empty.jsonl"), out=str(tmp_path / "run2"), quiet=True,
                                 max_len=32))


def test_a_dataset_directory_trains_on_its_train_files_and_validates_on_its_validation_files(tmp_path, capsys):
    from fusegrad.finetune.trainer import FinetuneConfig, Finetuner
    from fusegrad.models import Llama
    from fusegrad.models.llama import LlamaConfig

    Llama(LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=258, max_seq_len=64),
          seed=0).save_pretrained(tmp_path / "base")
    hub, mlx = tmp_path / "hub" / "data", tmp_path / "mlx"  # the Hugging Face Hub's layout, and mlx-lm's
    hub.mkdir(parents=True)
    mlx.mkdir()
    for split, n in (("train", 6), ("validation", 2), ("test", 3)):
        for shard in range(2 if split == "train" else 1):
            pq.write_table(pa.Table.from_pylist([{"text": f"{split} {shard} {i}"} for i in range(n)]),
                           hub / f"{split}-{shard:05d}-of-0000{2 if split == 'train' else 1}.parquet")
        (mlx / f"{'valid' if split == 'validation' else split}.jsonl").write_text(
            "".join(json.dumps({"text": f"{split} {i}"}) + "\n" for i in range(n)))
    (hub.parent / "README.md").write_text("a dataset card")
    for data, n_train in ((hub.parent, 12), (mlx, 6)):
        ft = Finetuner(FinetuneConfig(model=str(tmp_path / "base"), tokenizer="byte", data=str(data),
                                      out=str(tmp_path / "run" / data.name), quiet=True))
        text = lambda examples: sorted(bytes(e.tokens[1:-1].astype(np.uint8)).decode() for e in examples)
        assert [t.split()[0] for t in text(ft.train_set)] == ["train"] * n_train, data
        assert [t.split()[0] for t in text(ft.val_set)] == ["validation"] * 2, data  # no test example anywhere
        assert "val: " in ft.describe() and "test" not in ft.describe()
    assert ftdata.dataset_splits(tmp_path / "mlx" / "train.jsonl") == (tmp_path / "mlx" / "train.jsonl", None)
