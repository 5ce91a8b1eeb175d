"""Deployed federations on Flower that go wrong (issue 19): refused SuperNodes, and a SuperNode killed mid-round,
on a real SuperLink and three SuperNodes on 127.0.0.x with TLS and SuperNode authentication (tests/flower_lab.py
starts them and stops them by process group id, also when a test fails)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fedtune.deploy.app_files import write_app
from fedtune.deploy.credentials import write_node_key
from flower_lab import NODES, give_data, node_config, running_lab, wait_file

pytestmark = pytest.mark.flower


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(tmp_path_factory.mktemp("flower-faults"))


def _refused_supernode(lab, index: int, why: str, **start) -> str:
    """Start SuperNode ``index`` with ``start``'s key or CA, which the federation must refuse: it exits with an
    error and never connects. Returns its log."""
    proc = lab.start_supernode(index, 'partition-id=0 data-path="/nonexistent.jsonl"', **start)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a SuperNode {why} kept running:\n" + lab.log(f"supernode-{index}")[-2000:])
    finally:
        lab.kill(f"supernode-{index}")
    log = lab.log(f"supernode-{index}")
    assert proc.returncode != 0 and "SuperNode ID" not in log, log[-2000:]
    return log


def test_unregistered_supernode_is_refused(lab):
    stranger = write_node_key(lab.root / "stranger-key")
    log = _refused_supernode(lab, NODES, "with an unregistered key", key=stranger)
    assert "Failed to activate SuperNode" in log, log[-2000:]  # the SuperNode's side
    assert "No SuperNode found with the given public key" in lab.log("superlink")  # the SuperLink's side


def test_supernode_trusting_another_ca_is_refused(lab, tmp_path):
    from fedtune.deploy.credentials import make_credentials

    other = make_credentials(tmp_path / "other", ["127.0.0.1"], 0)
    log = _refused_supernode(lab, NODES + 1, "that cannot verify the SuperLink", root_certificates=other.ca_cert,
                             key=lab.creds.node_key(NODES))
    assert "certificate" in log.lower(), log[-2000:]


def _metrics_rounds(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) - 1 if path.exists() else -1


def test_supernode_killed_mid_round_then_rejoins(lab, tiny_config):
    cfg = tiny_config("federation.rounds=6", "federation.min_clients=2", "runtime.client_timeout_s=30",
                      "runtime.max_retries=0", "name=node-fault")
    work = lab.root / "node-fault"
    give_data(lab, cfg, work)
    app = write_app(cfg, work / "app", work / "deployed")
    seen = len(lab.log("supernode-2"))
    try:
        lab.start_run(app, name="node-fault-run")
        lab.wait_log("supernode-2", "Receiving: train message", after=seen)  # reached client 2: kill it mid-round
        lab.kill("supernode-2")
        metrics = work / "deployed" / "metrics.jsonl"
        wait_file(metrics, lambda p: _metrics_rounds(p) >= 1)
        lab.restart_supernode(2, node_config(lab, 2))
        lab.processes["node-fault-run"].wait(timeout=600)
    finally:
        lab.kill("node-fault-run")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(7))
    lost = [r for r in rows[1]["rejected"] if r["client"] == 2]
    assert lost and lost[0]["lost"] and "no reply" in lost[0]["reason"]
    assert all({r["client"] for r in row["rejected"]} <= {2} for row in rows[1:])  # the others went on
    assert not rows[-1]["rejected"]  # the restarted node rejoined
    summary = json.loads((work / "deployed" / "summary.json").read_text())
    assert summary["runtime"]["lost_client_turns"] == sum(len(row["rejected"]) for row in rows)
