"""The package's structure, checked: no import cycles, a light ``headwise.plan``, kinds named only in their folders.

The import graph is read from the source (module-level imports; ``if TYPE_CHECKING:`` blocks and
imports inside functions are lazy and do not count). Importing ``a.b.c`` runs ``a`` and ``a.b``
first, so those are edges too, except a module's edge to its own ancestors.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from headwise.kinds import registry

PACKAGE = Path(__file__).resolve().parent.parent / "headwise"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If):
                test = node.test
                lazy = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
                if not lazy:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its import runs (module level)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            parts = target.split(".")
            edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in files)
        parts = name.split(".")
        edges.update(".".join(parts[:i]) for i in range(1, len(parts)))          # parent packages run first
        graph[name] = {e for e in edges if e != name and not name.startswith(e + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_headwise_plan_loads_no_kernel_and_no_transformers():
    code = ("import sys, headwise.plan; from headwise.kinds import registry; registry.all_kinds(); "
            "print(sorted(m for m in sys.modules if m.startswith(('headwise.kernels', 'transformers', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def kind_naming(path: Path, kinds: set[str], classes: set[str]) -> set[str]:
    """How a module names a specific kind: its spec class, an import of its folder, a ``.kind == "<kind>"``
    comparison, a dict keyed by kind names, a string naming its folder's modules."""
    folder = re.compile(r"(^|\.)kinds\.(%s)(\.|:|$)" % "|".join(map(re.escape, kinds)))
    why = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name) and node.id in classes:
            why.add(node.id)
        elif isinstance(node, ast.alias) and node.name in classes:
            why.add(node.name)
        elif isinstance(node, ast.ImportFrom) and node.module and folder.search("." + node.module):
            why.add(f"import {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and folder.search(node.value):
            why.add(f"string {node.value!r}")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides) and any(
                    isinstance(c, ast.Constant) and c.value in kinds for s in sides for c in ast.walk(s)):
                why.add("compares .kind with a kind name")
        elif isinstance(node, ast.Dict) and sum(isinstance(k, ast.Constant) and k.value in kinds for k in node.keys) > 1:
            why.add("dict keyed by kind names")
    return why


def test_no_module_outside_a_kind_folder_names_a_specific_kind():
    kinds = {kind.name for kind in registry.all_kinds()}
    classes = {kind.spec.__name__ for kind in registry.all_kinds()}
    folders = {PACKAGE / "kinds" / name for name in kinds}
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(folder in path.parents for folder in folders):
            continue
        why = kind_naming(path, kinds, classes)
        if why:
            offenders[str(path.relative_to(PACKAGE))] = sorted(why)
    assert offenders == {}


@pytest.mark.parametrize("source, named", [
    ("from headwise.kinds.window import Window\n", True),
    ("from ..kinds.moh.spec import MoH\n", True),
    ("x = spec.kind == 'lightning'\n", True),
    ("MARKS = {'dense': 'D', 'hybrid': 'H'}\n", True),
    ("M = 'headwise.kinds.moh.cli'\n", True),
    ("from headwise.kinds import registry\nx = registry.get(name).mark\n", False),
    ("prefill = 'dense'\n", False),
], ids=["import", "relative-import", "kind-compare", "kind-dict", "module-string", "registry", "prefill-mode"])
def test_the_naming_check_sees_what_it_should(tmp_path, source, named):
    path = tmp_path / "m.py"
    path.write_text(source)
    kinds = {"window", "dense", "lightning", "hybrid", "moh", "softplus"}
    assert bool(kind_naming(path, kinds, {"Window", "Dense", "MoH"})) is named
