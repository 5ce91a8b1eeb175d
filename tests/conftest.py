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
