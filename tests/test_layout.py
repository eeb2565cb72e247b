"""The folders' import arrows point one way: core <- Flower layers <- apps.

Read from the source with ``ast`` (nothing is imported), so a new import that
breaks the layering fails here, naming the file and the module.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("flwr_select", "strategies", "clients", "simulations", "tests")

FORBIDDEN = {
    "flwr_select": ("strategies", "clients", "simulations", "tests"),
    "flwr_select/selection": ("flwr_select.parallel",),
    "flwr_select/parallel": ("flwr_select.selection",),
    "strategies": ("clients", "simulations", "tests"),
    "clients": ("strategies", "simulations", "tests"),
    "simulations": ("tests",),
    # the data-parallel Flower layer, and what it shares with the site's
    "strategies/data_parallel.py": ("flwr_select.selection", "strategies.sample"),
    "strategies/nodes.py": ("flwr_select.selection", "flwr_select.parallel"),
    "clients/worker.py": ("flwr_select.selection", "clients.site"),
    "clients/common.py": ("flwr_select.selection", "flwr_select.parallel"),
}
"""Per folder (or file), the modules its files must not import (prefixes)."""


def project_imports(path: Path) -> set[str]:
    """Return the project modules a file imports (absolute, as written)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in PROJECT}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_file_imports_against_the_arrows(folder):
    broken = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (
            [ROOT / folder]
            if folder.endswith(".py")
            else sorted((ROOT / folder).rglob("*.py"))
        )
        for name in sorted(project_imports(path))
        if any(
            name == banned or name.startswith(banned + ".")
            for banned in FORBIDDEN[folder]
        )
    ]
    assert not broken, broken


def test_the_check_sees_imports_of_both_forms(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import numpy\nimport clients.site\nfrom strategies.nodes import x\n"
        "from . import y\n"
    )
    assert project_imports(source) == {"clients.site", "strategies.nodes"}
