"""The byte ledger: serialised bytes of every message, per round, client, direction and kind."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

UP = "up"
DOWN = "down"


@dataclass(frozen=True)
class LedgerKey:
    round: int
    client: int
    direction: str
    kind: str


class Ledger:
    """Accumulates (messages, bytes, baseline bytes, retransmitted messages, retransmitted bytes) per
    :class:`LedgerKey`; totals are sums over any filter.

    ``baseline`` bytes are what the same message would have cost uncompressed (equal to ``bytes`` for a
    message no codec touched), so reductions come from the run's own ledger. A ``retransmit`` message is one sent
    again (a lost turn's download, resent when the turn is retried): its bytes count in ``bytes`` like any other
    (they crossed again) and also in ``retransmitted_bytes``, which says how many of them were repeats.
    """

    def __init__(self) -> None:
        self._rows: dict[LedgerKey, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])

    def record(self, round: int, client: int, direction: str, kind: str, nbytes: int,
               baseline_bytes: int | None = None, retransmit: bool = False) -> None:
        if direction not in (UP, DOWN):
            raise ValueError(f"direction must be {UP!r} or {DOWN!r}, got {direction!r}")
        row = self._rows[LedgerKey(round, client, direction, kind)]
        row[0] += 1
        row[1] += nbytes
        row[2] += nbytes if baseline_bytes is None else baseline_bytes
        if retransmit:
            row[3] += 1
            row[4] += nbytes

    def _total(self, column: int, round: int | None, client: int | None, direction: str | None,
               kind: str | None) -> int:
        """The sum of one column (messages, bytes, baseline, retransmitted messages, bytes) over the matching rows."""
        wanted = {"round": round, "client": client, "direction": direction, "kind": kind}
        return sum(row[column] for key, row in self._rows.items()
                   if all(value is None or getattr(key, name) == value for name, value in wanted.items()))

    def messages(self, *, round: int | None = None, client: int | None = None,
                 direction: str | None = None, kind: str | None = None) -> int:
        return self._total(0, round, client, direction, kind)

    def bytes(self, *, round: int | None = None, client: int | None = None,
              direction: str | None = None, kind: str | None = None) -> int:
        return self._total(1, round, client, direction, kind)

    def baseline_bytes(self, *, round: int | None = None, client: int | None = None,
                       direction: str | None = None, kind: str | None = None) -> int:
        return self._total(2, round, client, direction, kind)

    def retransmitted_messages(self, *, round: int | None = None, client: int | None = None,
                               direction: str | None = None, kind: str | None = None) -> int:
        return self._total(3, round, client, direction, kind)

    def retransmitted_bytes(self, *, round: int | None = None, client: int | None = None,
                            direction: str | None = None, kind: str | None = None) -> int:
        """The bytes of messages sent again (part of :meth:`bytes`, not in addition to it)."""
        return self._total(4, round, client, direction, kind)

    def clients(self) -> list[int]:
        return sorted({key.client for key in self._rows})

    def drop_after(self, round: int) -> None:
        """Forget rows of rounds after ``round`` (used when resuming from a checkpoint)."""
        for key in [k for k in self._rows if k.round > round]:
            del self._rows[key]

    def state_dict(self) -> list[list]:
        """One row per key: round, client, direction, kind, messages, bytes, baseline bytes, and the retransmitted
        messages and bytes only where there were any (a row without is as checkpoints written before them hold)."""
        return [[k.round, k.client, k.direction, k.kind, *row[:3], *(row[3:] if row[3] else [])] for k, row in sorted(
            self._rows.items(), key=lambda kv: (kv[0].round, kv[0].client, kv[0].direction, kv[0].kind))]

    def load_state_dict(self, rows: list[list]) -> None:
        self._rows.clear()
        for rnd, client, direction, kind, n, b, base, *retransmitted in rows:
            rn, rb = retransmitted or (0, 0)
            key = LedgerKey(int(rnd), int(client), direction, kind)
            self._rows[key] = [int(n), int(b), int(base), int(rn), int(rb)]
