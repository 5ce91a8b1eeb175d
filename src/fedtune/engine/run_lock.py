"""One process per run directory: an OS file lock held for the run's life.

A second ``fedtune run`` (or ``--resume``) into a directory another process is running in stops at once with a
clear message, before it reads or writes anything there; the lock goes with the process, however it ends.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fedtune.core.errors import FedtuneError

LOCK_FILE = ".fedtune.lock"


class RunLock:
    """``with RunLock(run_dir):`` holds an exclusive ``flock`` on ``run_dir/.fedtune.lock`` (creating the folder)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FedtuneError(f"{self.path.parent} is in use by another fedtune process (pid {holder}); wait for it "
                               "to end, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
