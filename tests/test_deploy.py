"""Deployed federations on Flower (issue 19): a real SuperLink and three SuperNodes on 127.0.0.x, TLS and SuperNode
authentication on, credentials made by the test; each deployed run is compared with its simulated twin.

Every Flower process is started by the test (tests/flower_lab.py) and stopped by its process group id, also when a
test fails.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fedtune.deploy.app_files import write_app
from fedtune.deploy.credentials import write_node_key
from fedtune.engine.partition_files import write_partition_files
from fedtune.engine.runner import Runner
from flower_lab import FlowerLab

pytestmark = pytest.mark.flower

NODES = 3
#: Per-row keys that depend on the machine's speed, not on the training.
TIMING = ("wall_s", "cum_wall_s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower-lab")
    with FlowerLab(root, NODES) as lab:
        lab.start_superlink()
        for i in range(NODES):
            lab.register(i)
        yield lab


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _simulate(cfg, out: Path) -> dict:
    return Runner(cfg, out).run()


def _start_nodes(lab: FlowerLab, data: Path, extra: str = "") -> None:
    for i in range(NODES):
        lab.start_supernode(i, f'partition-id={i} data-path="{data}/client-{i}.jsonl" '
                               f'state-dir="{lab.root}/state-{i}" {extra}')
    for i in range(NODES):
        lab.wait_connected(i)


def _stop_nodes(lab: FlowerLab) -> None:
    for i in range(NODES):
        lab.kill(f"supernode-{i}")


def _deployed_twin(lab: FlowerLab, cfg, name: str, extra_node_config: str = "") -> tuple[Path, Path, dict]:
    """Run ``cfg`` simulated and deployed; returns (simulated dir, deployed dir, deployed summary)."""
    work = lab.root / name
    sim = work / "simulated"
    _simulate(cfg, sim)  # also trains the tiny tokenizer into the cache the ClientApps share
    data = work / "data"
    write_partition_files(cfg, data)
    app = write_app(cfg, work / "app", work / "deployed")
    _start_nodes(lab, data, extra_node_config.format(data=data))
    try:
        lab.run_app(app, timeout=600)
    finally:
        _stop_nodes(lab)
    summary = json.loads((work / "deployed" / "summary.json").read_text())
    return sim, work / "deployed", summary


def _same_adapter(a: Path, b: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / "adapter" / name).read_bytes() == (b / "adapter" / name).read_bytes(), name


def test_fedllm_deployed_equals_simulated(lab, tiny_config):
    cfg = tiny_config("federation.rounds=2", "name=fedllm-deployed")
    sim, deployed, summary = _deployed_twin(lab, cfg, "fedllm")
    assert _rows(deployed) == _rows(sim)
    _same_adapter(sim, deployed)
    simulated = json.loads((sim / "summary.json").read_text())
    assert summary["comm"] == simulated["comm"]  # the ledger: fedtune's payloads, exactly as simulated
    runtime = summary["runtime"]
    assert runtime["backend"] == "flower" and sorted(runtime["nodes"]) == ["0", "1", "2"]
    # what Flower really carried: the payloads plus its framing, measured on every message
    assert runtime["carried_bytes"]["down"] > simulated["comm"]["downlink_bytes"]
    assert runtime["carried_bytes"]["up"] > simulated["comm"]["uplink_bytes"]
    for name in ("metrics.jsonl", "summary.json", "report.md", "config.toml", "partition.json"):
        assert (deployed / name).is_file(), name
    assert (deployed / "checkpoints" / "latest").exists()
    # the clients' private state stayed on their machines, one file per turn
    assert sorted(p.name for p in (lab.root / "state-0").glob("*/round-*.pt")) == ["round-1.pt", "round-2.pt"]


def test_kd_deployed_equals_simulated(lab, tiny_config):
    cfg = tiny_config("paradigm=kd", "kd.server_model=true", "kd.public_samples=16", "federation.rounds=2",
                      "name=kd-deployed")
    sim, deployed, _ = _deployed_twin(lab, cfg, "kd",
                                      'public-path="{data}/public.jsonl" eval-path="{data}/eval.jsonl"')
    assert _rows(deployed) == _rows(sim)
    _same_adapter(sim, deployed)


def test_kd_without_server_model_is_refused_before_deploying(tmp_path, tiny_config):
    from fedtune.core.errors import ConfigError

    with pytest.raises(ConfigError, match="kd.server_model = true"):
        write_app(tiny_config("paradigm=kd"), tmp_path / "app", tmp_path / "run")
    assert not (tmp_path / "app").exists()


def test_unregistered_supernode_is_refused(lab):
    stranger = write_node_key(lab.root / "stranger-key")
    proc = lab.start_supernode(NODES, 'partition-id=0 data-path="/nonexistent.jsonl"', key=stranger)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key kept running:\n" + lab.log(f"supernode-{NODES}")[-2000:])
    finally:
        lab.kill(f"supernode-{NODES}")
    log = lab.log(f"supernode-{NODES}")
    assert proc.returncode != 0
    assert "SuperNode ID" not in log
    assert "Failed to activate SuperNode" in log, log[-2000:]  # the SuperNode's side
    assert "No SuperNode found with the given public key" in lab.log("superlink")  # the SuperLink's side


def test_supernode_trusting_another_ca_is_refused(lab, tmp_path):
    from fedtune.deploy.credentials import make_credentials

    other = make_credentials(tmp_path / "other", ["127.0.0.1"], 0)
    index = NODES + 1
    proc = lab.start_supernode(index, 'partition-id=0 data-path="/nonexistent.jsonl"', root_certificates=other.ca_cert,
                               key=lab.creds.node_key(NODES))
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode that cannot verify the SuperLink kept running:\n" + lab.log(f"supernode-{index}")[-2000:])
    finally:
        lab.kill(f"supernode-{index}")
    log = lab.log(f"supernode-{index}")
    assert proc.returncode != 0 and "SuperNode ID" not in log
    assert "certificate" in log.lower(), log[-2000:]
