"""Ray backend: same results as in-process (FedLLM, KD, standard and U-shape split, with SplitCom too), lost client
turns (killed / frozen workers), the quorum stop and its resume, a lost split server and its resume (with SplitCom:
exact), and a two-node loopback cluster with token authentication.

Ray talks to loopback only: the single-node instance runs on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), the
cluster test starts a head on 127.0.0.2 and a worker node on 127.0.0.3 itself and stops them by process id.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

# `make test` runs these on their own after the rest of the suite: a split round trip goes driver -> worker ->
# driver per batch, and with other tests competing for the cores each hop waits for a time slice (3-5x slower).
pytestmark = pytest.mark.ray

from fedtune.comm.messages import encode  # noqa: E402
from fedtune.config import load_config  # noqa: E402
from fedtune.core.errors import ClientQuorumError, ConfigError, ServerLostError  # noqa: E402
from fedtune.engine.checkpoint import Checkpointer  # noqa: E402
from fedtune.engine.runner import Runner  # noqa: E402
from fedtune.runtime.ray_backend import RayBackend  # noqa: E402
from fedtune.runtime.ray_pool import release_parked  # noqa: E402
from fedtune.training.streams import SampleStream  # noqa: E402

FAST = ("runtime.progress=false", "eval.metric=none", "federation.rounds=2", "train.local_steps=4")
RAY = ("runtime.backend=ray", "runtime.workers=2")
KD = ("paradigm=kd", "kd.public_samples=16", "kd.distill_steps=1")
SPLIT = ("paradigm=split", "split.cut=2", "train.local_steps=3")
COMPARED = ("round", "train_loss", "eval_loss", "uplink_bytes", "downlink_bytes", "cum_uplink_bytes",
            "cum_downlink_bytes", "client_flops", "clients")
# SplitCom with reuse from the second round on (most clients start a second epoch of their data there)
SPLITCOM = (*SPLIT, "data.max_train_samples=72", "compression.method=splitcom")
USHAPE = ("split.ushape=true", "split.server_adapter=per_client")
DDPG_INT8 = ("compression.controller=ddpg", "compression.theta_min=0.5", "compression.theta_max=0.9",
             "compression.codec=int8", "compression.residual=true")
# configs/splitcom-ushape.toml's stages beyond reuse: the gradients sent every step with error feedback (the tail
# gradients' state on the client, the cut gradients' on the server), zstd frames, coded LoRA downloads and uploads
STACK = ("compression.resend_budget=0.05", "compression.entropy=zstd", "compression.adapter_codec=int4", "compression.adapter_download_codec=int8",
         "compression.per_interface={tail_gradients={reuse=false,codec='topk-int2',error_feedback=true},"
         "gradients={reuse=false,codec='int2',error_feedback=true}}")


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One single-node Ray instance on 127.0.0.1 with token authentication, shared by this module's runs."""
    token = tmp_path_factory.mktemp("ray-auth") / "token"
    token.write_text(secrets.token_hex(32))
    with pytest.MonkeyPatch.context() as mp:
        # Single-machine mode, or Ray rewrites 127.0.0.1 to the outward address. Ray reads the variable at import
        # (already done here), so the constant is set too; Ray's own processes read the environment.
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr("ray._private.ray_constants.ENABLE_RAY_CLUSTER", False)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
        from ray._raylet import Config

        Config.initialize("")  # ray was imported before the variables were set: re-read them
        ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level="warning")
        try:
            yield ray
        finally:
            release_parked()
            ray.shutdown()
            Config.initialize("")


