"""The docs' run-config reference is written from the code that declares the keys."""

import importlib.util
import json
from pathlib import Path

import pytest

from simulations import cli

ROOT = Path(__file__).resolve().parents[1]


def reference_page() -> str:
    """The page ``docs/_ext/run_config.py`` writes at each docs build."""
    spec = importlib.util.spec_from_file_location(
        "run_config", ROOT / "docs" / "_ext" / "run_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run_config_page(cli.PROJECT_APPS)


@pytest.mark.parametrize("app", cli.PROJECT_APPS)
def test_the_reference_lists_every_key_of_every_app_with_what_it_means(app):
    # Prepare
    page = reference_page()
    section = page.split(f"## `{app}`")[1].split("\n## ")[0]
    defaults = importlib.import_module(app).DEFAULTS
    # Assert: a row per key, in order, each with its default and a meaning
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(defaults)
    for row, (key, default) in zip(rows, defaults.items(), strict=True):
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert cells[1] == f"`{json.dumps(default)}`" and cells[2], key
