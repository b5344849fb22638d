"""`fusegrad export --dtype q4_k_m` (and the other llama.cpp K-quant file types, q2_k to q6_k) writes what
export_model writes (llama-quantize's bytes: tests/models/test_gguf_types.py); unknown types are refused with the
choices, and a GGUF LoRA adapter takes none of them (llama.cpp's adapters are F32 / F16 here)."""
import gguf
import pytest

import fusegrad as fg
from fusegrad.cli.main import main
from fusegrad.finetune.gguf_adapter import write_gguf_adapter
from fusegrad.finetune.lora import LoraConfig, attach_lora
from fusegrad.models import Llama
from fusegrad.models.export import export_model


def test_export_q4_k_m_from_the_command_line(tmp_path, capsys):
    model = Llama.from_preset("tiny", seed=2, dim=256, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=258)
    model.save_pretrained(tmp_path / "hf")
    assert main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "cli.gguf"), "--dtype", "q4_k_m"]) == 0
    export_model(Llama.from_pretrained(tmp_path / "hf"), tmp_path / "api.gguf", "gguf", dtype="q4_k_m")
    cli, api = (gguf.GGUFReader(tmp_path / f"{name}.gguf").tensors for name in ("cli", "api"))
    assert [(t.name, t.tensor_type.name, t.data.tobytes()) for t in cli] == [
        (t.name, t.tensor_type.name, t.data.tobytes()) for t in api]
    assert {t.tensor_type.name for t in cli} == {"F32", "Q4_K", "Q6_K"}
    with pytest.raises(SystemExit):  # argparse's own refusal, with the choices
        main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "x.gguf"), "--dtype", "q4_k"])
    assert "invalid choice: 'q4_k'" in capsys.readouterr().err


def test_unknown_types_are_refused_with_the_choices(tmp_path):
    from fusegrad.cli.export import export

    with pytest.raises(fg.ConfigError, match=r"--dtype is gguf's tensor type \(f32, .*, q4_0, q2_k, q3_k_s, q3_k_m, "
                                             r"q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k\), got 'iq4_xs' for gguf"):
        export(tmp_path / "src", tmp_path / "m.gguf", dtype="iq4_xs")


def test_a_gguf_lora_adapter_takes_no_k_quant(tmp_path):
    lora = attach_lora(Llama.from_preset("tiny"), LoraConfig(targets=("q", "v"), r=4, alpha=8))
    with pytest.raises(fg.ConfigError, match="a GGUF adapter holds f32, f16 tensors, not 'q4_k_m'"):
        write_gguf_adapter(lora, tmp_path / "a.gguf", "q4_k_m")