def _run(out: Path, *overrides: str, resume: bool = False) -> dict:
    cfg = load_config(TINY, [*FAST, *overrides])
    return Runner(cfg, out).run(resume=resume)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_close(a, b, where: str) -> None:
    """``b`` equals ``a``: floats to 1e-5, anything else exactly, through dicts and lists."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
        assert b == a, where


def _assert_same_run(a: Path, b: Path, compared: tuple[str, ...] = COMPARED) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb)
    for ra, rb in zip(ma, mb):
        for key in compared:
            _assert_close(ra.get(key), rb.get(key), f"round {ra['round']}: {key}")
    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-4, atol=1e-6)


def test_ray_backend_config_errors():
    with pytest.raises(ConfigError, match="runtime.backend"):
        load_config(TINY, ["runtime.backend=dask"])
    with pytest.raises(ConfigError, match="min_clients"):
        load_config(TINY, ["federation.min_clients=4"])  # 3 clients sampled
    with pytest.raises(ConfigError, match="cpus_per_client"):
        load_config(TINY, ["runtime.cpus_per_client=0"])


def test_lost_turns_are_recorded_and_clients_rejoin(ray_local, tmp_path, monkeypatch):
    """Round 1: client 1's worker is killed mid-call. Round 2: client 2's worker freezes (SIGSTOP) and times out;
    client 1 trains again. Both rounds complete with the clients that replied."""
    frozen = []

    def inject(backend, job, worker):
        if (job.round, job.client) == (1, 1):
            ray.kill(worker.actor, no_restart=True)
        elif (job.round, job.client) == (2, 2):
            os.kill(worker.info["pid"], signal.SIGSTOP)
            frozen.append(worker.info["pid"])

    monkeypatch.setattr(RayBackend, "on_dispatch", inject)
    out = tmp_path / "faults"
    try:
        summary = _run(out, *RAY, "runtime.client_timeout_s=10")
    finally:
        for pid in frozen:  # the backend killed it on timeout; make sure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    lines = _metrics(out)
    assert [(r["client"], r["lost"]) for r in lines[1]["rejected"]] == [(1, True)]
    assert "worker died" in lines[1]["rejected"][0]["reason"]
    assert [(r["client"], r["lost"]) for r in lines[2]["rejected"]] == [(2, True)]
    assert "timed out" in lines[2]["rejected"][0]["reason"]
    assert all(r["eval_loss"] is not None for r in lines)
    clients = {c["id"]: c for c in summary["clients"]}
    assert clients[0]["rounds_trained"] == 2
    assert clients[1]["rounds_trained"] == 1 and clients[1]["rejected_updates"] == 1  # rejoined in round 2
    assert clients[2]["rounds_trained"] == 1 and clients[2]["rejected_updates"] == 1
    assert summary["runtime"]["lost_client_turns"] == 2
    # a lost turn costs its download only (it was sent); no upload arrived
    assert lines[1]["uplink_bytes"] < lines[1]["downlink_bytes"]
    assert all(r["retransmitted_bytes"] == 0 for r in lines)  # min_clients = 1: nothing retried, nothing resent


@pytest.mark.parametrize("paradigm", ["fedllm", "split"])
def test_a_retried_lost_turn_is_recorded_and_its_repeated_download_marked(ray_local, tmp_path, monkeypatch,
                                                                          paradigm):
    """min_clients = 3 (every client sampled) and max_retries = 1: client 1's worker is killed once in round 1, so
    its turn (split: its session) is retried and replies. Round 1's rejected list has it with "retried": true, it is
    not a rejected update, and the download its retry sent again is marked: retransmitted_bytes is its size."""
    repeated: list[int] = []

    def kill_once(backend, job, worker):
        if (job.round, job.client) == (1, 1) and not repeated:
            repeated.append(len(encode(job.download)))  # what the transport recorded for it
            ray.kill(worker.actor, no_restart=True)

    monkeypatch.setattr(RayBackend, "on_dispatch", kill_once)
    out = tmp_path / paradigm
    summary = _run(out, *(SPLIT if paradigm == "split" else ()), *RAY, "federation.min_clients=3",
                   "runtime.max_retries=1")
    lines = _metrics(out)
    size = repeated[0]
    [entry] = lines[1]["rejected"]
    assert (entry["client"], entry["lost"], entry["retried"]) == (1, True, True)
    assert "worker died" in entry["reason"]
    assert not lines[2]["rejected"]
    assert [(r["retransmitted_bytes"], r["cum_retransmitted_bytes"]) for r in lines] == [(0, 0), (size, size),
                                                                                         (0, size)]
    assert summary["comm"]["retransmitted_bytes"] == size > 0
    # the retried turn's update arrived: no rejected update, every client trained in both rounds
    assert {c["id"]: (c["rounds_trained"], c["rejected_updates"]) for c in summary["clients"]} == \
        {0: (2, 0), 1: (2, 0), 2: (2, 0)}
    assert summary["rejected_updates"] == 0
    assert summary["runtime"]["lost_client_turns"] == 1
    if paradigm == "fedllm":  # the same adapter goes to every client: client 1 got one more
        clients = {c["id"]: c for c in summary["clients"]}
        assert clients[1]["downlink_bytes"] - clients[0]["downlink_bytes"] == size
        assert lines[1]["downlink_bytes"] == 4 * size and summary["runtime"]["retries"] == 1


def test_too_few_replies_stop_with_checkpoint_and_resume(ray_local, tmp_path, monkeypatch):
    """min_clients = 3 and client 1's worker dies on every attempt of round 2: the run stops with a clear error and
    a checkpoint of round 1 (although checkpoint.every = 2); resuming reaches the uninterrupted in-process result.
    (Round 1 before the fault and round 2 after the resume ran on Ray undisturbed: FedLLM on Ray equals in-process.)"""
    attempts = []

    def kill(backend, job, worker):
        if (job.round, job.client) == (2, 1):
            attempts.append(job.round)
            ray.kill(worker.actor, no_restart=True)

    monkeypatch.setattr(RayBackend, "on_dispatch", kill)
    out = tmp_path / "quorum"
    args = (*RAY, "federation.min_clients=3", "runtime.max_retries=1", "checkpoint.every=2")
    with pytest.raises(ClientQuorumError, match=r"round 2: only 2 of 3 clients replied.*min_clients = 3.*--resume"):
        _run(out, *args)
    assert len(attempts) == 2  # the first try and one retry
    assert (out / "checkpoints" / "latest").read_text() == "round-000001"
    assert [r["round"] for r in _metrics(out)] == [0, 1]
    assert not (out / "summary.json").exists()

    monkeypatch.setattr(RayBackend, "on_dispatch", None)
    summary = _run(out, *args, resume=True)
    _run(tmp_path / "inprocess")
    _assert_same_run(tmp_path / "inprocess", out)
    assert summary["runtime"]["backend"] == "ray" and summary["runtime"]["workers"] == 2
    assert summary["runtime"]["nodes"] == ["127.0.0.1"]
    assert all(not r["rejected"] for r in _metrics(out))


@pytest.fixture(scope="module")
def split_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("inprocess") / "split"
    _run(out, *SPLIT)
    return out


@pytest.mark.parametrize("shape", ["standard", "ushape"])
def test_split_on_ray_equals_inprocess(ray_local, split_reference, tmp_path, shape):
    """A client worker and the server's worker exchange activations and gradients through the driver's transport."""
    extra = ("split.ushape=true", "split.server_adapter=per_client") if shape == "ushape" else ()
    reference = split_reference
    if extra:
        reference = tmp_path / "inprocess"
        _run(reference, *SPLIT, *extra)
    summary = _run(tmp_path / "ray", *SPLIT, *extra, *RAY)
    _assert_same_run(reference, tmp_path / "ray")
    expected = json.loads((reference / "summary.json").read_text())
    for key in ("activation_uplink_bytes", "gradient_downlink_bytes", "body_output_downlink_bytes", "adapter_bytes"):
        assert summary["comm"][key] == expected["comm"][key], key
    for key, value in expected["memory"].items():  # each side measured in its own worker's process
        assert summary["memory"][key] == pytest.approx(value, rel=1e-3), key
    assert summary["compression"]["activations"]["upload_ratio_per_epoch"] == \
        expected["compression"]["activations"]["upload_ratio_per_epoch"]


def test_split_lost_client_worker_and_lost_server_worker(ray_local, tmp_path, monkeypatch):
    """Round 1: a client worker killed mid-session loses that session only (min_clients = 1). Round 2: the server's
    worker killed mid-round stops the run at the checkpoint of round 1 (although checkpoint.every = 2, so written
    at the stop); resuming finishes the run, and the lost client trained in round 2."""
    def kill(backend, job, worker):
        if (job.round, job.client) == (1, 1):
            ray.kill(worker.actor, no_restart=True)
        if (job.round, job.client) == (2, 1):
            ray.kill(backend.pool.server.actor, no_restart=True)

    monkeypatch.setattr(RayBackend, "on_dispatch", kill)
    out = tmp_path / "split"
    args = (*SPLIT, *RAY, "checkpoint.every=2")
    with pytest.raises(ServerLostError, match=r"round 2: the split server's Ray worker is lost.*--resume"):
        _run(out, *args)
    assert (out / "checkpoints" / "latest").read_text() == "round-000001"
    lines = _metrics(out)
    assert [r["round"] for r in lines] == [0, 1]
    assert [(r["client"], r["lost"]) for r in lines[1]["rejected"]] == [(1, True)]
    assert "worker died" in lines[1]["rejected"][0]["reason"]
    # the checkpoint holds the state after round 1 only: client 0's finished round-2 session was not applied
    state, _ = Checkpointer(out).load_latest()
    sizes = [c["num_samples"] for c in json.loads((out / "partition.json").read_text())["clients"]]
    expected = []
    for cid, size in enumerate(sizes):
        stream = SampleStream(list(range(size)), 0, cid)
        if cid != 1:  # 3 steps x 8 samples in round 1
            stream.take(24)
        expected.append(stream.state_dict())
    assert state["paradigm"]["streams"] == expected

    monkeypatch.setattr(RayBackend, "on_dispatch", None)
    summary = _run(out, *args, resume=True)
    lines = _metrics(out)
    assert [r["round"] for r in lines] == [0, 1, 2] and not lines[2]["rejected"]
    assert {c["id"]: c["rounds_trained"] for c in summary["clients"]} == {0: 2, 1: 1, 2: 2}
    assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]


def _assert_same_splitcom_run(a: Path, b: Path) -> None:
    """Metrics (with each round's thresholds and upload ratios), adapters, and the summaries' byte counts,
    reductions, upload ratios and threshold trajectories per interface."""
    _assert_same_run(a, b, (*COMPARED, "thresholds", "upload_ratio_round", "upload_ratio_cumulative"))
    sa, sb = (json.loads((out / "summary.json").read_text()) for out in (a, b))
    _assert_close(sa["comm"], sb["comm"], "comm")
    _assert_close(sa["compression"], sb["compression"], "compression")


def test_splitcom_on_ray_equals_inprocess(ray_local, tmp_path):
    """Standard split with the fixed controller and a receiver cache that spills to the worker's disk (U-shape with
    DDPG, int8 and residuals: the lost-server test below). The client's caches travel with its sessions, the
    server's stay on its worker, the thresholds come from the driver."""
    args, reference = (*SPLITCOM, "compression.theta=0.9", "compression.cache_budget_mb=0.01"), tmp_path / "ref"
    _run(reference, *args)
    summary = _run(tmp_path / "ray", *args, *RAY)
    _assert_same_splitcom_run(reference, tmp_path / "ray")
    assert all(c["upload_ratio"] < 1.0 for c in summary["compression"].values() if c["reuse"])  # samples reused


