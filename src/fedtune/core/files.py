"""Crash-safe file writes: a crash at any moment leaves either the old file or the new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fsync_write(tmp, data)
    os.replace(tmp, path)
