"""llama.cpp itself for the tests: node-llama-cpp's prebuilt CPU build, as npm ships it, reads fusegrad's GGUF.

node-llama-cpp (VERSION) and its linux-x64 binaries (~100 MB) are installed once with npm under
$FUSEGRAD_TEST_CACHE/node-llama-cpp; the tests skip, saying why, when node or npm is missing, the machine is not
x86-64 Linux (the only binaries installed), or the registry cannot be reached.
"""
import json
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fusegrad as fg
from tests.real_checkpoint import cache_dir

VERSION = "3.22.1"
SCRIPT = os.path.join(os.path.dirname(__file__), "models", "llamacpp_eval.mjs")


def node_llama_cpp() -> str:
    """The directory of node-llama-cpp with its CPU binaries, installed on first use."""
    root = os.path.join(cache_dir(), f"node-llama-cpp-{VERSION}")
    module = os.path.join(root, "node_modules", "node-llama-cpp")
    if os.path.isfile(os.path.join(root, "installed")):
        return module
    if not (sys.platform.startswith("linux") and platform.machine() == "x86_64"):
        pytest.skip("llama.cpp's prebuilt binaries are installed here for x86-64 Linux only")
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to install llama.cpp (node-llama-cpp)")
    os.makedirs(root, exist_ok=True)
    npm = subprocess.run(["npm", "install", "--prefix", root, "--omit=optional", "--ignore-scripts", "--no-audit",
                          "--no-fund", f"node-llama-cpp@{VERSION}", f"@node-llama-cpp/linux-x64@{VERSION}"],
                         capture_output=True, text=True, timeout=900)
    if npm.returncode:
        pytest.skip(f"cannot install node-llama-cpp (registry unreachable?): {npm.stderr.strip()[-300:]}")
    open(os.path.join(root, "installed"), "w").close()
    return module


def llamacpp(gguf_path, ids=None, texts=(), lora=None, generate=0) -> dict:
    """llama.cpp's next-token probabilities after `ids` ({id: p}), with the GGUF LoRA adapter `lora` applied if
    given, or the `generate` tokens it picks greedily after them; and its ids for each of `texts`."""
    request = {"texts": list(texts), **({} if ids is None else {"ids": [int(i) for i in ids]}),
               **({} if lora is None else {"lora": os.fspath(lora)}), **({"generate": generate} if generate else {})}
    run = subprocess.run(["node", SCRIPT, node_llama_cpp(), os.fspath(gguf_path), json.dumps(request)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"llama.cpp could not read {gguf_path}: {run.stderr.strip()[-2000:]}"
    out = json.loads(run.stdout)
    return {"probs": dict(out.get("probs") or []), "tokens": out["tokens"], "generated": out.get("generated")}


def as_array(probs: dict, vocab_size: int) -> np.ndarray:
    """llama.cpp's {id: p} as a (vocab_size,) array."""
    return np.array([probs.get(i, 0.0) for i in range(vocab_size)])


def next_token_probs(model, ids) -> np.ndarray:
    """fusegrad's (vocab_size,) float64 next-token distribution after `ids`."""
    with fg.no_grad():
        logits = model.logits(np.array([ids])).numpy()[0, -1].astype(np.float64)
    p = np.exp(logits - logits.max())
    return p / p.sum()


def sharpened(model, scale=20.0):
    """The model with its weights (not its norms) scaled, so that next-token distributions are far from flat."""
    for name, t in model.params.items():
        if not name.endswith("norm"):
            t.data *= scale
    return model
