"""Imports run one way: no cycle between modules, and no package imports a package above it.

The layers, lowest first: a package may import only the packages to its left.
Every import counts, also the ones deferred into a function body, since a
deferred import is how a cycle usually hides.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["util", "datasets", "base_models", "coders", "train", "serve", "bench"]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the layered packages, by dotted name."""
    return {module_name(py, root): py for pkg in LAYERS for py in sorted((root / pkg).rglob("*.py"))}


def moved_attributes(modules: dict[str, Path]) -> dict[tuple[str, str], str]:
    """``(module, name) -> new module`` for the names a module serves from a module above it
    (``util.moved.keep_moved_attributes(__name__, {name: new, ...})``, its dict written out)."""
    moved = {}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
                    == "keep_moved_attributes" and len(node.args) == 2 and isinstance(node.args[1], ast.Dict)):
                moved.update({(name, old): new for old, new in ast.literal_eval(node.args[1]).items()})
    return moved


def imported_modules(path: Path, name: str, known: set[str], moved: dict | None = None) -> set[str]:
    """The project modules ``path`` (module ``name``) imports anywhere in its text; a name imported from a
    module that serves it from another (``moved``) counts as an import of that other module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # "from pkg import mod" imports the module pkg.mod; "from mod import name" the module mod
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known
                       else (moved or {}).get((base, alias.name), base) for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "import a.b.c" where c is a name: the module a.b
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    moved = moved_attributes(modules)
    return {name: imported_modules(path, name, set(modules), moved) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a.x imports b.y"`` for every import of a package above the importer's."""
    rank = {pkg: i for i, pkg in enumerate(LAYERS)}
    return [f"{src} imports {dst} ({src.split('.')[0]} is below {dst.split('.')[0]})"
            for src, dsts in sorted(graph.items()) for dst in sorted(dsts)
            if rank[dst.split(".")[0]] > rank[src.split(".")[0]]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def cycle_pairs(graph: dict[str, set[str]]) -> list[str]:
    """``"a <-> b"`` style lines naming each import that closes a cycle."""
    lines = []
    for component in cycles(graph):
        members = set(component)
        edges = [f"{src} imports {dst}" for src in component for dst in sorted(graph[src] & members)]
        lines.append(f"cycle among {', '.join(component)}: " + "; ".join(edges))
    return lines


def test_every_layered_package_is_seen():
    graph = import_graph()
    assert {name.split(".")[0] for name in graph} == set(LAYERS)
    assert "coders.mlp" in graph and "util.shapes" in graph["coders.mlp"]  # the parser sees imports


def test_no_package_imports_a_package_above_it():
    bad = upward_imports(import_graph())
    assert not bad, "imports against the layers " + " < ".join(LAYERS) + ":\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    bad = cycle_pairs(import_graph())
    assert not bad, "import cycles:\n" + "\n".join(bad)


def test_the_checks_name_the_offending_pair(tmp_path):
    # A tiny tree with both faults, so the two tests above cannot pass by seeing nothing.
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "util" / "low.py").write_text("def f():\n    from train.high import g\n")
    (tmp_path / "train" / "high.py").write_text("from util import low\nfrom .other import h\n")
    (tmp_path / "train" / "other.py").write_text("import train.high\n")
    # a name a lower module serves from a higher one is an import of the higher one
    (tmp_path / "coders" / "kept.py").write_text("keep_moved_attributes(__name__, {'Old': 'train.other'})\n")
    (tmp_path / "coders" / "user.py").write_text("from coders.kept import Old\n")
    graph = import_graph(tmp_path)
    assert graph["train.high"] == {"util.low", "train.other"} and graph["coders.user"] == {"train.other"}
    assert upward_imports(graph) == ["coders.user imports train.other (coders is below train)",
                                     "util.low imports train.high (util is below train)"]
    assert cycles(graph) == [["train.high", "train.other", "util.low"]]
    assert "util.low imports train.high" in cycle_pairs(graph)[0]