def test_splitcom_on_ray_resumes_exactly_after_a_lost_server(ray_local, tmp_path, monkeypatch):
    """U-shape SplitCom with DDPG and int8 residuals on the activations and body outputs, the gradients int2 and
    topk-int2 with error feedback, zstd frames and coded adapters. The server's worker dies in round 2:
    the run stops at a checkpoint of round 1 written then (checkpoint.every = 2), with every cache as of round 1 and
    the DDPG controllers rolled back; the resumed run loads the server's caches into a new server worker and ends
    as the uninterrupted in-process run (round 1 before the fault and round 2 after ran on Ray undisturbed)."""
    def kill_server(backend, job, worker):
        if (job.round, job.client) == (2, 1):
            ray.kill(backend.pool.server.actor, no_restart=True)

    monkeypatch.setattr(RayBackend, "on_dispatch", kill_server)
    out = tmp_path / "splitcom"
    args = (*SPLITCOM, *USHAPE, *DDPG_INT8, *STACK, *RAY, "checkpoint.every=2")
    with pytest.raises(ServerLostError, match="round 2"):
        _run(out, *args)
    assert (out / "checkpoints" / "latest").read_text() == "round-000001"
    monkeypatch.setattr(RayBackend, "on_dispatch", None)
    summary = _run(out, *args, resume=True)
    _run(tmp_path / "inprocess", *SPLITCOM, *USHAPE, *DDPG_INT8, *STACK)
    _assert_same_splitcom_run(tmp_path / "inprocess", out)
    assert all(c["upload_ratio"] < 1.0 for c in summary["compression"].values() if c["reuse"])  # samples reused


