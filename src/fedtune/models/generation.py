"""Greedy answer generation for formatted prompts (plain or PEFT-wrapped model), one or a batch at a time."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def generate_answers(
    model: torch.nn.Module, tokenizer: "PreTrainedTokenizerBase", prompt_texts: list[str], max_new_tokens: int,
    batch_size: int = 8,
) -> list[str]:
    """Greedy-decode up to ``max_new_tokens`` after each prompt; returns only the new text, special tokens skipped.

    Prompts are used as is (e.g. already chat-formatted); a BOS is added only where the tokenizer adds one and the
    text does not already start with it. Batches are left-padded, so every row continues right after its prompt.
    The model is put in eval mode for the call and its mode restored after.
    """
    bos = tokenizer.bos_token
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompt_texts), batch_size):
            chunk = prompt_texts[start : start + batch_size]
            add_special = not (bos and all(t.startswith(bos) for t in chunk))
            inputs = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special).to(device)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def generate_answer(
    model: torch.nn.Module, tokenizer: "PreTrainedTokenizerBase", prompt_text: str, max_new_tokens: int
) -> str:
    """Greedy answer to one prompt (see :func:`generate_answers`)."""
    return generate_answers(model, tokenizer, [prompt_text], max_new_tokens)[0]
