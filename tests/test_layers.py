"""The house's layering, read from the source: imports only go down, no cycles, no hidden imports.

core -> backends -> ops -> quant -> models -> data -> parallel -> train -> finetune -> cli: a module imports
fusegrad modules of its own layer or of layers below it, at module level only (a function-level import is
for an optional heavy dependency, never for a fusegrad module), and never the top package `fusegrad`
(which imports every layer). The module-level import graph has no cycle.
"""
import ast
import pathlib

import pytest

LAYERS = ["core", "backends", "ops", "quant", "models", "data", "parallel", "train", "finetune", "cli"]
ROOT = pathlib.Path(__file__).resolve().parents[1] / "fusegrad"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":  # the top package (and `python -m fusegrad`) sit above all
        return len(LAYERS)
    return LAYERS.index(parts[1])


def imports(path: pathlib.Path):
    """(imported fusegrad module, line, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = set(map(id, tree.body))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this package
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            if name == "fusegrad" or name.startswith("fusegrad."):
                yield name, node.lineno, id(node) in top


def test_the_layer_list_covers_every_package():
    assert {m.split(".")[1] for m in MODULES if m.count(".")} - {"__main__"} <= set(LAYERS)


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("fusegrad", "fusegrad.__main__")])
def test_imports_only_go_down_and_sit_at_module_level(module):
    path = MODULES[module]
    for target, line, at_top in imports(path):
        where = f"{path.relative_to(ROOT.parent)}:{line} imports {target}"
        assert target != "fusegrad", f"{where}: the top package imports every layer; import the module needed"
        assert at_top, f"{where} inside a function: fusegrad modules are imported at module level"
        assert layer(target) <= layer(module), (f"{where}: layer {LAYERS[layer(target)]} is above "
                                                f"{LAYERS[layer(module)]}")


def test_no_import_cycles():
    graph = {m: {t for t, _, top in imports(p) if top and t in MODULES and t != m} for m, p in MODULES.items()}
    state = {}  # module -> 1 while on the stack, 2 when done

    def visit(m, stack):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
