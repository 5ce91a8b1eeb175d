"""A keyed store of 2-D tensors in a fixed dtype that spills to a memory-mapped file past a memory budget.

Entries are raw dtype words, so a spilled entry reads back bit-identically to an in-memory one (numpy
has no bfloat16: the file holds int16/int32 words that torch reinterprets with ``.view(dtype)``).
"""

from __future__ import annotations

import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

Key = tuple[int, ...]

_WORDS = {2: (np.int16, torch.int16), 4: (np.int32, torch.int32)}
_CHUNK_BYTES = 1 << 20  # the spill file grows by at least this much (and at least doubles)


@dataclass
class _Entry:
    rows: int
    tensor: torch.Tensor | None = None  # in memory
    offset: int = -1  # first row in the spill file (when tensor is None)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class TensorStore:
    """Maps keys (tuples of ints, one arity per store) to ``(n_i, d)`` tensors stored in ``dtype``.

    Entries stay in memory while the in-memory total stays within ``budget_bytes`` (None: no limit);
    an entry that would exceed it goes to a memmap file under ``spill_dir`` (created on first spill,
    freed space reused first-fit). ``get`` returns a copy in the stored dtype either way.
    """

    def __init__(self, dtype: torch.dtype, budget_bytes: int | None, spill_dir: Path) -> None:
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not dtype.is_floating_point or itemsize not in _WORDS:
            raise ValueError(f"TensorStore supports float16, bfloat16 and float32, not {dtype}")
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None, got {budget_bytes}")
        self.dtype = dtype
        self.budget_bytes = budget_bytes
        self.spill_dir = Path(spill_dir)
        self._np_word, self._torch_word = _WORDS[itemsize]
        self._itemsize = itemsize
        self._entries: dict[Key, _Entry] = {}
        self._dim: int | None = None
        self._arity: int | None = None
        self._memory = 0
        self._path: str | None = None
        self._map: np.memmap | None = None
        self._capacity = 0  # rows the file holds
        self._end = 0  # rows past the last allocated extent
        self._free: list[tuple[int, int]] = []  # (offset, rows), sorted, merged
        self._finalizer: weakref.finalize | None = None

    # --- queries ---------------------------------------------------------------------------------
    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Key]:
        """Keys in first-insertion order."""
        return list(self._entries)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    @property
    def memory_bytes(self) -> int:
        """Bytes of the entries held in memory (never above the budget)."""
        return self._memory

    @property
    def disk_bytes(self) -> int:
        """Size of the spill file (0 before the first spill)."""
        return self._capacity * (self._dim or 0) * self._itemsize

    @property
    def spilled(self) -> int:
        """Number of entries on disk."""
        return sum(1 for e in self._entries.values() if e.tensor is None)

    # --- put / get -------------------------------------------------------------------------------
    def put(self, key: Key, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (cast to the store's dtype) under ``key``, replacing any previous value."""
        key = tuple(int(k) for k in key)
        if tensor.dim() != 2:
            raise ValueError(f"TensorStore holds 2-D tensors, got shape {tuple(tensor.shape)}")
        if self._dim is None:
            self._dim = int(tensor.shape[1])
        if tensor.shape[1] != self._dim:
            raise ValueError(f"TensorStore width is {self._dim}, got shape {tuple(tensor.shape)}")
        if self._arity is None:
            self._arity = len(key)
        if len(key) != self._arity:
            raise ValueError(f"TensorStore keys have {self._arity} ints, got {key}")
        t = tensor.detach().to(device="cpu", dtype=self.dtype, copy=True).contiguous()
        self._drop(key)
        n, nbytes = int(t.shape[0]), t.numel() * self._itemsize
        if self.budget_bytes is None or self._memory + nbytes <= self.budget_bytes:
            self._entries[key] = _Entry(n, tensor=t)
            self._memory += nbytes
            return
        offset = self._alloc(n)
        self._map[offset:offset + n] = t.view(self._torch_word).numpy()
        self._entries[key] = _Entry(n, offset=offset)

    def get(self, key: Key) -> torch.Tensor:
        """A copy of the stored tensor (in the store's dtype)."""
        e = self._entries[tuple(key)]
        if e.tensor is not None:
            return e.tensor.clone()
        words = np.array(self._map[e.offset:e.offset + e.rows])
        return torch.from_numpy(words).view(self.dtype)

    def _drop(self, key: Key) -> None:
        """Forget ``key``'s value (keeping its insertion position if it is put again)."""
        e = self._entries.get(key)
        if e is None:
            return
        if e.tensor is not None:
            self._memory -= e.tensor.numel() * self._itemsize
            e.tensor = None
        else:
            self._release(e.offset, e.rows)
        e.rows, e.offset = 0, -1

    # --- spill file ------------------------------------------------------------------------------
    def _alloc(self, n: int) -> int:
        for i, (off, rows) in enumerate(self._free):
            if rows >= n:
                self._free[i:i + 1] = [(off + n, rows - n)] if rows > n else []
                return off
        off = self._end
        self._end += n
        if self._end > self._capacity:
            self._grow(self._end)
        return off

    def _release(self, off: int, n: int) -> None:
        if n == 0:
            return
        free = sorted(self._free + [(off, n)])
        merged: list[tuple[int, int]] = []
        for o, r in free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + r)
            else:
                merged.append((o, r))
        if merged and merged[-1][0] + merged[-1][1] == self._end:
            self._end = merged.pop()[0]
        self._free = merged

    def _grow(self, rows: int) -> None:
        row_bytes = max(1, self._dim * self._itemsize)
        capacity = max(rows, 2 * self._capacity, _CHUNK_BYTES // row_bytes, 1)
        if self._path is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            fd, self._path = tempfile.mkstemp(prefix="tensorstore-", suffix=".bin", dir=self.spill_dir)
            os.close(fd)
            self._finalizer = weakref.finalize(self, _remove, self._path)
        if self._map is not None:
            self._map.flush()
            self._map = None
        with open(self._path, "r+b") as f:
            f.truncate(capacity * max(1, self._dim) * self._itemsize)
        self._capacity = capacity
        self._map = np.memmap(self._path, dtype=self._np_word, mode="r+", shape=(capacity, self._dim))

    def discard(self, where: Callable[[Key], bool]) -> None:
        """Remove the entries whose key satisfies ``where``."""
        for key in [k for k in self._entries if where(k)]:
            self._drop(key)
            del self._entries[key]

    # --- lifecycle -------------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every entry; the spill file (if any) is emptied but kept for reuse."""
        self._entries.clear()
        self._memory, self._free, self._end = 0, [], 0
        self._dim = self._arity = None
        self._map, self._capacity = None, 0
        if self._path is not None:
            with open(self._path, "r+b") as f:
                f.truncate(0)

    def close(self) -> None:
        """Drop every entry and remove the spill file."""
        self.clear()
        if self._finalizer is not None:
            self._finalizer()
        self._path, self._finalizer = None, None

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- checkpointing ---------------------------------------------------------------------------
    def state_dict(self, where: Callable[[Key], bool] | None = None) -> dict[str, Any]:
        """``keys`` (N, k) int64, ``lengths`` (N,) int64, ``data`` (sum of lengths, d) in the dtype; only the
        entries whose key satisfies ``where`` if given (in insertion order either way)."""
        keys = [k for k in self.keys() if where is None or where(k)]
        d = self._dim or 0
        return {
            "keys": torch.tensor(keys, dtype=torch.int64).reshape(len(keys), self._arity or 0),
            "lengths": torch.tensor([self._entries[k].rows for k in keys], dtype=torch.int64),
            "data": torch.cat([self.get(k) for k in keys]) if keys else torch.empty(0, d, dtype=self.dtype),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the contents with ``state``'s entries, re-applying the memory budget in order."""
        self.clear()
        self.update(state)

    def update(self, state: dict[str, Any]) -> None:
        """Put ``state``'s entries (a :meth:`state_dict`), keeping the others."""
        keys, lengths, data = state["keys"], state["lengths"], state["data"]
        start = 0
        for key, n in zip(keys.tolist(), lengths.tolist()):
            self.put(tuple(key), data[start:start + n])
            start += n
