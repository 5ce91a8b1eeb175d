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


def _wait_file(path: Path, ready, timeout: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not (path.exists() and ready(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {path}")
        time.sleep(0.5)


def _metrics_rounds(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) - 1 if path.exists() else -1


def test_supernode_killed_mid_round_then_rejoins(lab, tiny_config):
    cfg = tiny_config("federation.rounds=6", "federation.min_clients=2", "runtime.client_timeout_s=30",
                      "runtime.max_retries=0", "name=node-fault")
    work = lab.root / "node-fault"
    data = work / "data"
    write_partition_files(cfg, data)
    app = write_app(cfg, work / "app", work / "deployed")
    _start_nodes(lab, data)
    try:
        lab.start_run(app, name="node-fault-run")
        lab.wait_log("supernode-2", "Receiving: train message")  # round 1's turn reached client 2: kill its node
        lab.kill("supernode-2")
        metrics = work / "deployed" / "metrics.jsonl"
        _wait_file(metrics, lambda p: _metrics_rounds(p) >= 1)
        lab.restart_supernode(2, f'partition-id=2 data-path="{data}/client-2.jsonl" state-dir="{lab.root}/state-2"')
        lab.processes["node-fault-run"].wait(timeout=600)
    finally:
        lab.kill("node-fault-run")
        _stop_nodes(lab)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(7))
    lost = [r for r in rows[1]["rejected"] if r["client"] == 2]
    assert lost and lost[0]["lost"] and "no reply" in lost[0]["reason"]
    assert all({r["client"] for r in row["rejected"]} <= {2} for row in rows[1:])  # the others went on
    assert not rows[-1]["rejected"]  # the restarted node rejoined
    summary = json.loads((work / "deployed" / "summary.json").read_text())
    assert summary["runtime"]["lost_client_turns"] == sum(len(row["rejected"]) for row in rows)


def test_serverapp_killed_then_resumed_equals_uninterrupted(lab, tiny_config):
    cfg = tiny_config("federation.rounds=3", "name=server-fault")
    work = lab.root / "server-fault"
    sim = work / "simulated"
    _simulate(cfg, sim)
    data = work / "data"
    write_partition_files(cfg, data)
    app = write_app(cfg, work / "app", work / "deployed")
    _start_nodes(lab, data)
    try:
        lab.start_run(app, name="server-fault-run")
        first = lab.run_id("server-fault-run")
        _wait_file(work / "deployed" / "checkpoints" / "latest", lambda p: True)
        servers = lab.processes_named("superlink", "flwr-serverapp")
        assert servers, "no ServerApp process found"
        for proc in servers:
            proc.kill()
        lab.kill("server-fault-run")
        lab.flwr("stop", str(first), "lab")
        lab.run_app(app, "resume=true", timeout=600)
    finally:
        _stop_nodes(lab)
    assert _rows(work / "deployed") == _rows(sim)
    _same_adapter(sim, work / "deployed")
