"""Prompt formatting, tokenization with response-only labels, and padding collation.

Prompt and response are tokenized separately and concatenated, so the label mask boundary is exact:
``labels`` is -100 on every prompt token and equals ``input_ids`` on the response tokens and the
closing EOS token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from fedtune.core.errors import DataError

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


@dataclass
class Truncation:
    """What fitting a split's rows into the ``max_length`` window did to them."""

    max_length: int
    rows: int  # before dropping
    truncated: int = 0  # kept, their response cut at the window
    dropped_no_room: int = 0  # the prompt alone fills the window
    dropped_empty: int = 0  # no response tokens at all

    @property
    def dropped(self) -> int:
        return self.dropped_no_room + self.dropped_empty

    def warn(self, where: str) -> None:
        """One warning with the counts, when any row was cut or dropped."""
        if self.truncated or self.dropped:
            log.warning("%s: %d of %d rows cut at max_length %d; dropped %d whose prompt fills the window and %d "
                        "with an empty response", where, self.truncated, self.rows, self.max_length,
                        self.dropped_no_room, self.dropped_empty)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("max_length", "rows", "truncated", "dropped_no_room", "dropped_empty")}


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
    """Concatenate and truncate to ``max_length``; None when no response token would fit.

    The whole prompt is kept (a prompt cut short would lose its end, the chat template's assistant header
    included); the response (then EOS) fills the remaining room. A row whose prompt alone fills the window, or
    whose response is empty, gives None.
    """
    if not response_ids or len(prompt_ids) >= max_length:
        return None
    target = (response_ids + ([eos_id] if eos_id is not None else []))[: max_length - len(prompt_ids)]
    return prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target


def tokenize_examples(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, chat_template: bool, where: str = "data"
) -> datasets.Dataset:
    """Add ``input_ids``, ``labels`` (-100 on the prompt) and ``length`` columns.

    Rows with no response token to learn (an empty response, or a prompt that fills the window) are dropped;
    the counts are stored on the result as ``truncation`` (:class:`Truncation`) and ``num_dropped``, and
    logged as a warning with the rows cut at ``max_length``. Deterministic and cache-free (plain Python lists).
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
    stats = Truncation(max_length=max_length, rows=len(ds))
    for i, (prefix, p_ids, r_ids) in enumerate(zip(prefixes, prompt_ids, response_ids)):
        built = build_example(prefix + p_ids, r_ids, eos_id, max_length)
        if built is None:
            stats.dropped_empty += not r_ids
            stats.dropped_no_room += bool(r_ids)
            continue
        keep.append(i)
        stats.truncated += len(built[0]) < len(prefix) + len(p_ids) + len(r_ids) + (eos_id is not None)
        columns["input_ids"].append(built[0])
        columns["labels"].append(built[1])
        columns["length"].append(len(built[0]))

    stats.warn(where)
    rest = ds.select(keep).remove_columns([c for c in columns if c in ds.column_names]).to_dict()
    out = datasets.Dataset.from_dict({**rest, **columns})
    out.truncation = stats  # type: ignore[attr-defined]
    out.num_dropped = stats.dropped  # type: ignore[attr-defined]
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
