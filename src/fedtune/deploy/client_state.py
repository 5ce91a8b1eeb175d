"""A deployed client's private turn state, on its own disk: ``STATE_DIR/<run token>/round-R.pt`` per turn.

A turn of round R starts from the state saved by the client's latest turn before R (or the initial state), so a
SuperNode restarted between rounds continues where it was, a retried turn repeats exactly, and a server resumed
from an earlier checkpoint gets the turn it would have had (later files are simply overwritten).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from fedtune.core.errors import FedtuneError
from fedtune.core.files import atomic_write

_TOKEN = re.compile(r"^[0-9a-f]{8,64}$")
_FILE = re.compile(r"^round-(\d+)\.pt$")


class ClientStateStore:
    def __init__(self, root: Path, token: str) -> None:
        if not _TOKEN.match(token):
            raise FedtuneError(f"the server sent a malformed run token {token!r}")
        self.dir = Path(root) / token

    def load_before(self, round: int) -> dict | None:
        """The state the client's latest turn before ``round`` left (None: it has not trained in this run)."""
        if not self.dir.is_dir():
            return None
        rounds = [int(m.group(1)) for p in self.dir.iterdir() if (m := _FILE.match(p.name))]
        earlier = [r for r in rounds if r < round]
        if not earlier:
            return None
        return torch.load(self.dir / f"round-{max(earlier)}.pt", weights_only=True)

    def save(self, round: int, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / f"round-{round}.pt", buffer.getvalue())
