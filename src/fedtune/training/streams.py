"""A client's stream of training batches: seeded shuffles, epoch by epoch, resumable by position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedtune.core.seeding import numpy_rng


@dataclass
class SampleStream:
    """Yields sample indices from ``indices`` in a per-epoch seeded order.

    The order of epoch ``e`` depends only on (seed, owner, e); the position (epoch, cursor) is all
    that must be saved to resume.
    """

    indices: list[int]
    seed: int
    owner: int | str
    epoch: int = 0
    cursor: int = 0

    def _order(self) -> np.ndarray:
        perm = numpy_rng(self.seed, "data-order", self.owner, self.epoch).permutation(len(self.indices))
        return np.asarray(self.indices)[perm]

    def take(self, n: int) -> list[int]:
        """The next ``n`` sample indices, starting a new shuffled epoch when one ends."""
        out: list[int] = []
        order = self._order()
        while len(out) < n:
            if self.cursor >= len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self._order()
            take = min(n - len(out), len(order) - self.cursor)
            out.extend(int(i) for i in order[self.cursor : self.cursor + take])
            self.cursor += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
