"""Run directories that never lie: a kill at every point of a checkpoint write resumes bit for bit, a full disk
is a clear error that keeps the last checkpoint, one process per directory, corrupt or edited files are caught or
repaired, and a resume that would change the training is refused before anything is written."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY

from fedtune.cli import main
from fedtune.engine.run_lock import RunLock

FAST = ("federation.rounds=2", "train.local_steps=2", "eval.metric=none", "checkpoint.keep=1",
        "data.max_train_samples=96", "data.max_eval_samples=16")
SETS = [x for kv in FAST for x in ("--set", kv)]
DROP = ("wall_s", "cum_wall_s")

#: Run in a subprocess: patch one function the checkpointer calls so that the process SIGKILLs itself at its
#: nth call (before or after the real call), then run fedtune. Fault injection only: fedtune's code is untouched.
KILLER = """
import os, signal, sys, types
import fedtune.engine.checkpoint as ck
from fedtune.cli import main
name, nth, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
holder = {"rename": "os", "rmtree": "shutil"}.get(name)
module = getattr(ck, holder) if holder else ck
real, calls = getattr(module, name), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out
if holder:
    proxy = types.SimpleNamespace(**{k: getattr(module, k) for k in dir(module) if not k.startswith("__")})
    setattr(proxy, name, dying)
    setattr(ck, holder, proxy)
else:
    setattr(ck, name, dying)
sys.exit(main(sys.argv[4:]))
"""


def _err(capsys) -> str:
    """What the run printed to stderr, with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def _rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in DROP} for r in rows]


def _same_run(a: Path, b: Path) -> None:
    assert _rows(a) == _rows(b)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("initial", "final", "comm", "compute", "clients", "rejected_updates"):
        assert sa[key] == sb[key], key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["run", str(TINY), *SETS, "--out", str(out)]) == 0
    return out


KILL_POINTS = [  # round 1's checkpoint is fsync_write calls 1-2, rename 1, atomic_write 1; round 2's the next ones
    ("fsync_write", 1, "before"),  # before the first checkpoint: an empty temporary directory
    ("fsync_write", 3, "before"),
    ("fsync_write", 3, "after"),  # round 2's state written, its meta not
    ("fsync_write", 4, "after"),  # both written, not renamed into place
    ("rename", 2, "after"),  # in place, `latest` still names round 1
    ("atomic_write", 2, "after"),  # `latest` names round 2, round 1 not pruned yet
    ("rmtree", 1, "before"),  # pruning round 1
]


@pytest.mark.parametrize("name, nth, when", KILL_POINTS)
def test_a_kill_at_any_point_of_a_checkpoint_write_resumes_bit_for_bit(tmp_path, reference, name, nth, when):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, name, str(nth), when, "run", str(TINY), *SETS,
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "summary.json").exists()
    assert main(["run", "--resume", str(out)]) == 0
    assert not list((out / "checkpoints").glob(".tmp-*"))
    _same_run(reference, out)


def _started(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    """Wait until ``proc`` holds the run directory's lock (it wrote its pid there): the run has begun."""
    lock, deadline = out / ".fedtune.lock", time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().strip() == str(proc.pid):
            return
        time.sleep(0.01)


@pytest.mark.parametrize("paradigm", [("paradigm=fedllm",), ("paradigm=split", "split.cut=2"),
                                      ("paradigm=kd", "kd.public_samples=16")])
def test_random_kills_resume_bit_for_bit(tmp_path, paradigm):
    """SIGKILL at random moments (seeded) of a 4-round run; each resume goes on to the uninterrupted result."""
    sets = [x for kv in (*FAST, "federation.rounds=4", *paradigm) for x in ("--set", kv)]
    ref = tmp_path / "reference"
    start = time.perf_counter()
    assert main(["run", str(TINY), *sets, "--out", str(ref)]) == 0
    span = time.perf_counter() - start
    rng, out = random.Random(sum(map(ord, paradigm[0]))), tmp_path / "killed"

    def command() -> list[str]:
        started = (out / "config.toml").exists()
        return ["--resume", str(out)] if started else [str(TINY), *sets, "--out", str(out)]

    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "fedtune", "run", *command()], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            _started(proc, out)
            time.sleep(rng.uniform(0.0, span))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        if (out / "summary.json").exists():
            break
    if not (out / "summary.json").exists():
        assert main(["run", *command()]) == 0
    _same_run(ref, out)


def test_a_full_disk_is_a_clear_error_that_keeps_the_last_checkpoint(tmp_path, reference, monkeypatch, capsys):
    import fedtune.engine.checkpoint as ck

    real, calls = ck.fsync_write, []

    def full(path, data):
        calls.append(path)
        if len(calls) == 3:  # round 2's state file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(ck, "fsync_write", full)
    out = tmp_path / "full"
    assert main(["run", str(TINY), *SETS, "--out", str(out)]) == 2
    err = _err(capsys)
    assert "cannot write the checkpoint of round 2" in err and "No space left on device" in err
    assert "round-000001 is intact" in err and "Traceback" not in err
    assert not list((out / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ck, "fsync_write", real)
    assert main(["run", "--resume", str(out)]) == 0
    _same_run(reference, out)


def test_one_process_per_run_directory(tmp_path, reference, capsys):
    out = tmp_path / "busy"
    with RunLock(out):  # another process's lock (flock conflicts between open files, in one process too)
        assert main(["run", str(TINY), *SETS, "--out", str(out)]) == 2
        assert "is in use by another fedtune process" in _err(capsys)
        other = _copy(reference, tmp_path / "other")
        assert main(["run", "--resume", str(other)]) == 0  # other directories are free
        with RunLock(other):
            assert main(["run", "--resume", str(other)]) == 2
    assert not (out / "metrics.jsonl").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fedtune.engine.run_lock import RunLock\n"
                               f"with RunLock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", str(TINY), *SETS, "--out", str(out)]) == 2
        assert f"pid {holder.pid}" in _err(capsys)
    finally:
        holder.kill()
        holder.wait(timeout=30)


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def _stop_after_round_one(tmp_path: Path) -> Path:
    out = tmp_path / "partial"
    assert main(["run", str(TINY), *SETS, "--set", "federation.rounds=1", "--out", str(out)]) == 0
    (out / "summary.json").unlink()
    return out


