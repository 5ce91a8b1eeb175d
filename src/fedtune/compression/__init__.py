"""Compression on the split interfaces: SplitCom temporal reuse, threshold controllers, codecs, caches."""

# Importing the implementations registers them: one line per module that adds codecs or controllers.
from fedtune.compression import bf16, budget, lowbit, schedule  # noqa: E402,F401
