"""Greedy answer generation for a formatted prompt (plain or PEFT-wrapped model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def generate_answer(
    model: torch.nn.Module, tokenizer: "PreTrainedTokenizerBase", prompt_text: str, max_new_tokens: int
) -> str:
    """Greedy-decode up to ``max_new_tokens`` after ``prompt_text``; returns only the new text, special tokens skipped.

    ``prompt_text`` is used as is (e.g. already chat-formatted); a BOS is added only where the tokenizer adds one and
    the text does not already start with it. The model is put in eval mode for the call and restored after.
    """
    bos = tokenizer.bos_token
    add_special = not (bos and prompt_text.startswith(bos))
    device = next(model.parameters()).device
    inputs = tokenizer(prompt_text, return_tensors="pt", add_special_tokens=add_special).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)
