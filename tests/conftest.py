"""Shared fixtures: an isolated fedtune cache and the tiny config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


@pytest.fixture(scope="session", autouse=True)
def fedtune_cache(tmp_path_factory):
    """Tests never touch the user's cache (tiny tokenizers are trained into a temporary one)."""
    if "FEDTUNE_TEST_KEEP_CACHE" not in os.environ:
        os.environ["FEDTUNE_CACHE"] = str(tmp_path_factory.mktemp("fedtune-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Tiny models run fastest on one thread, and one thread per process avoids oversubscribing 2 cores
    # when a test starts a subprocess.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_config():
    from fedtune.config import load_config

    def make(*overrides: str):
        return load_config(TINY, list(overrides))

    return make


def crash_and_resume(monkeypatch, paradigm_cls, make_runner, crash_round: int = 3) -> dict:
    """Run ``make_runner()`` with ``paradigm_cls.run_round`` interrupted in ``crash_round`` (after the previous
    round's checkpoint), then resume a fresh ``make_runner()`` in the same directory; its summary."""
    real = paradigm_cls.run_round

    def crash(self, round):
        if round == crash_round:
            raise KeyboardInterrupt("simulated crash")
        return real(self, round)

    monkeypatch.setattr(paradigm_cls, "run_round", crash)
    with pytest.raises(KeyboardInterrupt):
        make_runner().run()
    monkeypatch.setattr(paradigm_cls, "run_round", real)
    return make_runner().run(resume=True)
