"""fedtune: federated fine-tuning of large language models.

Three paradigms (FedLLM, KD-FedLLM, Split-FedLLM) on one engine, with one byte ledger.
"""

__version__ = "0.1.0"
