"""No import cycles in keybrake.hera_workflows: no module imports one that imports it back,
whether at import time or under `if TYPE_CHECKING:` (mypy follows those, and a cycle there is one
plain import away from a partially initialised module). Imports inside functions are left out:
they run after every module is loaded."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import keybrake.hera_workflows as kh

PACKAGE = Path(kh.__file__).parent


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under `root`, by its dotted name (a package by its own)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def module_level(tree: ast.Module) -> Iterator[ast.AST]:
    """The nodes run at import time (including `if TYPE_CHECKING:` blocks), not function bodies."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                pending.append(child)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in module_level(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.rsplit(".", node.level - 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from . import published` imports that submodule, `from .issue import X` issue.
                submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
                targets |= submodules or {base}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) for each module that can reach itself."""
    found = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen = set()
        while stack:
            module, path = stack.pop()
            for target in sorted(graph[module]):
                if target == start:
                    found.append([*path, start])
                    stack.clear()
                    break
                if target not in seen:
                    seen.add(target)
                    stack.append((target, [*path, target]))
    return found


def test_no_module_of_the_package_imports_one_that_imports_it_back() -> None:
    graph = import_graph(PACKAGE, kh.__name__)
    assert "keybrake.hera_workflows.issue" in graph["keybrake.hera_workflows.fanout"]  # it parses
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_check_sees_cycles_through_type_checking_imports(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("from .a import A\n")
    (tmp_path / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\nA = 1\n"
    )
    (tmp_path / "b.py").write_text("from . import a\nB = a.A\n")
    (tmp_path / "c.py").write_text("def late():\n    from .a import A\n    return A\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"]]
