"""Prompt formatting, tokenization with response-only labels, and padding collation.

Prompt and response are tokenized separately and concatenated, so the label mask boundary is exact:
``labels`` is -100 on every prompt token and equals ``input_ids`` on the response tokens and the
closing EOS token.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import torch

from fedtune.core.errors import DataError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


def format_prompt(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    """The text placed before the response: chat template with generation prompt, or ``prompt + "\\n"``.

    An empty prompt (plain-text data) gives ``""`` in both modes: there is no user turn to wrap.
    """
    if not prompt:
        return ""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def _leading_bos(tokenizer: Any) -> list[int]:
    """``[bos]`` if the tokenizer itself prepends BOS to plain text (e.g. Llama), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if ids[:1] == [bos] else []


def build_example(
    prompt_ids: list[int], response_ids: list[int], eos_id: int | None, max_length: int
) -> tuple[list[int], list[int]] | None:
    """Concatenate and truncate to ``max_length``; None when no response token would survive.

    The prompt keeps its head and is cut to ``max_length - 1`` tokens at most, so a non-empty
    response always keeps its first token; the response (then EOS) fills the remaining room.
    """
    if not response_ids:
        return None
    prompt_ids = prompt_ids[: max_length - 1]
    target = (response_ids + ([eos_id] if eos_id is not None else []))[: max_length - len(prompt_ids)]
    return prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target


def tokenize_examples(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, chat_template: bool
) -> datasets.Dataset:
    """Add ``input_ids``, ``labels`` (-100 on the prompt) and ``length`` columns.

    Rows whose response has no tokens are dropped (logged as a warning); the count is stored on the
    result as ``num_dropped``. Deterministic and cache-free (plain Python lists).
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    missing = [c for c in ("prompt", "response") if c not in ds.column_names]
    if missing:
        raise DataError(f"cannot tokenize: missing column(s) {', '.join(missing)}; columns: {', '.join(ds.column_names)}")
    use_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
    bos = _leading_bos(tokenizer)
    text = ds.select_columns(["prompt", "response"]).to_dict()
    raw_prompts = text["prompt"]
    prompts = [format_prompt(tokenizer, p, chat_template) for p in raw_prompts]
    # A chat template writes its own BOS; plain prompts get the tokenizer's default BOS, if any.
    prefixes = [[] if use_template and p else bos for p in raw_prompts]
    responses = text["response"]
    prompt_ids = _encode(tokenizer, prompts)
    response_ids = _encode(tokenizer, responses)
    eos_id = getattr(tokenizer, "eos_token_id", None)

    keep: list[int] = []
    columns: dict[str, list[Any]] = {"input_ids": [], "labels": [], "length": []}
    for i, (prefix, p_ids, r_ids) in enumerate(zip(prefixes, prompt_ids, response_ids)):
        built = build_example(prefix + p_ids, r_ids, eos_id, max_length)
        if built is None:
            continue
        keep.append(i)
        columns["input_ids"].append(built[0])
        columns["labels"].append(built[1])
        columns["length"].append(len(built[0]))

    dropped = len(ds) - len(keep)
    if dropped:
        log.warning("dropped %d of %d samples with an empty response", dropped, len(ds))
    rest = ds.select(keep).remove_columns([c for c in columns if c in ds.column_names]).to_dict()
    out = datasets.Dataset.from_dict({**rest, **columns})
    out.num_dropped = dropped  # type: ignore[attr-defined]
    return out


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def collate(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (pad id), ``attention_mask`` (1/0) and ``labels`` (-100) to the batch max."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
