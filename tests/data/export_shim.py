"""TEMPORARY, delete once W-models' fusegrad.models.export is merged: the agreed
`export_model(model, out, format, tokenizer=None, dtype=None)` for the hf and llama2c formats through the
models' own writers, so `fusegrad export` / `merge` run on the w-paths branch. With the real module present
the fixture installs nothing and the tests run against it."""
import importlib.util
import sys
import types

import pytest


def _export_model(model, out, format, tokenizer=None, dtype=None):
    if format == "hf":
        model.save_pretrained(out)
        if tokenizer is not None:
            tokenizer.save(out)
    elif format == "llama2c":
        model.save_llama2c(out)
    else:
        pytest.skip(f"export format {format} needs W-models' fusegrad.models.export")


@pytest.fixture
def export_api(monkeypatch):
    """True when the shim stands in for fusegrad.models.export."""
    if importlib.util.find_spec("fusegrad.models.export") is not None:
        return False
    monkeypatch.setitem(sys.modules, "fusegrad.models.export", types.SimpleNamespace(export_model=_export_model))
    return True
