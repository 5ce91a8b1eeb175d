"""Paradigms by name (``paradigm = ...``): each is a server role plus client roles on one engine."""

from fedtune.paradigms.base import PARADIGMS, Paradigm, RoundResult

# Importing the implementations registers them.
from fedtune.paradigms import centralized, fedllm, kd, local, split  # noqa: E402,F401

__all__ = ["PARADIGMS", "Paradigm", "RoundResult"]
