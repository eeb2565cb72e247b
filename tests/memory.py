"""Peak memory of one hostile input, measured in a Python process of its own.

``peak_growth(setup, call)`` runs ``setup`` (imports, building the input), then
``call`` in a fresh interpreter and returns what ``call`` raised (its type and
message, or "" if nothing) and how far the process's peak RSS grew during it.
A fresh process makes the peak the input's own, whatever the test run did before.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource
{setup}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
raised = ""
try:
{call}
except BaseException as err:
    raised = f"{{type(err).__name__}}: {{err}}"
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({{"raised": raised, "growth_bytes": grown * 1024}}))
"""


def peak_growth(setup: str, call: str, timeout: float = 300) -> tuple[str, int]:
    """Return what ``call`` raised ("" for nothing) and the peak RSS growth in bytes.

    ``setup`` and ``call`` are Python source; ``call`` runs after ``setup``'s
    names are defined, and its peak memory is measured against the peak after
    ``setup``.
    """
    code = CHILD.format(
        setup=textwrap.dedent(setup),
        call=textwrap.indent(textwrap.dedent(call), "    "),
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["raised"], result["growth_bytes"]


LIMIT = 64 * 2**20
"""The issue's bound: one hostile input grows a process's peak RSS by less."""
