"""Per-client and server compute/memory totals across rounds (bytes live in the ledger)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from fedtune.paradigms.base import RoundResult


@dataclass
class Accounting:
    client_flops: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    client_peak_memory: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    rejected: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    rounds_trained: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    server_flops: int = 0
    server_peak_memory: int = 0
    wall_s: float = 0.0
    rejected_streak: int = 0  # rounds in a row in which clients were asked and no update was accepted

    def add(self, result: RoundResult, wall_s: float) -> None:
        for cid, flops in result.client_flops.items():
            self.client_flops[cid] += flops
            self.rounds_trained[cid] += 1
        for cid, peak in result.client_peak_memory.items():
            self.client_peak_memory[cid] = max(self.client_peak_memory[cid], peak)
        rejected = [item for item in result.rejected if not item.get("retried")]  # a retried turn's update arrived
        for item in rejected:
            self.rejected[item["client"]] += 1
        asked = set(result.clients) | {item["client"] for item in rejected}
        accepted = set(result.clients) - {item["client"] for item in rejected}
        if asked:
            self.rejected_streak = 0 if accepted else self.rejected_streak + 1
        self.server_flops += result.server_flops
        self.server_peak_memory = max(self.server_peak_memory, result.server_peak_memory)
        self.wall_s += wall_s

    def state_dict(self) -> dict:
        return {
            "client_flops": dict(self.client_flops), "client_peak_memory": dict(self.client_peak_memory),
            "rejected": dict(self.rejected), "rounds_trained": dict(self.rounds_trained),
            "server_flops": self.server_flops, "server_peak_memory": self.server_peak_memory, "wall_s": self.wall_s,
            "rejected_streak": self.rejected_streak,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("client_flops", "client_peak_memory", "rejected", "rounds_trained"):
            getattr(self, name).clear()
            getattr(self, name).update({int(k): int(v) for k, v in state[name].items()})
        self.server_flops = int(state["server_flops"])
        self.server_peak_memory = int(state["server_peak_memory"])
        self.wall_s = float(state["wall_s"])
        self.rejected_streak = int(state.get("rejected_streak", 0))  # checkpoints written before it existed: 0
