"""QLoRA's 4-bit base is bitsandbytes' NF4 of each Hugging Face module (q, k, v, o, gate, up, down quantized
on its own, blocks of 64), also where fusegrad computes q/k/v and gate/up as one fused GEMM: loaded from a
transformers-made bf16 checkpoint, or quantized from a model in memory."""

import numpy as np
import pytest

from fusegrad.finetune.lora import PROJECTIONS, LoraConfig
from fusegrad.finetune.qlora import attach_qlora
from fusegrad.models import Llama
from fusegrad.models.hf_names import FUSED, hf_name, split_to_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bf16")
    hf = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    hf.save_pretrained(path)
    return path, {k: v.float() for k, v in hf.state_dict().items()}


def bnb_nf4(bnbf, w, double_quant):
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    return packed.numpy().reshape(-1), bnbf.dequantize_4bit(packed, state, quant_type="nf4").numpy()


def modules(model):
    """{HF module weight name: (our NF4Tensor of it, our dequantized module in HF layout)}."""
    out = {}
    for i in range(model.config.n_layers):
        for kind in PROJECTIONS:
            fused = model.quantized[f"layers.{i}.{kind}"]
            parts = split_to_hf(model.config, kind, fused.dequantize())
            for (q, _), (t, deq) in zip(fused.parts, parts):
                out[hf_name(i, t)] = (q, deq)
    return out


def test_streamed_load_quantizes_every_module_as_bitsandbytes(bnbf, checkpoint):
    path, state = checkpoint
    model = Llama.from_pretrained(path, quantize="nf4")  # double-quantized scales, QLoRA's default
    assert not any(k.endswith(tuple(FUSED)) for k in model.params)
    ours = modules(model)
    assert len(ours) == 7 * model.config.n_layers
    for name, (q, deq) in ours.items():
        packed, want = bnb_nf4(bnbf, state[name], double_quant=True)
        assert q.shape == tuple(state[name].shape) and q.packed.tobytes() == packed.tobytes(), name
        # double quantization: bitsandbytes' CPU search rounds a few 8-bit scale codes up by one step
        # (tests/quant/test_nf4.py), so dequantized values agree to a fraction of a scale step
        np.testing.assert_allclose(deq, want, atol=0.01 * float(state[name].abs().max()), rtol=0, err_msg=name)


def test_quantizing_a_loaded_model_equals_bitsandbytes_bit_for_bit(bnbf, checkpoint):
    path, state = checkpoint
    model = Llama.from_pretrained(path)
    attach_qlora(model, LoraConfig(targets=("q", "v"), r=4), double_quant=False)
    for name, (q, deq) in modules(model).items():
        packed, want = bnb_nf4(bnbf, state[name], double_quant=False)
        assert q.packed.tobytes() == packed.tobytes(), name
        assert deq.tobytes() == want.tobytes(), name  # every dequantized value equal to bitsandbytes'
