"""A tiny byte-level BPE tokenizer, trained offline on bundled English text, for the tiny random models."""

from __future__ import annotations

import importlib.resources
import importlib.util
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.core.errors import FedtuneError

if TYPE_CHECKING:  # imported lazily, transformers is slow to import
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + '<|endoftext|>\n' }}"
    "{% else %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _corpus() -> Iterator[str]:
    """Fixed training text: the bundled E2E lines (MR and reference) and the English chatterbot YAML lines."""
    e2e = importlib.resources.files("fedtune") / "data/builtin/e2e/train.txt"
    if not e2e.is_file():
        raise FedtuneError(f"bundled E2E text missing ({e2e}); reinstall fedtune")
    for line in e2e.read_text(encoding="utf-8").splitlines():
        yield from (part.strip() for part in line.split("||") if part.strip())
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise FedtuneError("package chatterbot-corpus is missing: pip install chatterbot-corpus==1.3.3")
    english = Path(spec.submodule_search_locations[0]) / "data" / "english"
    for path in sorted(english.glob("*.yml")):
        for line in path.read_text(encoding="utf-8").splitlines():
            text = line.strip().lstrip("-").strip()
            if text and not text.endswith(":"):
                yield text


def _train(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, USER, ASSISTANT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def atomic_save(target: Path, save: Callable[[Path], object]) -> None:
    """Write a directory atomically: ``save(tmp)`` in a sibling temp dir, then rename it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        save(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # else a concurrent writer won the race: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tiny_tokenizer(vocab_size: int, cache: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``vocab_size`` entries (at most), trained once and cached in ``cache``."""
    target = Path(cache) / f"tiny-tokenizer-{vocab_size}"
    if not (target / "tokenizer.json").is_file():
        atomic_save(target, _train(vocab_size).save_pretrained)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(target)
