import doctest
import importlib

import pytest


@pytest.mark.parametrize("name", ["corpus", "llama2c_tokenizer", "prepare", "shards", "tokenizer"])
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(f"fusegrad.data.{name}"))
    assert result.attempted > 0 and result.failed == 0
