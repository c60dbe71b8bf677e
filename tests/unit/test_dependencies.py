"""Every third-party module the library imports is installed by `pip install sisaflow` itself, not only by an
extra: an import that only the dev extra satisfied (psutil, in purge) passed every test and failed for a user."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, str]:
    """Top-level third-party module -> one file of src/sisaflow importing it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "src" / "sisaflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "sisaflow":
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_module_is_a_declared_dependency():
    """Mutant: drop "psutil>=5" (or "gguf", which `sisaflow base` needs) from [project].dependencies: fails."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {normalise(re.match(r"[A-Za-z0-9._-]+", r).group(0)) for r in project["dependencies"]}
    providers = md.packages_distributions()
    missing = []
    for module, where in imported_modules().items():
        dists = {normalise(d) for d in providers.get(module, [module])}
        if not dists & declared:
            missing.append(f"{module} (imported by {where}; distribution {', '.join(sorted(dists))})")
    assert not missing, "imported but not in [project].dependencies: " + "; ".join(missing)
    assert "torch" in imported_modules()  # the walk sees the library's imports at all
