"""The package layout holds: imports go one way between the packages (core <- data, models, scan <- training
<- inference <- deletion, evaluation <- pipeline <- flows <- cli), no module imports itself back through others,
and no module takes another module's private names. Every import counts, also one inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
RANK = {
    "core": 0,
    "data": 1,
    "models": 1,
    "scan": 2,
    "training": 2,
    "inference": 3,
    "deletion": 4,
    "evaluation": 4,
    "pipeline": 5,
    "flows": 6,
    "cli": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "sisaflow").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every sisaflow import in the module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "sisaflow"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            if base.split(".")[0] != "sisaflow":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from sisaflow.pkg import module`
                    out.append((sub, [], node.lineno))
                else:
                    out.append((base, [alias.name], node.lineno))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "core"


def test_every_module_is_in_a_package_of_the_layout():
    loose = [m for m, p in MODULES.items() if m.count(".") == 1 and p.name != "__init__.py"]
    assert loose == [], f"modules outside the packages: {loose}"
    assert {_package(m) for m in MODULES} <= set(RANK)


def test_imports_go_one_way_between_packages():
    wrong = []
    for module, imports in GRAPH.items():
        for target, _, line in imports:
            src, dst = _package(module), _package(target)
            if src != dst and RANK[dst] >= RANK[src]:
                wrong.append(f"{MODULES[module].relative_to(SRC)}:{line}: {src} imports {dst} ({target})")
    assert wrong == [], "\n".join(wrong)


def test_no_import_circle():
    edges = {m: {t for t, _, _ in imps if t in MODULES and t != m} for m, imps in GRAPH.items()}
    # a package's __init__ re-exporting its own modules is not a circle through them
    for m in edges:
        edges[m] = {t for t in edges[m] if not (MODULES[t].name == "__init__.py" and m.startswith(t + "."))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                circles.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == [], f"import circles: {circles}"


def test_no_module_takes_another_modules_private_names():
    taken = [
        f"{MODULES[module].relative_to(SRC)}:{line}: {name} from {target}"
        for module, imports in GRAPH.items()
        for target, names, line in imports
        for name in names
        if target != module and name.startswith("_") and not name.startswith("__")
    ]
    assert taken == [], "\n".join(taken)


@pytest.mark.parametrize("package", sorted(RANK))
def test_each_package_says_what_it_owns(package):
    init = SRC / "sisaflow" / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text()))
    assert doc and len(doc.split()) >= 20, f"{init}: a docstring saying what the package owns and may import"
