"""Imports point downward only (DESIGN.md "Layers of the code"):
cli -> stages -> training -> artifact -> methods -> models -> mpo.

Every import in the package, at module level or inside a function, is read from the source
with `ast`; an import of a higher layer from a lower one fails the test, naming the file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mposurgeon"

#: Layer rank of each top-level part of the package: a module may import its own rank or lower.
RANKS = {
    "cli": 7,
    "__init__": 7,  # the public API
    "__main__": 7,
    "stages": 6,
    "plot": 6,  # the figure of `inspect --plot`
    "prepared": 6,  # the bring-your-own-loop API (prepare, save_artifact, merge_and_unload)
    "training": 5,
    "artifact": 4,
    "methods": 3,
    "models": 2,
    "mpo": 1,
    "errors": 0,
    "progress": 0,
    "memory": 0,  # giving freed heap memory back (glibc), for the streaming stages
    "_version": 0,
}


def _part(module: str) -> str:
    """`mposurgeon.stages.train` -> `stages`; `mposurgeon` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `mposurgeon...` import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] == "mposurgeon"]
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {
        _part("mposurgeon." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts))
        for p in _sources()
    }
    assert parts <= set(RANKS), parts - set(RANKS)


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path: Path) -> None:
    own = _part("mposurgeon." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    upward = [
        f"line {line}: {module}"
        for line, module in _imports(path)
        if RANKS[_part(module)] > RANKS[own]
    ]
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports a higher layer: {upward}"
