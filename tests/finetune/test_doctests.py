"""The runnable examples in fusegrad.finetune's docstrings (bench's builds a LoRA step for the peer)."""
import doctest
import importlib

import pytest

MODULES = ["lora", "qlora", "peft_io", "data", "losses", "bench", "trainer"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"fusegrad.finetune.{name}")
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
