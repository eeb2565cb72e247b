"""Write the run-config reference of every project app from the code, at each build.

For each app module (``simulations.cli.PROJECT_APPS``), one table: every key of
its ``DEFAULTS``, the default, and what it means, as ``flower-simulation --app
APP --help`` shows it (:func:`simulations.cli.app_key_meanings`). Written to
``reference/run-config.md`` before Sphinx reads the sources, so the page is
never older than the code.
"""

from __future__ import annotations

import importlib
import json
import typing
from pathlib import Path

from simulations.cli import PROJECT_APPS, app_key_meanings

HEADER = """# Run-config reference

Every key of every app, its default, and what it means: written from the
dataclasses that declare the keys at each docs build, the same text as
`flower-simulation --app APP --help`. Give values with
`--run-config 'key=value ...'` (`flower-simulation`, `flwr run`) or in your app's
`[tool.flwr.app.config]`.
"""


def run_config_page(apps: typing.Iterable[str]) -> str:
    """Return the reference page: a section and a table per app module."""
    parts = [HEADER]
    for name in apps:
        module = importlib.import_module(name)
        meanings = app_key_meanings(module)
        parts.append(f"\n## `{name}`\n\n| key | default | meaning |\n|---|---|---|")
        for key, default in module.DEFAULTS.items():
            meaning = meanings.get(key, "").replace("|", "\\|")
            parts.append(f"| `{key}` | `{json.dumps(default)}` | {meaning} |")
    return "\n".join(parts) + "\n"


def write_page(app) -> None:
    """Write ``reference/run-config.md`` under the docs' source folder."""
    page = Path(app.srcdir) / "reference" / "run-config.md"
    page.parent.mkdir(exist_ok=True)
    text = run_config_page(PROJECT_APPS)
    if not page.is_file() or page.read_text() != text:
        page.write_text(text)


def setup(app):
    """Register :func:`write_page` to run before the sources are read."""
    app.connect("builder-inited", write_page)
    return {"parallel_read_safe": True}
