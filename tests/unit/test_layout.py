"""The import direction of the layout by side of the wire (docs/architecture.md): the wire (``hub/*.py``) imports
nothing of ours above it; ``hub/client``, ``hub/gateway`` and ``workers`` never import ``hub.supervisor``; the
client package never imports the gateway. Read from the source, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (``from hub import x`` counts as ``hub.x``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _files(where: str, pattern: str = "**/*.py") -> list[Path]:
    return sorted((ROOT / where).glob(pattern))


SIDES = [
    ("hub", "*.py", ("hub.client", "hub.supervisor", "hub.gateway", "workers")),
    ("hub/client", "**/*.py", ("hub.supervisor", "hub.gateway", "workers")),
    ("hub/gateway", "**/*.py", ("hub.supervisor", "workers")),
    ("workers", "**/*.py", ("hub.client", "hub.supervisor", "hub.gateway")),
]


@pytest.mark.parametrize("where, pattern, forbidden", SIDES, ids=[s[0] for s in SIDES])
def test_import_direction(where: str, pattern: str, forbidden: tuple[str, ...]) -> None:
    files = _files(where, pattern)
    assert files, f"no files under {where}"
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("def later():\n    from hub.supervisor import farm\n    return farm\n")
    assert "hub.supervisor.farm" in _imports(bad)
