"""The import graph of the packages, read with `ast` (nothing is imported): no circle, the
one-way rules of the design (train -> eval -> dsjax, sharding; sharding knows no model),
the core free of the CPU wing, and no private `jax._src` import anywhere."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dsjax", "sharding", "eval", "train")
# What each package may not import (DESIGN.md, "Imports point one way").
FORBIDDEN = {"dsjax": {"sharding", "eval", "train"}, "sharding": {"dsjax", "eval", "train"}, "eval": {"train"}}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the packages."""
    out = {}
    for package in PACKAGES:
        for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"), recursive=True):
            out[_module_name(path)] = path
    return out


def _type_checking(node) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _imported(path: str, name: str, modules=()) -> list[str]:
    """Every module name `path` (module `name`) imports, at file level or inside functions
    (not under `if TYPE_CHECKING:`); `from x import y` names x.y where that is one of
    `modules`, else x (the package's own __init__ running first is not counted)."""
    tree = ast.parse(open(path).read())
    skip = {id(n) for block in ast.walk(tree) if _type_checking(block) for n in ast.walk(block)}
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for a in node.names:
                out.append(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imported(path, name, modules) if m in modules and m != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    graph = _graph()
    assert graph["train.loop"] and graph["train.stages.sft"], "the graph reads the imports"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_one_way():
    """train -> eval -> dsjax, sharding: no package imports one it may not."""
    modules = _modules()
    for name, path in modules.items():
        forbidden = FORBIDDEN.get(name.split(".")[0], set())
        for imported in _imported(path, name):
            assert imported.split(".")[0] not in forbidden, f"{path} imports {imported}"


def test_train_config_knows_no_stage():
    """The run config is assembled from the stages' declarations, passed in: train/config.py
    imports no stage (the stages import it)."""
    graph = _graph()
    assert not {m for m in graph["train.config"] if m.startswith("train.stages")}


def test_the_core_does_not_import_the_cpu_wing():
    """No dsjax module outside dsjax/cpu/ imports it (dsjax/__init__.py may, to register it)."""
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("dsjax.") and not name.startswith("dsjax.cpu"):
            wing = [m for m in _imported(path, name) if m == "dsjax.cpu" or m.startswith("dsjax.cpu.")]
            assert not wing, f"{path} imports {wing}"


def test_no_private_jax_import_anywhere():
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        if f"{os.sep}.git{os.sep}" in path:
            continue
        for imported in _imported(path, _module_name(path)):
            assert not imported.startswith("jax._src"), f"{path} imports {imported}"
