"""The paradigm interface the runner drives, and what one round reports."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.registry import Registry

PARADIGMS: Registry[type["Paradigm"]] = Registry("paradigm")


@dataclass
class RoundResult:
    """What happened in one round, for metrics and accounting (bytes come from the ledger)."""

    train_loss: float | None
    clients: list[int]
    rejected: list[dict] = field(default_factory=list)
    client_flops: dict[int, int] = field(default_factory=dict)
    server_flops: int = 0
    client_peak_memory: dict[int, int] = field(default_factory=dict)
    server_peak_memory: int = 0
    extra: dict = field(default_factory=dict)  # paradigm-specific metrics for this round's line


class Paradigm:
    """A training paradigm. The runner calls ``run_round`` for rounds 1..R and checkpoints its state."""

    #: Whether clients train (False for the centralized reference, where the server trains on pooled data).
    federated: bool = True
    #: Whether clients can train a pruned model at a per-round rate (``ctx.pruning_rates``), e.g. from JCPBA.
    prunes_clients: bool = False
    #: Whether clients missing ``network.deadline_s`` are left out of the round's result (FedLLM's aggregate); then
    #: clients that cannot meet the deadline at all are not even asked (``ctx.network.left_out``).
    drops_stragglers: bool = False

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    @classmethod
    def lora_rank_pattern(cls, cfg, base_model) -> dict[str, int] | None:
        """Per-module LoRA ranks (PEFT ``rank_pattern``) this paradigm needs, decided before LoRA is attached."""
        return None

    def observe_eval(self, round: int, result) -> None:
        """Called after each held-out evaluation (e.g. for controllers driven by validation perplexity)."""

    def summary_extra(self) -> dict:
        """Paradigm-specific summary entries: {"comm": {...}, "clients": {id: {...}}, other sections}."""
        return {}

    def run_round(self, round: int) -> RoundResult:
        raise NotImplementedError

    def load_global(self) -> None:
        """Put the current global model into ``ctx.model`` (for evaluation and saving)."""
        raise NotImplementedError

    def client_sizes(self) -> dict[int, int]:
        return {cid: len(part) for cid, part in enumerate(self.ctx.partitions)}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError
