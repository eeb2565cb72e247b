"""Sphinx configuration of the flwr_select docs (``sphinx-build -W docs docs/_build``).

The run-config reference is written from the code at every build
(``_ext/run_config.py``), so it cannot drift from the dataclasses that declare
the keys; the results page from the committed records (``_ext/results.py``);
the API pages are autodoc'd from the docstrings.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent / "_ext")]

project = "flwr_select"
author = "flwr_select developers"
extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "run_config",
    "results",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
napoleon_google_docstring = False
napoleon_numpy_docstring = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the NumPy sections say the types
html_theme = "alabaster"
myst_heading_anchors = 3
