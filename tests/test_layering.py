"""The server's structure, checked: imports form a one-way stack, and the settings reference
in docs/ is the one the declarations make."""

from __future__ import annotations

import ast
from pathlib import Path

from harness import repo_root

from lrnserve.server.settings import reference

PACKAGE = repo_root() / "server" / "lrnserve" / "server"

# Top to bottom; a module may import its own layer, any layer below, and the shared leaves.
LAYERS: list[set[str]] = [
    {"cli", "app", "modeltools"},
    {"transport"},
    {"dataplane", "validate", "classification", "configuration", "shared_memory"},
    {"repository", "control", "catalog"},
    {"batching"},
    {"executor", "pinned"},
    {"servables", "preprocess", "cuda"},
    {"importers"},
    {"models", "ops"},
]
# Used across the stack, importing nothing above them: errors, configuration, the request and
# response objects and their byte budget, the types that cross the batch boundary, and the
# telemetry sink.
LEAVES = {
    "memory",
    "errors",
    "settings",
    "schema",
    "inference",
    "admission",
    "work",
    "telemetry",
    "metrics",
    "statistics",
    "eventloop",
}


def unit_of(path: Path) -> str:
    """The first name below lrnserve/server: a module, or a sub-package (transport, models, ops)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_units(path: Path) -> set[str]:
    """The server units ``path`` imports, from relative and absolute imports alike."""
    tree = ast.parse(path.read_text())
    depth_of_file = len(path.relative_to(PACKAGE).parts) - 1  # 0 for a module at the top
    units = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 < depth_of_file:
                    continue  # inside its own sub-package
                names = (node.module or "").split(".") if node.module else [a.name for a in node.names]
                units.add(names[0])
            elif node.module and node.module.startswith("lrnserve.server."):
                units.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lrnserve.server."):
                    units.add(alias.name.split(".")[2])
    return units


def layer_of(unit: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    return None


def test_every_server_module_has_a_place_in_the_stack() -> None:
    units = {unit_of(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    placed = set().union(*LAYERS) | LEAVES
    assert units <= placed, f"not placed in the stack: {sorted(units - placed)}"


def test_imports_go_one_way_down_the_stack() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        for target in imported_units(path) - {unit, "__init__"}:
            if unit in LEAVES:
                allowed = target in LEAVES or target in ("ops",)
                if not allowed:
                    wrong.append(f"{path.relative_to(PACKAGE)} (a shared leaf) imports {target}")
                continue
            here, there = layer_of(unit), layer_of(target)
            if target in LEAVES:
                continue
            assert here is not None and there is not None, (unit, target)
            if there < here:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {target}, which is above it")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports() -> None:
    """Guards the checker itself: it must find what app.py and the transport really import."""
    assert {"dataplane", "repository", "transport"} <= imported_units(PACKAGE / "app.py")
    assert "dataplane" in imported_units(PACKAGE / "transport" / "service.py")
    assert "wire" not in imported_units(PACKAGE / "transport" / "service.py")  # its own package


def test_committed_settings_reference_is_current() -> None:
    committed = (repo_root() / "docs" / "settings.md").read_text()
    assert committed == reference(), "docs/settings.md is stale: python -m lrnserve.server.settings > docs/settings.md"
