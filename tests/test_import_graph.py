"""The import graph of the kfacbound package has no cycles (issue 14: one place per extension
point). Read from the source with ``ast``, without importing anything: every ``import`` and
``from ... import`` statement counts, at module level and inside functions alike (an import moved
into a function hides a loop, it does not remove it).

Edges: module A → module B when A imports B or a name from B (``from .b import x``); ``from . import
b`` imports the submodule b. The parent packages Python initialises on the way (``kfacbound`` and
``kfacbound.batch`` for ``kfacbound.batch.spec``) are not edges: every submodule would otherwise
sit in a loop with its package's ``__init__``. Imports by string (``importlib.import_module``, job
entries "module:function") are not statements and are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kfacbound"

# TODO(issue 14, tighten after the merge of the other refactor branches): loops in code that other
# agents are rewriting right now. A cycle is tolerated only when all its modules lie in one entry.
#   - kfacbound.curvature.kfac <-> kfacbound.curvature.kfac_backpack (curvature refactor)
#   - anything inside kfacbound.bounds (the bounds rewrite; today certify <-> select)
# Once those branches are merged, empty this list: the whole package is then held to no cycles.
# (test_allowed_cycles_still_exist skips, naming the entry, once an entry is no longer needed.)
ALLOWED_CYCLES: list[tuple[str, ...]] = []


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name → (file, is a package ``__init__``) for every file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def _targets(module: str, is_package: bool, node: ast.AST, modules) -> list[str]:
    """The package modules an import statement of ``module`` loads (by name)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        assert isinstance(node, ast.ImportFrom)
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        # ``from pkg import name``: the submodule pkg.name if there is one, else pkg itself
        names = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                 for a in node.names]
    out = []
    for name in names:
        if name != "kfacbound" and not name.startswith("kfacbound."):
            continue
        while name not in modules:  # import kfacbound.a.b.attr → the module that exists
            name = name.rsplit(".", 1)[0]
        if name != module:
            out.append(name)
    return out


def _type_checking_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks: annotations only, never
    executed, so not part of the import graph."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            for child in node.body:
                out.update(id(n) for n in ast.walk(child))
    return out


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports anywhere in its source (module level or inside
    functions; ``if TYPE_CHECKING:`` blocks excluded)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = _type_checking_imports(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only:
                graph[module].update(_targets(module, is_package, node, modules))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _in(module: str, entry: tuple[str, ...]) -> bool:
    """Whether ``module`` is one of ``entry``'s modules (``pkg.*``: any module of ``pkg``)."""
    return any(module == e or (e.endswith(".*") and module.startswith(e[:-1])) for e in entry)


def _allowed_by(component: list[str]) -> tuple[str, ...] | None:
    """The ALLOWED_CYCLES entry that holds every module of ``component``, if any."""
    return next((e for e in ALLOWED_CYCLES if all(_in(m, e) for m in component)), None)


def test_cycle_finder_sees_loops():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_relative_and_function_level_imports():
    graph = import_graph()
    # module level, two dots
    assert "kfacbound.errors" in graph["kfacbound.batch.spec"]
    # inside a function (adapters loads the analyses lazily)
    assert "kfacbound.analysis.structure" in graph["kfacbound.batch.adapters"]
    # ``from ..data import dataset_tensors``: the module, not a submodule called dataset_tensors
    assert "kfacbound.data" in graph["kfacbound.analysis.structure"]


def test_the_package_has_no_import_cycles():
    found = [c for c in cycles(import_graph()) if _allowed_by(c) is None]
    assert not found, "import cycles (a → … → a) in kfacbound:\n" + "\n".join(
        " ↔ ".join(c) for c in found)


def test_batch_imports_each_other_at_module_level_only():
    """Within kfacbound.batch no import hides inside a function: the layering (see
    test_batch_modules_are_layered) is visible at the top of each file."""
    modules = _modules()
    hidden = []
    for module, (path, is_package) in modules.items():
        if not module.startswith("kfacbound.batch"):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    hidden += [f"{module}:{node.lineno} → {t}"
                               for t in _targets(module, is_package, node, modules)
                               if t.startswith("kfacbound.batch")]
    assert not hidden, hidden


@pytest.mark.parametrize("entry", ALLOWED_CYCLES, ids=lambda e: e[0])
def test_allowed_cycles_still_exist(entry):
    """Skips (naming it) when a TODO entry of ALLOWED_CYCLES no longer covers a cycle, so that
    the allowance is removed rather than left to hide a new loop."""
    if not any(_allowed_by(c) == entry for c in cycles(import_graph())):
        pytest.skip(f"no import cycle left in {entry}: remove it from ALLOWED_CYCLES")


BATCH_LAYERS = ["records", "jobs", "adapters", "spec", "execute", "executors", "report", "runner",
                "compare", "study"]


def test_batch_modules_are_layered():
    """Each module of kfacbound.batch imports only batch modules listed before it (the package
    ``__init__`` may import any): records is the leaf, runner the driver, compare the top."""
    graph = import_graph()
    batch = {m.rsplit(".", 1)[1]: m for m in graph if m.startswith("kfacbound.batch.")}
    assert sorted(batch) == sorted(BATCH_LAYERS), "a new batch module: place it in BATCH_LAYERS"
    for i, name in enumerate(BATCH_LAYERS):
        imported = {t.rsplit(".", 1)[1] for t in graph[batch[name]]
                    if t.startswith("kfacbound.batch.")}
        assert imported <= set(BATCH_LAYERS[:i]), (name, sorted(imported - set(BATCH_LAYERS[:i])))
