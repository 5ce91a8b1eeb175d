"""Offline test fixtures for the data layer: a tiny byte-level BPE tokenizer trained on E2E text."""

from __future__ import annotations

from functools import lru_cache
from itertools import islice
from pathlib import Path

E2E_TRAIN = Path(__file__).resolve().parents[1] / "src" / "fedtune" / "data" / "builtin" / "e2e" / "train.txt"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>"]


@lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 400, chat: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` (eos/pad set, optional chat template), trained in ~0.1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    with E2E_TRAIN.open(encoding="utf-8") as fh:
        lines = [line.replace("||", "\n") for line in islice(fh, 300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast
