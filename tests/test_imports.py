"""Import structure: no import cycle in musu or the projects' packages, ``musu.config`` and the
model-zoo table are leaves, and scripts stand alone on public APIs (no ``sys.path`` edits outside
conftest.py, no private names imported across modules)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [REPO_ROOT / "musu", *sorted(REPO_ROOT.glob("projects/*/musu_*"))]


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (packages as ``__init__``)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        if "configs" in path.relative_to(package).parts:
            continue
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that importing ``name`` runs: each imported module and the packages
    above it that ``name``'s own package chain has not already initialized."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(base[: len(base) - node.level + 1] + ([module] if module else []))
            for alias in node.names:
                full = f"{module}.{alias.name}"
                targets.add(full if full in known else module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
    parts = name.split(".")
    initialized = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    chains = set()
    for target in targets:
        pieces = target.split(".")
        chains |= {".".join(pieces[:i]) for i in range(1, len(pieces) + 1)}
    return (chains - initialized) & known


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_import_cycle(package: Path) -> None:
    modules = module_files(package)
    graph = {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_sees_a_cycle_through_a_package() -> None:
    """``a.config`` importing ``a.modeling.x`` runs ``a.modeling``'s ``__init__``, which imports
    ``a.modeling.y``, which imports ``a.config``: a cycle, although no file imports itself."""
    graph = {
        "a": set(),
        "a.config": {"a.modeling", "a.modeling.x"},
        "a.modeling": {"a.modeling.y"},
        "a.modeling.x": set(),
        "a.modeling.y": {"a.config"},
    }
    assert find_cycle(graph) == ["a.config", "a.modeling", "a.modeling.y", "a.config"]


@pytest.mark.parametrize("leaf", ["config", "model_zoo.table"])
def test_leaf_modules_import_nothing_of_musu(leaf: str) -> None:
    modules = module_files(REPO_ROOT / "musu")
    name = f"musu.{leaf}"
    assert imported_modules(name, modules[name], set(modules)) == set()


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO_ROOT / folder).rglob("*.py"))


def test_sys_path_is_edited_only_in_conftest() -> None:
    edits = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=")
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in python_files("musu", "tools", "tests", "projects")
        + [REPO_ROOT / "train_net.py"]
        if edits.search(path.read_text())
    ]
    assert offenders == []


def test_tools_import_no_private_names() -> None:
    offenders = []
    for path in python_files("tools") + sorted(REPO_ROOT.glob("projects/*/tools/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private:
                    offenders.append(f"{path.relative_to(REPO_ROOT)}: {node.module} {private}")
    assert offenders == []
