"""The package's shape, checked from the source with ``ast`` (docs/design.md, "Layers").

- The internal import graph (module-level and function-level imports alike) has no cycle.
- No module imports from a layer above its own: util/environment < config < data < models < methods <
  training < finetuning < inference < evaluation < reports < presets < the commands (benchmark,
  search, launch, demo, experiment, bench, cli, the package root).
- No function is longer than 100 lines or takes more than 10 parameters, unless its docstring says
  why on a line starting with ``Exempt from the size rule:``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "volssl"

#: docs/design.md's order: a module may import from its own layer and the ones before it
LAYERS = [
    {"util", "environment"},
    {"config"},
    {"data"},
    {"models"},
    {"methods"},
    {"training"},
    {"finetuning"},
    {"inference"},
    {"evaluation"},
    {"reports"},
    {"presets"},  # registers presets, recipes and benchmark arms; imported by the root's spec loader
    {"benchmark", "search", "launch", "demo", "experiment", "bench", "cli", "__main__", ""},
]
MAX_LINES = 100
MAX_PARAMS = 10
EXEMPT = "Exempt from the size rule:"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The volssl modules ``name`` imports anywhere in its file (a package import counts as its __init__)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
        else:
            continue
        for target in targets:
            if not target.startswith("volssl"):
                continue
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in mods and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its folder {top!r} is in no layer of tests/test_architecture.py (add it to "
                         "LAYERS and to docs/design.md)")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} -> {t}" for m, targets in sorted(_graph().items()) for t in sorted(targets)
              if _layer(t) > _layer(m)]
    assert upward == []


def test_the_layer_check_sees_function_level_imports(tmp_path):
    mods = {"volssl.data.x": tmp_path / "x.py", "volssl.reports.y": tmp_path / "y.py"}
    mods["volssl.data.x"].write_text("def f():\n    from volssl.reports.y import g\n    return g\n")
    assert _imports("volssl.data.x", mods["volssl.data.x"], mods) == {"volssl.reports.y"}
    assert _layer("volssl.reports.y") > _layer("volssl.data.x")


def _n_params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
    return n - 1 if a.args and a.args[0].arg in ("self", "cls") else n


def _oversized() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            params = _n_params(node)
            if (lines > MAX_LINES or params > MAX_PARAMS) and EXEMPT not in (ast.get_docstring(node) or ""):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {lines} lines, {params} parameters")
    return bad


def test_no_function_is_longer_than_100_lines_or_takes_more_than_10_parameters():
    assert _oversized() == []


@pytest.mark.parametrize("source, expected", [
    ("def f(a, b):\n" + "    x = 1\n" * 100, 1),
    ("def f(" + ", ".join(f"a{i}" for i in range(11)) + "):\n    pass\n", 1),
    ("class C:\n    def m(self, " + ", ".join(f"a{i}" for i in range(10)) + "):\n        pass\n", 0),
    ('def f(a):\n    """Exempt from the size rule: a table."""\n' + "    x = 1\n" * 100, 0),
])
def test_the_size_check_counts_lines_and_parameters(source, expected):
    tree = ast.parse(source)
    fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    flagged = [f for f in fns if (f.end_lineno - f.lineno + 1 > MAX_LINES or _n_params(f) > MAX_PARAMS)
               and EXEMPT not in (ast.get_docstring(f) or "")]
    assert len(flagged) == expected
