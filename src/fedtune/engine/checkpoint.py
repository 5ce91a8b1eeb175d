"""Atomic, checksummed checkpoints: ``checkpoints/round-NNNNNN/{state.pt,meta.json}`` + ``latest``.

A checkpoint directory is written under a temporary name, flushed, then renamed into place, and only
then does ``latest`` (replaced atomically) point at it: a crash at any moment leaves the previous
checkpoint intact. A write that fails (a full disk) removes what it left and says so; temporary directories
left by a crash are removed by the next save. Loading verifies the SHA-256 of the state file and of the meta
data (``meta_sha256``), so corruption or an edit is an error, never a silent restart from scratch. Without
``latest`` (deleted) the newest valid round is loaded.
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
TMP_PREFIX = ".tmp-round-"


def _meta_digest(meta: dict[str, Any]) -> str:
    """The checksum of a checkpoint's meta data (all of it but the checksum itself)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Checkpointer:
    """Saves and loads run state under ``run_dir/checkpoints``, keeping the newest ``keep``."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def rounds(self) -> list[Path]:
        """The round directories, oldest first."""
        return sorted(p for p in self.root.glob("round-*") if p.is_dir()) if self.root.is_dir() else []

    def exists(self) -> bool:
        return (self.root / LATEST).exists() or bool(self.rounds())

    def remove_stale(self) -> list[Path]:
        """Remove the temporary directories a crashed or failed save left; returns them."""
        stale = sorted(self.root.glob(f"{TMP_PREFIX}*")) if self.root.is_dir() else []
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def save(self, round: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale()
        name = f"round-{round:06d}"
        tmp = self.root / f"{TMP_PREFIX}{round:06d}-{os.getpid()}"
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        meta = {**meta, "round": round, "sha256": hashlib.sha256(payload).hexdigest()}
        meta["meta_sha256"] = _meta_digest(meta)
        try:
            tmp.mkdir()
            fsync_write(tmp / STATE, payload)
            fsync_write(tmp / META, json.dumps(meta, indent=1, sort_keys=True).encode())
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self._newest_name()
            still = f"the checkpoint {kept} is intact" if kept else "no checkpoint was written before"
            raise CheckpointError(f"cannot write the checkpoint of round {round} in {self.root}: "
                                  f"{exc.strerror or exc}; {still}") from None
        final = self.root / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        atomic_write(self.root / LATEST, name.encode())
        self._prune(keep_name=name)
        return final

    def _newest_name(self) -> str | None:
        latest = self.root / LATEST
        return latest.read_text().strip() if latest.exists() else None

    def _prune(self, keep_name: str) -> None:
        done = self.rounds()
        for old in done[: max(0, len(done) - self.keep)]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of one checkpoint directory; CheckpointError if it is unreadable, corrupt or edited."""
        meta = self.load_meta(folder)
        payload = (folder / STATE).read_bytes() if (folder / STATE).is_file() else b""
        if hashlib.sha256(payload).hexdigest() != meta.get("sha256"):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {STATE} does not match its checksum")
        try:
            state = torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad checkpoint
            raise CheckpointError(f"checkpoint {folder} cannot be loaded: {exc}") from None
        return state, meta

    def load_meta(self, folder: Path) -> dict[str, Any]:
        """A checkpoint's meta data, checked against its own checksum (written since ``meta_sha256`` exists)."""
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"checkpoint {folder} is unreadable: {exc}") from None
        if not isinstance(meta, dict) or ("meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta)):
            raise CheckpointError(f"checkpoint {folder} is corrupt: {META} does not match its checksum")
        return meta

    def latest_folder(self) -> Path:
        """The checkpoint ``latest`` names; without ``latest``, the newest round whose meta data is valid."""
        latest = self.root / LATEST
        if latest.exists():
            return self.root / latest.read_text().strip()
        for folder in reversed(self.rounds()):
            try:
                self.load_meta(folder)
            except CheckpointError:
                continue
            return folder
        raise CheckpointError(f"no checkpoint to resume in {self.root.parent} (missing {latest})")

    def load_latest(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(state, meta) of the newest checkpoint (:meth:`latest_folder`); CheckpointError if absent or corrupt."""
        return self.load(self.latest_folder())
