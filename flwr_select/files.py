"""Files that are either wholly written or not there, and the JSON lines records use.

A process killed mid-write (power cut, SIGKILL) leaves the previous version or
nothing, never half a file: the bytes are written and synced to a temporary file
in the same folder, which is then renamed over the target (atomic on POSIX), and
the folder is synced so that the rename itself survives a crash. Per-round
records (``rounds.jsonl``, the experiments' runs) are JSON lines: one object each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a temporary file, sync it and rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def write_json_lines(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write ``records`` to ``path`` as JSON lines, atomically."""
    text = "".join(json.dumps(dict(record)) + "\n" for record in records)
    write_atomically(path, lambda file: file.write(text.encode()))


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """Return the records of a JSON-lines file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]
