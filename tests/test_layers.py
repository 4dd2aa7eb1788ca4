"""The package's layering rules (``docs/architecture.md``), checked on the import graph built from the AST.

- no import circle among the package's modules (imports inside functions count; ``TYPE_CHECKING``-only ones do not);
- no module imports from a layer above its own;
- at most 8 modules directly under ``mezo_kernels/`` (not counting ``__init__``/``__main__``);
- ``mezo_kernels/triton/`` stays where the design card puts it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "mezo_kernels"

# bottom to top; a module may import its own layer and the layers below it
LAYERS = [
    ("_compat", "_extras"),
    ("rng",),
    ("triton",),
    ("kernels",),
    ("perturb",),
    ("virtual",),
    ("optim",),
    ("models", "prefix"),
    ("tasks",),
    ("forward",),
    ("train",),
    ("hf",),
    ("", "__main__"),          # the package face and `python -m mezo_kernels`
]


def modules(pkg: Path = PKG) -> dict[str, Path]:
    """Dotted module name (without the ``mezo_kernels.`` prefix; ``""`` for the package itself) -> file."""
    out = {}
    for p in pkg.rglob("*.py"):
        parts = p.relative_to(pkg).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _targets(mod: str, is_pkg: bool, node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The package modules an import statement loads (a name that is a submodule counts as that submodule)."""
    found = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == "mezo_kernels" or a.name.startswith("mezo_kernels."):
                found.append(a.name[len("mezo_kernels"):].lstrip("."))
        return [f for f in found if f in known]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = mod.split(".") if mod else []
        if not is_pkg:
            base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    elif node.module == "mezo_kernels" or (node.module or "").startswith("mezo_kernels."):
        target = node.module[len("mezo_kernels"):].lstrip(".")
    else:
        return []
    for a in node.names:
        sub = f"{target}.{a.name}" if target else a.name
        found.append(sub if sub in known else target)
    return [f for f in found if f in known]


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    known = modules(pkg)
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                edges.update(t for t in _targets(mod, path.name == "__init__.py", node, known) if t != mod)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(mod: str) -> int:
    top = mod.split(".")[0] if mod else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise KeyError(f"mezo_kernels.{mod} belongs to no layer: add its package to LAYERS in {__file__}")


def depth(graph: dict[str, set[str]]) -> int:
    """Modules on the longest import chain (the graph must be acyclic)."""
    memo: dict[str, int] = {}

    def d(v: str) -> int:
        if v not in memo:
            memo[v] = 1 + max((d(w) for w in graph[v]), default=0)
        return memo[v]

    return max(d(v) for v in graph)


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    upward = [f"mezo_kernels.{m} -> mezo_kernels.{t}" for m, ts in sorted(graph.items()) for t in sorted(ts)
              if layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_package_root_holds_at_most_eight_modules():
    flat = sorted(p.name for p in PKG.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(flat) <= 8, flat
    assert (PKG / "triton" / "__init__.py").is_file()


def test_the_rng_spec_imports_nothing_of_the_package():
    graph = import_graph()
    assert {t for m, ts in graph.items() if m.split(".")[0] == "rng" for t in ts if not t.startswith("rng")} == set()


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path):
    """The checker itself: a planted circle (one side inside a function) and an upward import are found."""
    pkg = tmp_path / "mezo_kernels"
    (pkg / "rng").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "rng" / "__init__.py").write_text("from ..train import loop\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("def f():\n    from . import run\n")
    (pkg / "train" / "run.py").write_text("from mezo_kernels.train.loop import f\nfrom typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n    from mezo_kernels import rng\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["train.loop", "train.run"]]
    assert "rng" not in graph["train.run"]
    assert layer_of("train.loop") > layer_of("rng") and "train.loop" in graph["rng"]
    with pytest.raises(KeyError, match="no layer"):
        layer_of("stray")
