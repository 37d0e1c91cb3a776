# The shape of moreh_ap's source: imports flow one way, no sys.modules lookups, no overlong modules.
"""Static checks over every module of ``moreh_ap/`` (read with :mod:`ast`, nothing is imported).

The import graph:
    A node per module: ``moreh_ap/a/b.py`` is ``moreh_ap.a.b``; a package's ``__init__.py`` is the
    package (``moreh_ap/a/__init__.py`` is ``moreh_ap.a``). Every ``import`` and ``from ... import``
    counts, at module level and inside functions and classes alike, relative ones resolved, and so
    does ``importlib.import_module("moreh_ap....")`` with a constant name. ``import moreh_ap.a.b`` is an
    edge to ``moreh_ap.a.b``; ``from moreh_ap.a import b`` is an edge to ``moreh_ap.a.b`` when ``b`` is
    a module, else to ``moreh_ap.a``. A name that is not a module counts as the longest prefix that
    is. Only imports of moreh_ap modules are edges. The graph must have no cycle: no module imports
    another that (directly or through others) imports it back. A package's ``__init__`` importing
    its own submodules to re-export them is fine as long as none of them imports the package back.

``sys.modules``:
    No module touches ``sys.modules`` (however ``sys`` is imported or renamed), except the uses in
    ``SYS_MODULES_ALLOWED``, each with the reason it cannot be avoided.

Long modules (the convention):
    A module over ``MAX_LINES`` lines says why in a comment line starting with ``# long:`` among its
    first 3 lines, e.g. ``# long: the whole apex amp state machine; split it and the callers break``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT
PACKAGE = ROOT / "moreh_ap"
MAX_LINES = 400
LONG_MARK = "# long:"

KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {
}
"""Edges left out of the cycle check for now; an entry whose edge no longer exists fails the test."""

SYS_MODULES_ALLOWED: dict[str, tuple[int, str]] = {
    "moreh_ap/__init__.py": (2, "registers the package itself under the public alias torch.moreh"),
    "moreh_ap/launcher.py": (1, "asks whether IPython or ipykernel are loaded, without importing them"),
}
"""File -> (most ``sys.modules`` uses it may have, why); any other use fails."""

LONG_ALLOWED: dict[str, str] = {
}
"""Modules over the limit without a ``# long:`` line, owned by a refactor under way."""


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, else its longest prefix that is a module (None outside moreh_ap)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _resolve_from(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute dotted name of ``from <this> import ...`` in ``module``."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(tree: ast.AST, module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The moreh_ap modules ``module`` imports, anywhere in its body."""
    found: set[str] = set()

    def add(name: str) -> None:
        target = _known(name, modules)
        if target is not None:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, module, path)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if alias.name != "*" and sub in modules else base)
        elif isinstance(node, ast.Call) and _is_import_module_call(node):
            add(node.args[0].value)
    return found


def _is_import_module_call(node: ast.Call) -> bool:
    fn = node.func
    named = (isinstance(fn, ast.Attribute) and fn.attr == "import_module") or (
        isinstance(fn, ast.Name) and fn.id in ("import_module", "__import__"))
    return named and bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)


