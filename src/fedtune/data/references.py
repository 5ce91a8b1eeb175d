"""Held-out prompts with all their references, for task metrics by generation."""

from __future__ import annotations

from typing import Iterable


def reference_sets(records: Iterable[dict], limit: int) -> list[tuple[str, list[str]]]:
    """The first ``limit`` distinct prompts (in order) with every response the records give for each.

    E2E's test split has several human references per meaning representation; BLEU uses them all.
    """
    refs: dict[str, list[str]] = {}
    for record in records:
        prompt, response = record["prompt"], record["response"]
        if prompt in refs:
            refs[prompt].append(response)
        elif len(refs) < limit:
            refs[prompt] = [response]
    return list(refs.items())
