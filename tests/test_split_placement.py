"""Per-client cuts from device profiles: memory measured per block, compute time equalised."""

from __future__ import annotations

import pytest

from fedtune.config import DevicesConfig
from fedtune.core.errors import ConfigError
from fedtune.engine.runner import Runner
from fedtune.network.devices import DeviceProfile, client_profiles
from fedtune.split.cut import CutError
from fedtune.split.placement import ClientMemoryModel, cuts_from_profiles

MEM = ClientMemoryModel(fixed_bytes=100, per_block_bytes=50, tail_extra_bytes=30)


def flops_of(k: int) -> int:
    return 10 * k


def test_memory_model_is_linear_in_blocks():
    assert MEM.bytes_for(2, 0) == 200
    assert MEM.bytes_for(2, 1) == 100 + 150 + 30


def test_cuts_equalise_compute_time_and_respect_memory():
    devices = [DeviceProfile("slow", 10, 10_000, 0.1), DeviceProfile("fast", 40, 10_000, 0.1),
               DeviceProfile("small", 40, 220, 0.1)]
    cuts, caps = cuts_from_profiles(devices, MEM, flops_of, num_layers=8, tail=0, reference_cut=2, time_budget_s=None)
    # budget = 2 blocks on the slow device = 2 s; the fast one fits 8 blocks in 2 s but L - 1 = 7 caps it
    assert cuts == [2, 7, 2]
    assert caps == [7, 7, 2]  # memory: 100 + 50 k <= 220 -> k <= 2


def test_explicit_time_budget_bounds_capacity():
    devices = [DeviceProfile("a", 10, 10_000, 0.1)]
    cuts, caps = cuts_from_profiles(devices, MEM, flops_of, num_layers=8, tail=1, reference_cut=2, time_budget_s=3.0)
    assert cuts == [3] and caps == [3]


def test_device_too_small_for_one_block_is_an_error():
    with pytest.raises(CutError, match="cannot hold even one block"):
        cuts_from_profiles([DeviceProfile("tiny", 10, 120, 0.1)], MEM, flops_of, num_layers=4, tail=0,
                           reference_cut=1, time_budget_s=None)


def test_profiles_from_config():
    cfg = DevicesConfig(profiles=["phone", "mine"], custom={"mine": {"flops_per_s": 1e12, "memory_gb": 2}})
    names = [p.name for p in client_profiles(cfg, 2)]
    assert names == ["phone", "mine"]
    with pytest.raises(ConfigError, match="unknown device 'toaster'"):
        # config validation refuses it first (tests/test_bad_input.py); the run-time helper still checks
        client_profiles(DevicesConfig.model_construct(profiles=["toaster"], custom={}), 3)
    with pytest.raises(ConfigError, match="give one, or one per client"):
        client_profiles(DevicesConfig(profiles=["phone", "laptop"]), 3)


def test_run_places_cuts_by_device(tmp_path, tiny_config):
    cfg = tiny_config("paradigm=split", "devices.profiles=['phone', 'laptop', 'jetson']", "split.cut_policy='profiles'",
                      "split.cut=1", "federation.rounds=1", "train.local_steps=2")
    summary = Runner(cfg, tmp_path / "r").run()
    cuts = [c["cut_layer"][0] for c in summary["clients"]]
    assert cuts[0] == 1 and cuts[1] >= cuts[2] >= cuts[0] and cuts[1] > 1
    assert summary["split"]["memory_model"]["per_block_bytes"] > 0
    assert summary["split"]["devices"] == ["phone", "laptop", "jetson"]


def test_profiles_policy_needs_profiles(tiny_config):
    with pytest.raises(ConfigError, match="needs devices.profiles"):
        tiny_config("paradigm=split", "split.cut_policy='profiles'")
