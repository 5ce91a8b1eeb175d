"""Held-out prompts with all their references, for task metrics by generation."""

from __future__ import annotations

from typing import Iterable


def reference_sets(prompts: Iterable[str], source: Iterable[tuple[str, str]],
                   limit: int) -> list[tuple[str, list[str]]]:
    """The first ``limit`` distinct ``prompts`` (in order), each with every response ``source`` (pairs of prompt
    and response) gives for it.

    ``prompts`` are the capped eval split's; ``source`` is the whole held-out data, so a prompt is scored against
    every reference the data has for it (E2E's test file: up to 45 per meaning representation), not only those
    that survived the cap.
    """
    chosen: list[str] = []
    for prompt in prompts:
        if prompt not in chosen:
            chosen.append(prompt)
            if len(chosen) == limit:
                break
    refs: dict[str, list[str]] = {p: [] for p in chosen}
    for prompt, response in source:
        if prompt in refs:
            refs[prompt].append(response)
    return list(refs.items())
