"""The package's layers: every module imports only from its own layer or the ones below, and no
two modules import each other, directly or round a loop. Function-level imports count too, so
none can hide a cycle."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "qlora_np"

LAYERS = [
    ("qlora_np.errors", "qlora_np.dtypes", "qlora_np.runtime"),
    ("qlora_np.quant.codebooks",),
    ("qlora_np.kernels",),
    ("qlora_np.quant",),
    ("qlora_np.linalg",),
    ("qlora_np.nn",),
    ("qlora_np.io.safetensors", "qlora_np.io.gguf", "qlora_np.io.gguf_quants"),
    ("qlora_np.models",),
    ("qlora_np.io",),
    ("qlora_np.train",),
    ("qlora_np.cli", "qlora_np.demo", "qlora_np.__main__", "qlora_np"),
]
"""Bottom to top. A module belongs to the layer of the longest prefix that names it."""


def layer_of(module):
    """The index in LAYERS of the longest prefix naming ``module``."""
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def module_name(path, root):
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path, root, known):
    """(imported qlora_np module, line) for every import in the file, at any depth; a name
    imported from a package counts as its submodule when there is one. The lazy names of the
    package's ``_PUBLIC`` table count as imports of their modules."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((sub if sub in known else source, node.lineno))
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("_PUBLIC", "_MODULES")
                                                  for t in node.targets):
            for value in ast.walk(node.value):
                if isinstance(value, ast.Constant) and isinstance(value.value, str) \
                        and value.value.startswith("qlora_np."):
                    found.append((value.value, value.lineno))
    return [(name, line) for name, line in found if name in known and name != me]


def import_graph(root=PACKAGE):
    """module → [(imported module, file:line)] over every module under ``root``."""
    paths = sorted(root.rglob("*.py"))
    known = {module_name(path, root) for path in paths}
    return {module_name(path, root): [(name, f"{path.relative_to(root.parent)}:{line}")
                                      for name, line in imports_of(path, root, known)]
            for path in paths}


def upward_imports(graph):
    """'where: a (layer i) imports b (layer j > i)' for every import of a higher layer."""
    return [f"{where}: {module} (layer {layer_of(module)}) imports {name} (layer {layer_of(name)})"
            for module, edges in graph.items() for name, where in edges
            if layer_of(name) is not None and layer_of(module) is not None and layer_of(name) > layer_of(module)]


def cycles(graph):
    """Every import loop found by a depth-first walk, as 'a → b → … → a'."""
    found, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for name, _ in graph.get(module, ()):
            if state.get(name) == "open":
                found.append(" → ".join(stack[stack.index(name):] + [name]))
            elif name not in state:
                visit(name, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return found


def test_every_module_has_a_layer():
    assert [module for module in import_graph() if layer_of(module) is None] == []


def test_no_module_imports_from_a_layer_above():
    assert upward_imports(import_graph()) == []


def test_the_imports_have_no_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_catch_an_injected_cycle_and_upward_import(tmp_path):
    root = tmp_path / "qlora_np"
    (root / "nn").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "errors.py").write_text("")
    (root / "nn" / "__init__.py").write_text("")
    (root / "nn" / "lora.py").write_text("from qlora_np.nn import optim\n")
    (root / "nn" / "optim.py").write_text("def step():\n    from qlora_np.nn.lora import x\n")
    (root / "dtypes.py").write_text("from qlora_np.nn.lora import x\n")
    graph = import_graph(root)
    assert cycles(graph) == ["qlora_np.nn.lora → qlora_np.nn.optim → qlora_np.nn.lora"]
    assert len(upward_imports(graph)) == 1 and "qlora_np.dtypes (layer 0) imports qlora_np.nn.lora" \
        in upward_imports(graph)[0]


@pytest.mark.parametrize("module", ["qlora_np.kernels.x86.amx", "qlora_np.io.gguf", "qlora_np.io.bnb",
                                    "qlora_np.quant.codebooks", "qlora_np"])
def test_layer_of_takes_the_longest_prefix(module):
    expected = {"qlora_np.kernels.x86.amx": 2, "qlora_np.io.gguf": 6, "qlora_np.io.bnb": 8,
                "qlora_np.quant.codebooks": 1, "qlora_np": 10}
    assert layer_of(module) == expected[module]
