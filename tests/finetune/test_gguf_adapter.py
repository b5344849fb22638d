"""A fusegrad LoRA adapter as llama.cpp's GGUF adapter: llama.cpp with the base GGUF and `--lora adapter.gguf`
gives the next-token probabilities fusegrad gives with the adapter attached (llama's and qwen2's row orders,
plain and rsLoRA scaling), through `fusegrad export --format gguf-lora` too."""
import numpy as np
import pytest

import fusegrad as fg
from fusegrad.cli.main import main
from fusegrad.data.tokenizer import ByteTokenizer
from fusegrad.finetune.gguf_adapter import write_gguf_adapter
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.finetune.peft_io import save_adapter
from fusegrad.models import Llama
from fusegrad.models.export import export_model
from tests.llamacpp import as_array, llamacpp, next_token_probs, sharpened

IDS = [int(i) for i in np.random.default_rng(0).integers(0, 256, 20)]


def adapted(overrides, directory, **lora_kw):
    """A tiny byte-level model with sharp next-token distributions, saved as `directory`/base.gguf and as a
    Hugging Face directory `directory`/base, then given a LoRA on all seven projections whose B is random (a
    fresh B is zero: the adapter would change nothing)."""
    model = sharpened(Llama.from_preset("tiny", seed=8, vocab_size=258, **overrides))
    export_model(model, directory / "base.gguf", "gguf", ByteTokenizer(), "f32")
    model.save_pretrained(directory / "base")
    ByteTokenizer().save(directory / "base")
    lora = attach_lora(model, LoraConfig(targets="all", r=4, **lora_kw))
    rng = np.random.default_rng(1)
    for proj in lora.projections.values():
        for t in proj.targets:
            proj.B[t].data = rng.normal(0, 1.0, proj.B[t].shape).astype(np.float32)
    return model, lora


@pytest.mark.parametrize("overrides, lora_kw", [({}, {"alpha": 8.0}), ({}, {"alpha": 8.0, "rslora": True}),
                                                ({"qkv_bias": True}, {"alpha": 8.0})],
                         ids=["llama", "llama-rslora", "qwen2"])
def test_llamacpp_with_the_gguf_adapter_gives_fusegrads_probabilities(overrides, lora_kw, tmp_path):
    model, lora = adapted(overrides, tmp_path, **lora_kw)
    names = write_gguf_adapter(lora, tmp_path / "lora.gguf")
    assert len(names) == 2 * 7 * model.config.n_layers
    ours = next_token_probs(model, IDS)
    theirs = as_array(llamacpp(tmp_path / "base.gguf", IDS, lora=tmp_path / "lora.gguf")["probs"], 258)
    assert theirs.argmax() == ours.argmax() and np.abs(theirs - ours).max() < 1e-3
    base = as_array(llamacpp(tmp_path / "base.gguf", IDS)["probs"], 258)
    assert np.abs(base - ours).max() > 0.05  # the adapter matters: the base alone is far off


def test_export_gguf_lora_from_a_finetunes_adapter_dir(tmp_path):
    model, lora = adapted({}, tmp_path, alpha=16.0)
    save_adapter(tmp_path / "ft", lora, base_model=str(tmp_path / "base"))
    assert main(["export", str(tmp_path / "ft"), "--format", "gguf-lora", "--out", str(tmp_path / "ft.gguf")]) == 0
    theirs = as_array(llamacpp(tmp_path / "base.gguf", IDS, lora=tmp_path / "ft.gguf")["probs"], 258)
    assert np.abs(theirs - next_token_probs(model, IDS)).max() < 1e-3


def test_an_adapter_trained_on_a_quantized_gguf_base_applies_to_that_file_in_llamacpp(tmp_path):
    """The base read from a Q8_0 GGUF (widened to float32), fine-tuned, and its adapter dir alone exported: llama.cpp
    with the same Q8_0 file and the adapter gives what fusegrad gives, within llama.cpp's Q8_0 arithmetic."""
    export_model(sharpened(Llama.from_preset("tiny", seed=8, vocab_size=258)), tmp_path / "q8.gguf", "gguf",
                 ByteTokenizer(), "q8_0")
    (tmp_path / "qa.jsonl").write_text('{"prompt": "2+2=", "completion": "4"}\n' * 8)
    assert main(["finetune", "--model", str(tmp_path / "q8.gguf"), "--data", str(tmp_path / "qa.jsonl"), "--out",
                 str(tmp_path / "ft"), "--max_steps", "3", "--batch_size", "2", "--lr", "0.05", "--lora_targets",
                 "all", "--quiet"]) == 0
    assert main(["export", str(tmp_path / "ft"), "--format", "gguf-lora", "--out", str(tmp_path / "ft.gguf")]) == 0
    from fusegrad.cli.export import load_merged
    model = load_merged(str(tmp_path / "ft"))[0]  # the base the adapter dir names: the GGUF file
    ours = next_token_probs(model, IDS)
    theirs = as_array(llamacpp(tmp_path / "q8.gguf", IDS, lora=tmp_path / "ft.gguf")["probs"], 258)
    base = next_token_probs(Llama.from_pretrained(tmp_path / "q8.gguf"), IDS)
    assert np.abs(theirs - ours).max() < 3e-2 < np.abs(base - ours).max()


def test_gguf_adapter_refuses_what_llamacpp_cannot_take(tmp_path, capsys):
    model, lora = adapted({}, tmp_path, alpha=8.0)
    with pytest.raises(fg.ConfigError, match=r"GGUF adapter holds f32, f16 tensors, not 'q8_0'"):
        write_gguf_adapter(lora, tmp_path / "a.gguf", "q8_0")
    lora.head = np.zeros((3, model.config.dim), np.float32)
    with pytest.raises(fg.FormatError, match=r"classification head has no place"):
        write_gguf_adapter(lora, tmp_path / "a.gguf")
    lora.head = None
    lora.projections["layers.1.w2"].B["down"].data[0, 0] = np.inf
    with pytest.raises(fg.FormatError, match=r"a\.gguf: the down adapter of layer 1 holds NaN or inf"):
        write_gguf_adapter(lora, tmp_path / "a.gguf")
    assert main(["export", str(tmp_path / "base"), "--format", "gguf-lora", "--out", str(tmp_path / "x.gguf")]) != 0
    assert "gguf-lora writes an adapter; " in capsys.readouterr().err
    assert [p.name for p in tmp_path.glob("*.gguf*")] == ["base.gguf"]
