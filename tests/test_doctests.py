"""Runs the docstring examples of every fusegrad module; a module whose optional dependency is missing
is skipped with that reason (never silently)."""
import doctest
import importlib
import pathlib

import pytest

import fusegrad

ROOT = pathlib.Path(fusegrad.__file__).parent
MODULES = sorted(
    ".".join(("fusegrad",) + p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in ROOT.rglob("*.py")
)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] == "fusegrad":
            raise  # a broken import inside fusegrad is a failure, not a skip
        pytest.skip(f"{name} needs the optional dependency {exc.name!r}")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, module=module):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
