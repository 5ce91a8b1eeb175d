"""KD-FedLLM building blocks: server-side aggregation of clients' top-k logits, and the distillation loss."""

from fedtune.kd.aggregation import AGGREGATORS, aggregate_logits
from fedtune.kd.distill import check_tokenizers, distill_loss

__all__ = ["AGGREGATORS", "aggregate_logits", "check_tokenizers", "distill_loss"]
