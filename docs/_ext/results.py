"""Write the docs' results page from the committed raw records, at each build.

The tables are :func:`simulations.report.report` of ``results/`` (the summaries
the experiment drivers write from their per-run records): never copied by hand,
so the page says what the records say.
"""

from __future__ import annotations

from pathlib import Path

HEADER = """# Results

Every table below is written at each docs build by `python -m simulations.report
results`, from the summaries the experiment drivers write from the raw per-run
records committed under `results/runs/`. The commands that produce each experiment,
how long they took and what the numbers mean are in the README's *The paper's
experiments*.
"""


def write_page(app) -> None:
    """Write ``results.md`` under the docs' source folder."""
    from simulations.report import report

    root = Path(app.srcdir).parent
    text = HEADER + report(root / "results") + "\n"
    page = Path(app.srcdir) / "results.md"
    if not page.is_file() or page.read_text() != text:
        page.write_text(text)


def setup(app):
    """Register :func:`write_page` to run before the sources are read."""
    app.connect("builder-inited", write_page)
    return {"parallel_read_safe": True}
