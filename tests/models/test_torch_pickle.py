"""Older Hugging Face checkpoints publish `pytorch_model.bin` (torch.save's zip of a pickled state dict): fusegrad
reads them without torch and without running the pickle. Oracles: torch.load(weights_only=True) for every tensor,
transformers' logits on the same weights."""
import json
import os

import numpy as np
import pytest

import fusegrad as fg
from fusegrad.models import Llama
from fusegrad.models.hf import HFCheckpoint
from tests.models.test_hf_checkpoints import make_checkpoint, transformers_logits

torch = pytest.importorskip("torch")


def as_pytorch_bin(directory, shards=1, extra=None):
    """Rewrite a safetensors checkpoint as transformers < 4.35 saved one: pytorch_model.bin (or shards with
    pytorch_model.bin.index.json), with the rotary inv_freq buffers those versions kept in the state dict."""
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    state.update(extra or {})
    names = sorted(state)
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return directory
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, directory / file)
        weight_map.update({n: file for n in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


@pytest.mark.parametrize("kind, shards", [("llama2", 1), ("smollm2", 1), ("qwen2", 3)])
def test_pytorch_model_bin_gives_torch_loads_tensors_and_transformers_logits(kind, shards, tmp_path):
    tokens = np.random.default_rng(0).integers(0, 67, (2, 20))
    path = make_checkpoint(tmp_path / kind, kind)
    want = transformers_logits(path, tokens)  # from the safetensors the .bin is then made from
    as_pytorch_bin(path, shards, extra={"model.position_ids": torch.arange(64)})  # an int64 buffer: left out
    ckpt = HFCheckpoint(path)
    for name, entry in ckpt.entries.items():
        theirs = torch.load(path / entry[0].rsplit("/", 1)[-1], weights_only=True)[name]
        np.testing.assert_array_equal(ckpt[name], theirs.float().numpy(), err_msg=name)
    assert "model.position_ids" not in ckpt.entries
    with fg.no_grad():
        got = Llama.from_pretrained(path).logits(tokens).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_pickle_that_calls_anything_else_is_refused_and_never_run(tmp_path):
    path = as_pytorch_bin(make_checkpoint(tmp_path / "m", "llama2"))
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "payload": Payload()}, path / "pytorch_model.bin")
    with pytest.raises(fg.FormatError, match=r"pytorch_model.bin: the pickle calls (posix|os)\.system; a state dict "
                                             r"calls only torch's tensor rebuild"):
        Llama.from_pretrained(path)
    assert not marker.exists()


def test_what_cannot_be_read_is_named(tmp_path):
    path = as_pytorch_bin(make_checkpoint(tmp_path / "m", "llama2"))
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.save({**state, name: state[name].T.contiguous().T}, path / "pytorch_model.bin")  # same shape, strided
    with pytest.raises(fg.FormatError, match=rf"tensor '{name}' is stored as a strided view"):
        Llama.from_pretrained(path)
    torch.save(state, path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(fg.FormatError, match=r"pytorch_model.bin: not a zip archive: torch < 1.6's legacy pickle"):
        Llama.from_pretrained(path)
    torch.save({k: v for k, v in state.items() if k != name}, path / "pytorch_model.bin")
    with pytest.raises(fg.FormatError, match=rf"\(pytorch_model\*\.bin\): no tensor '{name}'"):
        Llama.from_pretrained(path)
    (path / "pytorch_model.bin").write_bytes((path / "pytorch_model.bin").read_bytes()[:-100])
    with pytest.raises(fg.FormatError, match=r"pytorch_model.bin: not a readable torch.save checkpoint"):
        Llama.from_pretrained(path)
    (path / "pytorch_model.bin").unlink()
    with pytest.raises(fg.FormatError, match=r"no weights \(\*.safetensors, or pytorch_model\*.bin\)"):
        Llama.from_pretrained(path)
