"""Deployed federations on Flower (issue 19): a real SuperLink and three SuperNodes on 127.0.0.x, TLS and SuperNode
authentication on, credentials made by the test; each deployed run is compared with its simulated twin.

Every Flower process is started by the test (tests/flower_lab.py) and stopped by its process group id, also when a
test fails.
"""

from __future__ import annotations

import json
import shutil
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


def _node_config(lab: FlowerLab, i: int) -> str:
    """SuperNode ``i``'s node config: its organisation's files, which each test replaces with its run's."""
    home = lab.root / f"node-{i}"
    return (f'partition-id={i} data-path="{home}/train.jsonl" public-path="{home}/public.jsonl" '
            f'eval-path="{home}/eval.jsonl" state-dir="{home}/state"')


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The SuperLink and three SuperNodes, up for the whole module (a SuperNode that stops cannot rejoin until
    the SuperLink has missed its heartbeats, about a minute)."""
    root = tmp_path_factory.mktemp("flower-lab")
    with FlowerLab(root, NODES) as lab:
        lab.start_superlink()
        for i in range(NODES):
            lab.register(i)
        for i in range(NODES):
            lab.start_supernode(i, _node_config(lab, i))
        for i in range(NODES):
            lab.wait_connected(i)
        yield lab


def _give_data(lab: FlowerLab, cfg, work: Path) -> None:
    """Partition ``cfg``'s data as a laboratory does and hand each organisation its file (and the shared ones)."""
    data = work / "data"
    write_partition_files(cfg, data)
    for i in range(NODES):
        home = lab.root / f"node-{i}"
        home.mkdir(exist_ok=True)
        shutil.copyfile(data / f"client-{i}.jsonl", home / "train.jsonl")
        shutil.copyfile(data / "eval.jsonl", home / "eval.jsonl")
        if (data / "public.jsonl").exists():
            shutil.copyfile(data / "public.jsonl", home / "public.jsonl")


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _assert_same_rows(deployed: Path, simulated: Path) -> None:
    """Every metric equal, bit for bit; a split client's peak memory to 0.1%: in one process, the memory meter
    of the client's step also sees a scalar the server's half still holds (4 bytes), deployed it does not."""
    a, b = _rows(deployed), _rows(simulated)
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b):
        mem_a, mem_b = row_a.pop("peak_memory_bytes", 0), row_b.pop("peak_memory_bytes", 0)
        assert abs(mem_a - mem_b) <= 1e-3 * max(mem_a, mem_b), (row_a["round"], mem_a, mem_b)
    assert a == b


def _simulate(cfg, out: Path) -> dict:
    return Runner(cfg, out).run()


def _prepare(lab: FlowerLab, cfg, name: str, *, give_data: bool = True) -> tuple[Path, Path]:
    """Simulate ``cfg`` and write its app; returns (simulated run dir, app dir). The deployed run writes
    ``<work>/deployed``."""
    work = lab.root / name
    _simulate(cfg, work / "simulated")
    if give_data:
        _give_data(lab, cfg, work)
    return work / "simulated", write_app(cfg, work / "app", work / "deployed", certificates=lab.creds.ca_cert.parent)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _same_adapter(a: Path, b: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / "adapter" / name).read_bytes() == (b / "adapter" / name).read_bytes(), name


def _check_twin(deployed: Path, simulated: Path) -> dict:
    """The deployed run equals its simulated twin (metrics, adapter, ledger); returns its summary."""
    _assert_same_rows(deployed, simulated)
    _same_adapter(simulated, deployed)
    summary = _summary(deployed)
    assert summary["comm"] == _summary(simulated)["comm"]  # the ledger: fedtune's payloads, exactly as simulated
    return summary


SPLIT_VARIANTS = {
    "split-standard": ("split.cut=1",),
    "split-ushape-splitcom": ("split.ushape=true", "split.cut=2", "compression.method='splitcom'",
                              "compression.theta=0.5"),
}