def test_an_edited_meta_file_is_refused(tmp_path, capsys):
    out = _stop_after_round_one(tmp_path)
    meta = out / "checkpoints" / "round-000001" / "meta.json"
    meta.write_text(meta.read_text().replace('"round": 1', '"round": 2'))
    assert main(["run", "--resume", str(out), "--set", "federation.rounds=2"]) == 2
    assert "meta.json does not match its checksum" in _err(capsys)


@pytest.mark.parametrize("damage", ["delete", "partial", "edit"])
def test_metrics_are_repaired_from_the_checkpoint(tmp_path, reference, capsys, damage):
    out = _stop_after_round_one(tmp_path)
    metrics = out / "metrics.jsonl"
    if damage == "delete":
        metrics.unlink()
    elif damage == "partial":
        metrics.write_text(metrics.read_text() + '{"round": 2, "eval_lo')
    else:
        metrics.write_text(metrics.read_text().replace('"round": 0,', '"round": 0, "edited": 1,'))
    assert main(["run", "--resume", str(out), "--set", "federation.rounds=2"]) == 0
    err = _err(capsys)
    if damage != "partial":  # a partial line past the checkpoint is the expected trace of a kill
        assert "metrics.jsonl" in err and "rewritten from the checkpoint" in err
    _same_run(reference, out)


def test_a_refused_resume_writes_nothing_and_fewer_rounds_are_refused(tmp_path, reference, capsys):
    out = _copy(reference, tmp_path / "run")
    config = (out / "config.toml").read_bytes()
    assert main(["run", "--resume", str(out), "--set", "train.lr=1e-3"]) == 2
    assert "differing keys: train.lr" in _err(capsys)
    assert (out / "config.toml").read_bytes() == config
    assert main(["run", "--resume", str(out), "--set", "federation.rounds=1"]) == 2
    assert "has trained 2 rounds; federation.rounds = 1" in _err(capsys)
    assert (out / "config.toml").read_bytes() == config
    # A key only other paradigms read (split's compression, KD's kd) does not change a FedLLM run: it resumes.
    assert main(["run", "--resume", str(out), "--set", "compression.theta=0.5", "--set", "kd.topk=3"]) == 0


def test_the_fingerprint_holds_the_keys_the_paradigm_reads():
    from fedtune.config import load_config
    from fedtune.engine.runner import training_fingerprint

    def digest(*sets):
        return training_fingerprint(load_config(TINY, list(sets)))[0]
    fedllm = digest()
    assert digest("compression.theta=0.5", "kd.topk=3", "split.cut=1") == fedllm
    assert digest("train.lr=1e-3") != fedllm and digest("federation.strategy=fedadam") != fedllm
    split = digest("paradigm=split")
    assert digest("paradigm=split", "compression.theta=0.5") != split
    assert digest("paradigm=split", "federation.strategy=fedadam") == split  # a FedLLM-only key


def test_without_latest_the_newest_valid_round_is_resumed(tmp_path, reference, capsys):
    out = _stop_after_round_one(tmp_path)
    (out / "checkpoints" / "latest").unlink()
    (out / "checkpoints" / ".tmp-round-000002-99").mkdir()  # what a crash mid-save leaves
    assert main(["run", "--resume", str(out), "--set", "federation.rounds=2"]) == 0
    err = _err(capsys)
    assert "checkpoints/latest is missing: resuming from round-000001" in err
    assert "removed .tmp-round-000002-99" in err
    _same_run(reference, out)


def test_the_adapter_config_lists_modules_in_order(reference):
    config = json.loads((reference / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(config["target_modules"])


def test_rounds_without_an_accepted_update_stop_the_run(tmp_path, capsys):
    """Every client out of reach of a 1 ms deadline: after federation.stop_after_rejected_rounds rounds the run
    stops with an error and its checkpoint, instead of reporting an untrained model."""
    out = tmp_path / "rejected"
    sets = [*SETS, "--set", "federation.rounds=5", "--set", "network.planner=equal", "--set",
            "network.deadline_s=0.001", "--set", "federation.stop_after_rejected_rounds=2"]
    assert main(["run", str(TINY), *sets, "--out", str(out)]) == 2
    err = _err(capsys)
    assert "every client's update was rejected in the last 2 rounds" in err and "out_of_reach" in err
    assert not (out / "summary.json").exists()
    assert (out / "checkpoints" / "latest").read_text() == "round-000002"


def test_a_resume_that_changes_what_floats_depend_on_says_so(tmp_path, capsys):
    out = _stop_after_round_one(tmp_path)
    saved = json.loads((out / "checkpoints" / "round-000001" / "meta.json").read_text())["runtime"]
    threads = saved["threads"] + 1
    try:
        assert main(["run", "--resume", str(out), "--set", "federation.rounds=2", "--set",
                     f"runtime.threads={threads}"]) == 0
    finally:  # the run set torch's threads for this process: later tests compare runs made with the default
        torch.set_num_threads(saved["threads"])
    assert f"runtime.threads {saved['threads']} -> {threads}" in _err(capsys)
