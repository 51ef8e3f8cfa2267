"""No import cycles inside flowmatch/, lazy imports (inside functions) included.

Every module of flowmatch/ is parsed with ``ast`` (nothing is imported). An edge A -> B means that
running A's code (at import time or in one of its functions) imports flowmatch module B:

* ``import a.b.c`` and ``from a.b.c import name`` import a.b.c and, first, its packages a and a.b
  (their ``__init__``); ``from a.b import c`` where c is a submodule imports a.b.c as well;
* relative imports are resolved against A's package;
* A's own parent packages are left out of the edges they are only implied by: Python has imported them
  before A's code runs, so they are not a dependency A adds. Naming a parent explicitly
  (``from a import name`` for a name defined in a's ``__init__``) is an edge;
* ``if TYPE_CHECKING:`` blocks never run, so their imports are not edges.

A cycle means a module can only be imported after itself (or a function runs only while a module
it needs is half-initialised): each job should sit on one side of every dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "flowmatch"


def module_names() -> dict[str, Path]:
    """Every module of flowmatch/ by dotted name (a package by its own name, for its __init__.py)."""
    names = {}
    for file in ROOT.rglob("*.py"):
        parts = list(file.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = file
    return names


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every import statement that can run: module level, in functions and classes, not under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, modules: dict[str, Path]) -> set[str]:
    """The flowmatch modules that module ``name`` imports (see this file's docstring)."""
    tree = ast.parse(modules[name].read_text(), filename=str(modules[name]))
    own_package = name if _is_package(name, modules) else name.rpartition(".")[0]
    explicit: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            explicit.update(alias.name for alias in node.names)
            continue
        if node.level:  # relative: from . / .. / .x import ...
            base = own_package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            explicit.add(sub if sub in modules else target)
    own_ancestors = set(_ancestors(name))
    edges = set()
    for target in explicit:
        if not (target == "flowmatch" or target.startswith("flowmatch.")):
            continue
        while target not in modules and "." in target:  # e.g. `import flowmatch.x.attr`: the module part
            target = target.rpartition(".")[0]
        edges.add(target)
        edges.update(a for a in _ancestors(target) if a not in own_ancestors)
    edges.discard(name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, modules) for name in sorted(modules)}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(sorted(comp) for comp in components)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Shortest cycles covering every module that is on one (one per module, repeats dropped), as closed paths."""
    cycles: list[list[str]] = []
    seen: set[frozenset] = set()
    for component in strongly_connected(graph):
        for start in component:
            cycle = _cycle_through(start, set(component), graph)
            key = frozenset(zip(cycle, cycle[1:]))
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def _cycle_through(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest closed path from ``start`` back to it inside its component (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return path[::-1] + [start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle inside {sorted(members)}")


def test_the_graph_sees_lazy_relative_and_submodule_imports():
    graph = import_graph()
    # module level: sampling/__init__ imports its submodules relatively (from .sampler import ...)
    assert "flowmatch.sampling.sampler" in graph["flowmatch.sampling"]
    # inside a function: the CLI entry point imports each command lazily
    assert any(m.startswith("flowmatch.cli.") for m in graph["flowmatch.cli.main"])
    # the cycle finder finds what it must
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_flowmatch():
    cycles = find_cycles(import_graph())
    report = "\n".join(" -> ".join(c) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) in flowmatch/ (one path per cycle):\n{report}"
