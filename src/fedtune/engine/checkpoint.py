"""Atomic, checksummed checkpoints: ``checkpoints/round-NNNNNN/{state.pt,meta.json}`` + ``latest``.

A checkpoint directory is written under a temporary name, flushed, then renamed into place, and only
then does ``latest`` (replaced atomically) point at it: a crash at any moment leaves the previous
checkpoint intact. Loading verifies the SHA-256 of the state file, so corruption is an error, never a
silent restart from scratch.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from fedtune.core.errors import CheckpointError
from fedtune.core.files import atomic_write, fsync_write

STATE = "state.pt"
META = "meta.json"
LATEST = "latest"


class Checkpointer:
    """Saves and loads run state under ``run_dir/checkpoints``, keeping the newest ``keep``."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def exists(self) -> bool:
        return (self.root / LATEST).exists()

    def save(self, round: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"round-{round:06d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        fsync_write(tmp / STATE, payload)
        meta = {**meta, "round": round, "sha256": hashlib.sha256(payload).hexdigest()}
        fsync_write(tmp / META, json.dumps(meta, indent=1, sort_keys=True).encode())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write(self.root / LATEST, name.encode())
        self._prune(keep_name=name)
        return final

    def _prune(self, keep_name: str) -> None:
        done = sorted(p for p in self.root.glob("round-*") if p.is_dir())
        for old in done[: max(0, len(done) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of the checkpoint ``latest`` names; CheckpointError if absent or corrupt."""
        latest = self.root / LATEST
        if not latest.exists():
            raise CheckpointError(f"no checkpoint to resume in {self.root.parent} (missing {latest})")
        name = latest.read_text().strip()
        folder = self.root / name
        try:
            meta = json.loads((folder / META).read_text())
            payload = (folder / STATE).read_bytes()
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {folder} is unreadable: {exc}") from None
        if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {STATE} does not match its checksum")
        try:
            state = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad checkpoint
            raise CheckpointError(f"checkpoint {folder} cannot be loaded: {exc}") from None
        return state, meta