def import_graph() -> nx.DiGraph:
    """The graph of moreh_ap-internal imports (module -> module it imports)."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for target in _imported(tree, module, path, modules):
            graph.add_edge(module, target)
    return graph


def _sys_modules_uses(tree: ast.AST) -> list[int]:
    """Line numbers where ``sys.modules`` is used (``import sys as s; s.modules``, ``from sys import modules``)."""
    sys_names = {"sys"}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            sys_names |= {a.asname or a.name for a in node.names if a.name == "sys"}
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and node.level == 0:
            lines += [node.lineno for a in node.names if a.name in ("modules", "*")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "modules" and isinstance(node.value, ast.Name) \
                and node.value.id in sys_names:
            lines.append(node.lineno)
    return sorted(lines)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_graph_sees_function_level_and_relative_imports():
    """The parser itself: relative imports, imports inside functions, ``from pkg import module``."""
    modules = {"moreh_ap": Path("moreh_ap/__init__.py"), "moreh_ap.a": Path("moreh_ap/a/__init__.py"),
               "moreh_ap.a.b": Path("moreh_ap/a/b.py"), "moreh_ap.c": Path("moreh_ap/c.py")}
    source = ("from . import c\nfrom .. import a\n"
              "def f():\n    from moreh_ap.a import b, helper\n    import moreh_ap.c.x\n    import torch\n")
    got = _imported(ast.parse(source), "moreh_ap.a.b", modules["moreh_ap.a.b"], modules)
    assert got == {"moreh_ap.a", "moreh_ap.a.b", "moreh_ap.c"}
    got = _imported(ast.parse("def f():\n    from moreh_ap.a import b\n"), "moreh_ap.c", modules["moreh_ap.c"], modules)
    assert got == {"moreh_ap.a.b"}
    got = _imported(ast.parse("from .a import helper\nfrom . import c\n"), "moreh_ap", modules["moreh_ap"], modules)
    assert got == {"moreh_ap.a", "moreh_ap.c"}
    got = _imported(ast.parse("from . import b\nfrom .. import c\n"), "moreh_ap.a.b", modules["moreh_ap.a.b"], modules)
    assert got == {"moreh_ap.a.b", "moreh_ap.c"}
    got = _imported(ast.parse("def f():\n    import moreh_ap.c.x as y\n    import numpy\n"), "moreh_ap.a",
                    modules["moreh_ap.a"], modules)
    assert got == {"moreh_ap.c"}
    uses = _sys_modules_uses(ast.parse("import sys as _s\nx = _s.modules.get('a')\ndef f():\n    import sys\n"
                                       "    return 'b' in sys.modules\n"))
    assert uses == [2, 5]


def test_no_import_cycles():
    graph = import_graph()
    stale = [edge for edge in KNOWN_CYCLE_EDGES if not graph.has_edge(*edge)]
    assert not stale, f"KNOWN_CYCLE_EDGES lists edges that no longer exist (delete them): {stale}"
    graph.remove_edges_from(KNOWN_CYCLE_EDGES)
    cycles = []
    for cycle in nx.simple_cycles(graph):
        cycles.append(" -> ".join(cycle + cycle[:1]))
        if len(cycles) == 10:
            break
    assert not cycles, "moreh_ap modules that import each other (each a cycle):\n" + "\n".join(cycles)


def test_no_sys_modules_lookups():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _sys_modules_uses(ast.parse(path.read_text(), filename=str(path)))
        if lines:
            found[_rel(path)] = lines
    unexpected = {f: lines for f, lines in found.items()
                  if f not in SYS_MODULES_ALLOWED or len(lines) > SYS_MODULES_ALLOWED[f][0]}
    assert not unexpected, f"sys.modules used (file: lines); import the module instead: {unexpected}"
    stale = sorted(set(SYS_MODULES_ALLOWED) - set(found))
    assert not stale, f"SYS_MODULES_ALLOWED names files that no longer use sys.modules (delete them): {stale}"


def test_long_modules_say_why():
    too_long, stale = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        marked = any(line.startswith(LONG_MARK) for line in lines[:3])
        allowed = _rel(path) in LONG_ALLOWED
        if len(lines) > MAX_LINES and not marked and not allowed:
            too_long.append(f"{_rel(path)} ({len(lines)} lines)")
        if allowed and len(lines) <= MAX_LINES:
            stale.append(_rel(path))
    assert not too_long, f"modules over {MAX_LINES} lines without a '{LONG_MARK} <reason>' line on top: {too_long}"
    assert not stale, f"LONG_ALLOWED names modules no longer over the limit (delete them): {stale}"


def test_submodules_never_import_the_package_root():
    """``import moreh_ap`` (the root, which imports everything) only from outside the package."""
    graph = import_graph()
    back = sorted(m for m in graph.predecessors("moreh_ap") if m != "moreh_ap")
    assert not back, f"modules that import the moreh_ap package root: {back}"