def test_client_state_of_scaffold_and_kept_optimizers_on_ray_equals_inprocess(ray_local, tmp_path):
    """Each client's own state (its AdamW moments, SCAFFOLD's c_i) travels to whichever worker runs its turn."""
    args = ("federation.rounds=3", "federation.strategy=scaffold", "train.keep_optimizer_state=true")
    _run(tmp_path / "inprocess", *args)
    _run(tmp_path / "ray", *args, *RAY)
    _assert_same_run(tmp_path / "inprocess", tmp_path / "ray")


def test_kd_on_ray_equals_inprocess(ray_local, tmp_path):
    _run(tmp_path / "inprocess", *KD)
    _run(tmp_path / "ray", *KD, *RAY)
    _assert_same_run(tmp_path / "inprocess", tmp_path / "ray")
    a, b = _metrics(tmp_path / "inprocess")[-1], _metrics(tmp_path / "ray")[-1]
    assert b["client_eval_loss"] == pytest.approx(a["client_eval_loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# A two-node cluster on one host: head on 127.0.0.2, worker node on 127.0.0.3, token authentication.

def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cluster_skip_reason() -> str | None:
    if os.environ.get("FEDTUNE_SKIP_RAY_CLUSTER"):
        return "FEDTUNE_SKIP_RAY_CLUSTER is set"
    for host in ("127.0.0.2", "127.0.0.3"):
        try:
            _free_port(host)
        except OSError as exc:
            return f"cannot bind {host}: {exc}"
    return None


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    ray_cli = Path(sys.executable).with_name("ray")
    with open(log, "wb") as fh:
        return subprocess.Popen([str(ray_cli), "start", *args, "--block", "--disable-usage-stats"], env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` we started, by process id (never `ray stop`): SIGTERM to it (it then stops the
    node's processes), then SIGKILL to whatever is left of the process group it leads."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _wait_for(condition, timeout: float, what: str, procs=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        for p in procs:
            assert p.poll() is None, f"{what}: a ray start process exited with {p.returncode}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(_cluster_skip_reason() is not None, reason=f"two-node loopback Ray cluster test skipped: "
                    f"{_cluster_skip_reason()}")
def test_two_node_loopback_cluster_with_token_auth(tmp_path):
    work = Path(tempfile.mkdtemp(prefix="ftray", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = work / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    port = _free_port("127.0.0.2")
    address = f"127.0.0.2:{port}"
    procs, refused = [], None
    try:
        procs.append(_ray_start(["--head", "--node-ip-address", "127.0.0.2", "--port", str(port), "--num-cpus", "1",
                                 "--include-dashboard=false", "--temp-dir", str(work / "head")], env, work / "head.log"))
        _wait_for(lambda: "Ray runtime started" in (work / "head.log").read_text(), 90, "the head node", procs)
        procs.append(_ray_start(["--address", address, "--node-ip-address", "127.0.0.3", "--num-cpus", "1",
                                 "--temp-dir", str(work / "worker")], env, work / "worker.log"))

        # meanwhile (it takes ~20 s to give up): the cluster refuses a driver without its token
        wrong = work / "wrong-token"
        wrong.write_text(secrets.token_hex(32))
        probe = "import ray; ray.init(address='%s', log_to_driver=False)" % address
        with open(work / "probe.log", "wb") as fh:
            refused = subprocess.Popen([sys.executable, "-c", probe], env={**env, "RAY_AUTH_TOKEN_PATH": str(wrong)},
                                       stdout=fh, stderr=subprocess.STDOUT)
        _wait_for(lambda: "Ray runtime started" in (work / "worker.log").read_text(), 90, "the worker node", procs)

        # fedtune connects by address with the token file from its config (no RAY_AUTH_* in its environment)
        driver_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        out = tmp_path / "cluster"
        done = subprocess.run(
            [sys.executable, "-m", "fedtune", "run", str(TINY), *[a for o in FAST for a in ("--set", o)],
             "--set", "federation.rounds=1",
             "--set", "runtime.backend=ray", "--set", f"runtime.address={address}",
             "--set", f"runtime.auth_token_path={token}", "--set", "runtime.workers=2", "--out", str(out)],
            env=driver_env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["runtime"]["nodes"] == ["127.0.0.2", "127.0.0.3"]  # one worker actor on each node
        assert summary["final"]["eval_loss"] < summary["initial"]["eval_loss"]

        refused.wait(timeout=120)
        said = (work / "probe.log").read_text()
        assert refused.returncode != 0 and ("Failed to connect" in said or "uthentication" in said)
    finally:
        if refused is not None and refused.poll() is None:
            refused.kill()
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)
