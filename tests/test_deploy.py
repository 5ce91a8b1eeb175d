"""Deployed federations on Flower (issue 19): a real SuperLink and three SuperNodes on 127.0.0.x, TLS and SuperNode
authentication on, credentials made by the test; each deployed run is compared with its simulated twin (the
refusals and a SuperNode killed mid-round: tests/test_deploy_faults.py).

Every Flower process is started by the test (tests/flower_lab.py) and stopped by its process group id, also when a
test fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.deploy.app_files import write_app
from fedtune.engine.runner import Runner
from flower_lab import FlowerLab, give_data, running_lab, wait_file

pytestmark = pytest.mark.flower

#: Per-row keys that depend on the machine's speed, not on the training.
TIMING = ("wall_s", "cum_wall_s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from running_lab(tmp_path_factory.mktemp("flower-lab"))


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


def _prepare(lab: FlowerLab, cfg, name: str, *, with_data: bool = True) -> tuple[Path, Path]:
    """Simulate ``cfg`` and write its app; returns (simulated run dir, app dir). The deployed run writes
    ``<work>/deployed``."""
    work = lab.root / name
    _simulate(cfg, work / "simulated")
    if with_data:
        give_data(lab, cfg, work)
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
    "split-standard": ("split.cuts=[1, 2, 1]",),  # a cut per client
    "split-ushape-splitcom": ("split.ushape=true", "split.cut=2", "compression.method='splitcom'",
                              "compression.theta=0.5"),
}


SECURE = ("federation.rounds=2", "federation.strategy='fedadam'", "name=secure-deployed")


def _prepare_secure(lab: FlowerLab, tiny_config) -> tuple[Path, Path]:
    """A FedLLM run with SecAgg+ (its twin: the plain simulation); returns (simulated run dir, app dir)."""
    work = lab.root / "secure"
    _simulate(tiny_config(*SECURE), work / "simulated")
    cfg = tiny_config(*SECURE, "runtime.backend='flower'", "deploy.secure_aggregation=true")
    return work / "simulated", write_app(cfg, work / "app", work / "deployed", certificates=lab.creds.ca_cert.parent)


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def _check_secure(deployed: Path, simulated: Path) -> None:
    """SecAgg+ gives the plain simulation's training up to its quantisation (steps of 4e-6), while the server's
    ledger holds only masked uploads."""
    import torch

    got, want = _rows(deployed), _rows(simulated)
    assert [r["round"] for r in got] == [r["round"] for r in want]
    for a, b in zip(got, want):
        assert a["downlink_bytes"] == b["downlink_bytes"]
        assert a["uplink_bytes"] > 1.5 * b["uplink_bytes"] or a["uplink_bytes"] == b["uplink_bytes"] == 0  # int64s
        for key in ("train_loss", "eval_loss"):
            if b.get(key) is not None:
                assert abs(a[key] - b[key]) <= 1e-3 * abs(b[key]), (a["round"], key, a[key], b[key])
    secure, plain = _adapter(deployed), _adapter(simulated)
    assert secure.keys() == plain.keys()
    worst = max(float((secure[k] - plain[k]).abs().max()) for k in secure)
    assert worst < 1e-3, worst  # the same training, quantised
    assert any(not torch.equal(secure[k], plain[k]) for k in secure)
    summary = _summary(deployed)
    assert summary["runtime"]["secure_rounds"] == 2
    assert summary["runtime"]["flower_messages"]["down"] >= 2 * 4 * 3  # 4 SecAgg+ stages per client per round
    comm, plain_comm = summary["comm"], _summary(simulated)["comm"]
    assert (comm["messages"], comm["downlink_bytes"]) == (plain_comm["messages"], plain_comm["downlink_bytes"])
    assert comm["uplink_bytes"] > 1.5 * plain_comm["uplink_bytes"]


def test_fedllm_and_split_deployed_equal_simulated_even_after_the_serverapp_is_killed(lab, tiny_config):
    """Four deployed runs at once on the same SuperNodes (they share the clients' data): FedLLM with the JCPBA
    planner's pruning rates and the clients' optimizer state kept across rounds, whose ServerApp is killed after its first checkpoint and resumed, FedLLM with SecAgg+, split standard
    and U-shape with SplitCom. Each equals its simulated twin (SecAgg+: to its quantisation)."""
    planned = ("network.planner=jcpba", "devices.profiles=['phone', 'jetson', 'laptop']")  # rates per round
    kept = "train.keep_optimizer_state=true"  # each client's AdamW state: its own, kept on its SuperNode
    fed_sim, fed_app = _prepare(lab, tiny_config("federation.rounds=3", *planned, kept, "name=fedllm-deployed"),
                                "fedllm")
    splits = {name: _prepare(lab, tiny_config("paradigm=split", *variant, "federation.rounds=2", f"name={name}"),
                             name, with_data=False) for name, variant in SPLIT_VARIANTS.items()}
    secure_sim, secure_app = _prepare_secure(lab, tiny_config)
    fed_dir = fed_app.parent / "deployed"
    try:
        lab.start_run(secure_app, name="secure-run")
        for name, (_, app) in splits.items():
            lab.start_run(app, name=f"{name}-run")
        lab.start_run(fed_app, name="fedllm-run")
        first = lab.run_id("fedllm-run")
        wait_file(fed_dir / "checkpoints" / "latest", lambda p: True)
        servers = lab.serverapps_holding(fed_dir / ".fedtune.lock")
        assert len(servers) == 1, servers
        servers[0].kill()  # the ServerApp (and with it the run's split server, were it split) dies mid-run
        lab.kill("fedllm-run")
        lab.flwr("stop", str(first), "lab")
        lab.run_app(fed_app, "resume=true", timeout=600)
        for name in [*splits, "secure"]:
            assert lab.processes[f"{name}-run"].wait(timeout=600) == 0, lab.log(f"{name}-run")[-3000:]
    finally:
        for name in [*splits, "fedllm", "secure"]:
            lab.kill(f"{name}-run")
    _check_secure(secure_app.parent / "deployed", secure_sim)
    summary = _check_twin(fed_dir, fed_sim)
    assert any(rate > 0 for row in _rows(fed_dir) for rate in row.get("pruning_rates") or [])
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


def test_kd_deployed_equals_simulated_with_and_without_a_server_model(lab, tiny_config):
    """Two KD runs at once (the same public set and partitions): the server's own adapter evaluated, and the
    largest client's, which that client then sends with each reply (besides the ledger, as in simulation). And a
    secure FedLLM run whose clients refuse to have their adapters clipped: the run stops, saying why."""
    kd = ("paradigm=kd", "kd.public_samples=16", "federation.rounds=2")
    sim, app = _prepare(lab, tiny_config(*kd, "kd.server_model=true", "name=kd-deployed"), "kd")
    client_sim, client_app = _prepare(lab, tiny_config(*kd, "name=kd-client-deployed"), "kd-client",
                                      with_data=False)
    # beside them, a secure FedLLM run whose adapters exceed SecAgg+'s clipping range: refused, never clipped
    clipped = write_app(tiny_config("federation.rounds=1", "runtime.max_retries=0", "name=secure-clipped",
                                    "deploy.secure_aggregation=true", "deploy.secagg_clipping_range=1e-9",
                                    "runtime.backend='flower'"),
                        lab.root / "clipped" / "app", lab.root / "clipped" / "deployed")
    try:
        lab.start_run(client_app, name="kd-client-run")
        lab.start_run(clipped, name="clipped-run")
        lab.run_app(app, timeout=600)
        assert lab.processes["kd-client-run"].wait(timeout=600) == 0, lab.log("kd-client-run")[-3000:]
        lab.processes["clipped-run"].wait(timeout=600)
    finally:
        lab.kill("kd-client-run")
        lab.kill("clipped-run")
    log = " ".join(lab.log("clipped-run").split())  # the console wraps long lines
    assert "secure aggregation failed" in log and "exceeds deploy.secagg_clipping_range" in log, log[-3000:]
    assert not (lab.root / "clipped" / "deployed" / "adapter").exists()
    _check_twin(app.parent / "deployed", sim)
    summary = _check_twin(client_app.parent / "deployed", client_sim)
    assert summary["runtime"]["carried_bytes"]["up"] > summary["comm"]["uplink_bytes"] + _adapter_bytes(client_sim)


def _adapter_bytes(run_dir: Path) -> int:
    return (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
