"""No import cycle among the project's Python modules.

Every ``import`` counts, wherever it stands: at the top, inside a function
(the usual way to hide a cycle from the interpreter) or under
``TYPE_CHECKING`` (a cycle the type checker still walks).  A module's own
package ``__init__`` is not an edge: Python imports it first anyway.

Before the house plan (4ba7391) this found two cycles::

    harness.backend_libvirt -> harness.cluster -> harness.backend_libvirt
    harness.backend_libvirt -> harness.migrate -> harness.backend_libvirt
      (one strongly connected set: cluster, migrate, backend_libvirt)
    ivloop_libvirt.errors -> ivloop_libvirt.migrate -> ivloop_libvirt.errors
    ivloop_libvirt.errors -> ivloop_libvirt.restart -> ivloop_libvirt.errors
      (one strongly connected set of seven modules, through errors.py's
      TYPE_CHECKING imports of the report types)
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


#: The project's distributions (the lab, ivloop-server, ivloop-libvirt), by directory.
PROJECTS = (".", "qemu-dev", "libvirt")


def package_roots() -> dict[str, Path]:
    """Each top-level package of the project and its folder, as the pyprojects map them."""
    roots = {}
    for project in PROJECTS:
        with (REPO / project / "pyproject.toml").open("rb") as f:
            setup = tomllib.load(f)["tool"]["setuptools"]
        dirs: dict[str, str] = setup.get("package-dir", {})
        for pkg in setup["packages"]:
            if "." not in pkg:
                roots[pkg] = REPO / project / dirs.get(pkg, pkg)
    roots["tests"] = REPO / "tests"
    return roots


def modules(roots: dict[str, Path]) -> dict[str, Path]:
    """Every module of the project, by dotted name."""
    found: dict[str, Path] = {}
    for pkg, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, name: str, is_package: bool) -> Iterator[str]:
    """The dotted names one import statement asks for (a module or a module's attribute)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            base = here[: len(here) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        yield mod
        for alias in node.names:
            yield f"{mod}.{alias.name}"


def graph(found: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for asked in _imported(node, name, is_package):
                # `from pkg import mod` names a module; `from mod import f` the module
                target = asked
                while target and target not in found:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_project_has_no_import_cycle() -> None:
    found = modules(package_roots())
    assert {"harness.cli", "ivloop_server.server", "ivloop_libvirt.flow"} <= found.keys()
    edges = graph(found)
    assert not cycles(edges), "import cycles (each a set of modules importing each other): " \
        + "; ".join(" <-> ".join(c) for c in cycles(edges))


@pytest.mark.parametrize("source, expect", [
    ({"a": "from . import b", "b": "def f():\n    from .a import x\n"}, [["p.a", "p.b"]]),
    ({"a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import R\n",
      "b": "import p.a\n"}, [["p.a", "p.b"]]),
    ({"a": "from .b import f", "b": "from .c import g", "c": "from .a import h"},
     [["p.a", "p.b", "p.c"]]),
    ({"a": "from . import b", "b": "import os\n"}, []),
    ({"__init__": "from .a import x", "a": "import os\n"}, []),
])
def test_the_cycle_finder_finds_function_local_and_type_checking_cycles(
        tmp_path: Path, source: dict[str, str], expect: list[list[str]]) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "__init__.py").touch()
    for mod, text in source.items():
        (root / f"{mod}.py").write_text(text)
    assert cycles(graph(modules({"p": root}))) == expect