def test_fedllm_and_split_deployed_equal_simulated_even_after_the_serverapp_is_killed(lab, tiny_config):
    """Three deployed runs at once on the same SuperNodes (they share the clients' data): FedLLM, whose ServerApp
    is killed after its first checkpoint and resumed, split standard and U-shape with SplitCom. Each equals its
    simulated twin."""
    fed_sim, fed_app = _prepare(lab, tiny_config("federation.rounds=3", "name=fedllm-deployed"), "fedllm")
    splits = {name: _prepare(lab, tiny_config("paradigm=split", *variant, "federation.rounds=2", f"name={name}"),
                             name, give_data=False) for name, variant in SPLIT_VARIANTS.items()}
    fed_dir = fed_app.parent / "deployed"
    try:
        for name, (_, app) in splits.items():
            lab.start_run(app, name=f"{name}-run")
        lab.start_run(fed_app, name="fedllm-run")
        first = lab.run_id("fedllm-run")
        _wait_file(fed_dir / "checkpoints" / "latest", lambda p: True)
        servers = lab.serverapps_holding(fed_dir / ".fedtune.lock")
        assert len(servers) == 1, servers
        servers[0].kill()  # the ServerApp (and with it the run's split server, were it split) dies mid-run
        lab.kill("fedllm-run")
        lab.flwr("stop", str(first), "lab")
        lab.run_app(fed_app, "resume=true", timeout=600)
        for name in splits:
            assert lab.processes[f"{name}-run"].wait(timeout=600) == 0, lab.log(f"{name}-run")[-3000:]
    finally:
        for name in [*splits, "fedllm"]:
            lab.kill(f"{name}-run")
    summary = _check_twin(fed_dir, fed_sim)
    runtime = summary["runtime"]
    assert runtime["backend"] == "flower" and sorted(runtime["nodes"]) == ["0", "1", "2"]
    # what Flower really carried (the resumed ServerApp counts its own rounds, the last one at least): the payloads
    # plus framing and the turns' instructions
    last = _rows(fed_dir)[-1]
    assert runtime["carried_bytes"]["down"] > last["downlink_bytes"]
    assert runtime["carried_bytes"]["up"] > last["uplink_bytes"]
    for name in ("metrics.jsonl", "summary.json", "report.md", "config.toml", "partition.json"):
        assert (fed_dir / name).is_file(), name
    # the clients' private state stayed on their machines, one file per turn
    token = json.loads((fed_dir / "deploy.json").read_text())["token"]
    rounds = sorted(p.name for p in (lab.root / "node-0" / "state" / token).glob("round-*.pt"))
    assert rounds == ["round-1.pt", "round-2.pt", "round-3.pt"]
    for name, (sim, app) in splits.items():
        stream = _check_twin(app.parent / "deployed", sim)["runtime"]["split_stream_bytes"]
        assert stream["up"] > 0 and stream["down"] > 0  # the stream's frames: payloads and headers


def test_kd_deployed_equals_simulated(lab, tiny_config):
    cfg = tiny_config("paradigm=kd", "kd.server_model=true", "kd.public_samples=16", "federation.rounds=2",
                      "name=kd-deployed")
    sim, app = _prepare(lab, cfg, "kd")
    lab.run_app(app, timeout=600)
    _check_twin(app.parent / "deployed", sim)


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
    _give_data(lab, cfg, work)
    app = write_app(cfg, work / "app", work / "deployed")
    seen = len(lab.log("supernode-2"))
    try:
        lab.start_run(app, name="node-fault-run")
        lab._wait_for(lambda: "Receiving: train message" in lab.log("supernode-2")[seen:], "round 1's turn",
                      "supernode-2", 300)  # it reached client 2: kill the node mid-round
        lab.kill("supernode-2")
        metrics = work / "deployed" / "metrics.jsonl"
        _wait_file(metrics, lambda p: _metrics_rounds(p) >= 1)
        lab.restart_supernode(2, _node_config(lab, 2))
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
