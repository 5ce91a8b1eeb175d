"""Client side of KD-FedLLM: the distillation loss against the server's soft labels, and tokenizer checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedtune.core.errors import ConfigError


def distill_loss(student_logits: torch.Tensor, soft_indices: torch.Tensor | None, soft_probs: torch.Tensor,
                 mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(soft || q_T)``, mean over valid positions, where ``q_T = softmax(student / T)``.

    ``student_logits`` [N, V]; ``soft_indices`` [N, k] (None: ``soft_probs`` covers the full vocabulary [N, V]);
    ``soft_probs`` [N, k]; ``mask`` [N] (False: the position has no soft label and adds nothing).
    With top-k soft labels the student is renormalised over the same k indices, like the soft labels themselves
    (which are a softmax over k values): per position ``sum_j p_j * (log p_j - log softmax(student[idx] / T)_j)``
    (0 log 0 = 0). Comparing against the full-vocabulary ``q_T`` instead would reward pushing all mass into the
    k tokens, i.e. over-sharpening the student; a student whose logits equal the teacher's has zero loss here.
    """
    logits = student_logits.float() / temperature
    if soft_indices is not None:
        logits = logits.gather(-1, soft_indices.long())
    log_q = F.log_softmax(logits, dim=-1)
    p = soft_probs.float()
    per_position = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)
    mask = mask.bool()
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    return temperature**2 * per_position[mask].mean()


def _special_tokens(tokenizer) -> dict:
    return {name: getattr(tokenizer, name, None)
            for name in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")}


def check_tokenizers(tokenizers: list) -> None:
    """Logit-level KD needs one vocabulary: raise :class:`ConfigError` unless every tokenizer matches the first
    (same token -> id map and the same special tokens)."""
    if not tokenizers:
        return
    ref_vocab, ref_special = tokenizers[0].get_vocab(), _special_tokens(tokenizers[0])
    for i, tok in enumerate(tokenizers[1:], start=1):
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            differ = len(set(vocab.items()) ^ set(ref_vocab.items()))
            raise ConfigError(
                f"KD-FedLLM needs every client to share one tokenizer: tokenizer {i} has a different vocabulary "
                f"({len(vocab)} tokens vs {len(ref_vocab)}, {differ} entries differ), so logits cannot be aligned")
        special = _special_tokens(tok)
        if special != ref_special:
            diff = {k: (ref_special[k], special[k]) for k in special if special[k] != ref_special[k]}
            raise ConfigError(f"KD-FedLLM needs every client to share one tokenizer: tokenizer {i} has different "
                              f"special tokens {diff}")
