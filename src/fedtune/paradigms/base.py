"""The paradigm interface the runner drives, what it declares it can do, and what one round reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

from fedtune.core.registry import Registry
from fedtune.runtime.base import BACKENDS, Capabilities

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

    #: What this paradigm does (backends and the network model read it; nobody guesses from its methods).
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Settings only this paradigm acts on: the error a run of another paradigm gives when one is set, and the test
    #: of whether it is set (``fedtune run --set paradigm=kd`` with pruning rates is a mistake, not a no-op).
    exclusive_settings: ClassVar[dict[str, Callable]] = {}
    #: Config sections only this paradigm reads (a ``fedtune compare`` sweep over them reruns only this paradigm).
    own_sections: ClassVar[tuple[str, ...]] = ()
    #: Config keys of shared sections that only this paradigm reads (the same for a single key).
    own_keys: ClassVar[tuple[str, ...]] = ()
    #: Keys of a client's turn state (``ClientJob.state``, ``ClientReply.state``) that are the client's own: in a
    #: deployment (``runtime.backend = "flower"``) they stay on the client's machine and never cross the network;
    #: the other keys are the server's instructions for the turn (a pruning rate), sent with it.
    private_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise ValueError for a configuration this paradigm cannot run (called by config validation): settings
        of other paradigms, a backend that cannot run it, and (subclasses) its own sections' cross-checks."""
        for other in PARADIGMS:
            owner = PARADIGMS.get(other)
            if owner is cls:
                continue
            for message, is_set in owner.exclusive_settings.items():
                if is_set(cfg):
                    raise ValueError(f"{message}; paradigm is {cfg.paradigm!r}")
        backend = BACKENDS.get(cfg.runtime.backend)
        backend.check_capabilities(cls.capabilities, cfg.paradigm)
        if backend.remote_clients:
            cls.check_remote(cfg)

    @classmethod
    def check_remote(cls, cfg) -> None:
        """Raise ValueError for settings that need what a deployment's server does not have (the clients' data);
        called when ``runtime.backend`` runs clients on their own machines."""

    def client_private_state(self, cid: int) -> dict:
        """Client ``cid``'s private turn state as this copy of the run holds it (a deployed client's first turn
        starts from its copy's: the initial state)."""
        return {k: v for k, v in self.client_job(0, cid).state.items() if k in self.private_state}

    @classmethod
    def lora_rank_pattern(cls, cfg, base_model) -> dict[str, int] | None:
        """Per-module LoRA ranks (PEFT ``rank_pattern``) this paradigm needs, decided before LoRA is attached."""
        return None

    @classmethod
    def reserved_rows(cls, cfg, num_train: int) -> list[int]:
        """Training rows the paradigm keeps out of every client's partition (KD's public set), chosen from the
        config alone, so that the partitions, ``partition.json`` and the network workload all see them held out."""
        return []

    def observe_eval(self, round: int, result) -> None:
        """Called after each held-out evaluation (e.g. for controllers driven by validation perplexity)."""

    def summary_extra(self) -> dict:
        """Paradigm-specific summary entries: {"comm": {...}, "clients": {id: {...}}, other sections}."""
        return {}

    def stop_before(self, round: int) -> str | None:
        """Why the run must end before ``round`` (e.g. it would spend more than its privacy budget); None: go on."""
        return None

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


def reads_key(paradigm: str, key: str) -> bool:
    """Whether a run of ``paradigm`` can read config ``key`` (dotted): not when the key's section, or the key itself,
    is one that only other paradigms read (``Paradigm.own_sections``, ``Paradigm.own_keys``)."""
    section = key.split(".", 1)[0]
    owners = [name for name in PARADIGMS if section in PARADIGMS.get(name).own_sections
              or any(key == own or key.startswith(own + ".") for own in PARADIGMS.get(name).own_keys)]
    return not owners or paradigm in owners
