"""The download, install and model-source layers import only the standard library, stigmer itself and the
packages pyproject.toml declares: an undeclared one (as `httpx2` once was, pulled in by huggingface_hub
2.x only) breaks as soon as a dependency changes its own dependencies."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "stigmer"
CHECKED = [
    SRC / "hashing.py",
    SRC / "archive.py",
    *sorted((SRC / "net").glob("*.py")),
    *sorted((SRC / "install").glob("*.py")),
    *sorted((SRC / "llm" / "models").glob("*.py")),
    SRC / "llm" / "ollama" / "assets.py",
    SRC / "llm" / "ollama" / "install.py",
]


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = set()
    for requirement in project["dependencies"]:
        dist = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        names.add(dist.split(".")[0].replace("-", "_").lower())  # ruamel.yaml -> ruamel
    return names


def imported(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(SRC)))
def test_only_declared_packages_are_imported(path: Path) -> None:
    allowed = declared() | set(sys.stdlib_module_names) | {"stigmer", "__future__"}
    assert imported(path) - allowed == set()
