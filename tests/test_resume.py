"""Kill a run mid-way with SIGKILL, resume it, and reach the same adapter and metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import TINY
from safetensors.torch import load_file

from fedtune.cli import main

ARGS = ["--set", "federation.rounds=5", "--set", "federation.clients_per_round=2",
        "--set", "federation.strategy=fedadam"]
COMPARED = ("round", "train_loss", "eval_loss", "uplink_bytes", "downlink_bytes", "cum_uplink_bytes",
            "client_flops", "clients", "rejected")


def _metrics(path):
    return [{k: r[k] for k in COMPARED} for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    reference = tmp_path / "reference"
    assert main(["run", str(TINY), *ARGS, "--out", str(reference)]) == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedtune", "run", str(TINY), *ARGS, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            metrics = killed / "metrics.jsonl"
            if metrics.exists() and any(json.loads(l)["round"] >= 2 for l in metrics.read_text().splitlines() if l):
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    done = int((killed / "checkpoints" / "latest").read_text().split("-")[1])
    assert 1 <= done < 5

    assert main(["run", "--resume", str(killed)]) == 0
    assert _metrics(killed) == _metrics(reference)
    a = load_file(reference / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    ref_summary = json.loads((reference / "summary.json").read_text())
    res_summary = json.loads((killed / "summary.json").read_text())
    assert res_summary["final"] == ref_summary["final"]
    assert res_summary["comm"] == ref_summary["comm"]
    assert res_summary["compute"] == ref_summary["compute"]


def test_resume_of_a_directory_without_checkpoint_starts_from_round_zero(tmp_path, capsys):
    """A run killed before its first checkpoint leaves its config: --resume starts it over (exactly: all is seeded)."""
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "config.toml").write_text(TINY.read_text())
    (tmp_path / "started" / "metrics.jsonl").write_text('{"round": 0, "eval_lo')  # killed mid-write
    assert main(["run", "--resume", str(tmp_path / "started"), "--set", "federation.rounds=1"]) == 0
    assert "holds no checkpoint yet: starting from round 0" in " ".join(capsys.readouterr().err.split())
    assert [json.loads(x)["round"] for x in (tmp_path / "started" / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    (tmp_path / "empty").mkdir()
    assert main(["run", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no fedtune run (no config.toml)" in " ".join(capsys.readouterr().err.split())