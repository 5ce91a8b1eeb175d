"""Paradigms by name (``paradigm = ...``): each is a server role plus client roles on one engine."""

# Importing the implementations registers them.
from fedtune.paradigms import centralized, fedllm, kd, local, split  # noqa: E402,F401
from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult, reads_key

__all__ = ["PARADIGMS", "Paradigm", "RoundResult", "reads_key"]
