"""Files that are either wholly written or not there: write a temp file, then rename.

A process killed mid-write (power cut, SIGKILL) leaves the previous version or
nothing, never half a file: the bytes are written and synced to a temporary file
in the same folder, which is then renamed over the target (atomic on POSIX), and
the folder is synced so that the rename itself survives a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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
