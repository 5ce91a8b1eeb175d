"""Held-out loss of each client's own adapter, for paradigms without one global model (KD, local-only)."""

from __future__ import annotations

from fedtune.models.lora import load_adapter_state
from fedtune.training.evaluation import evaluate


class ClientEvaluations:
    """Each client's latest eval loss; refreshed for the clients that trained, computed once for the rest."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}

    def refresh(self, ctx, states: list[dict], trained: list[int], model_of=None) -> None:
        """Evaluate each client in ``trained`` (and any never evaluated) with its adapter in its model
        (``model_of(cid)``; default the run's one model)."""
        for cid, state in enumerate(states):
            if cid in trained or cid not in self.loss:
                model = model_of(cid) if model_of is not None else ctx.model
                load_adapter_state(model, state)
                self.loss[cid] = self.evaluate(ctx, model)

    @staticmethod
    def evaluate(ctx, model) -> float:
        """``model``'s loss on the run's held-out samples."""
        return evaluate(model, ctx.eval_samples, batch_size=ctx.cfg.eval.batch_size, pad_token_id=ctx.pad_token_id,
                        device=ctx.device).loss

    def mean(self) -> float | None:
        return sum(self.loss.values()) / len(self.loss) if self.loss else None

    def by_client(self) -> dict[str, float]:
        return {str(c): v for c, v in sorted(self.loss.items())}

    def state_dict(self) -> list[list]:
        return [[c, v] for c, v in sorted(self.loss.items())]

    def load_state_dict(self, state: list[list]) -> None:
        self.loss = {int(c): float(v) for c, v in state}


def largest_client(sizes: dict[int, int]) -> int:
    """The client with the most training samples (lowest id on ties): the evaluated one without a global model."""
    return max(sizes, key=lambda c: (sizes[c], -c))
