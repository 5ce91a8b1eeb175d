"""Record what a fixed set of tiny runs produce, and check that a later record is identical, bit for bit.

Used around refactors that must not change behaviour: record before the change, record after, compare.

    python tools/behaviour.py record OUT_DIR     # runs every case below into OUT_DIR/runs, writes OUT_DIR/record.json
    python tools/behaviour.py check A B          # per run and part: does B's record differ from A's? (A, B: a
                                                 # directory holding record.json, or a record file; --details)

A record holds, per case, every run's ``metrics.jsonl`` and ``summary.json`` with wall-clock times (and the Ray
backend's node ids and pids) removed, ``partition.json``, the SHA-256 of the saved adapter weights, and for the
comparison its report with the wall column blanked; ``fedtune plan``'s table is recorded as printed. Floats are
compared exactly (JSON keeps every bit of a double).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")

SPLIT = ("paradigm=split", "split.cut=2", "train.local_steps=3")
SPLITCOM = (*SPLIT, "data.max_train_samples=72", "compression.method=splitcom")
DDPG_INT8 = ("compression.controller=ddpg", "compression.theta_min=0.5", "compression.theta_max=0.9",
             "compression.codec=int8", "compression.residual=true")
KD = ("paradigm=kd", "kd.public_samples=16", "kd.distill_steps=1")
RAY = ("runtime.backend=ray", "runtime.workers=2", "eval.metric=none", "federation.rounds=2")

#: name -> ``fedtune run configs/tiny.toml --set ...`` overrides
RUNS: dict[str, tuple[str, ...]] = {
    "fedllm-fedavg": (),
    "fedllm-fedprox": ("federation.strategy=fedprox", "federation.proximal_mu=0.1"),
    "fedllm-fedadam": ("federation.strategy=fedadam",),
    "fedllm-sampled": ("federation.num_clients=4", "federation.clients_per_round=2", "federation.rounds=4"),
    "kd": KD,
    "kd-server-model": (*KD, "kd.server_model=true", "kd.aggregation=confidence", "kd.topk=0"),
    "centralized": ("paradigm=centralized",),
    "local": ("paradigm=local",),
    "split": SPLIT,
    "split-ushape": (*SPLIT, "split.ushape=true", "split.server_adapter=per_client"),
    "split-cut-rank": (*SPLIT, "split.cut_rank=2"),
    "split-adaptive": (*SPLIT, "split.adaptive=true", "split.val_samples=4", "split.gamma=2.0"),
    "split-profiles": (*SPLIT, "split.cut_policy=profiles", "devices.profiles=['phone', 'jetson', 'laptop']"),
    "splitcom-ddpg-int8-residual": (*SPLITCOM, *DDPG_INT8),
    "splitcom-ushape-ddpg-int8-residual": (*SPLITCOM, *DDPG_INT8, "split.ushape=true"),
    "splitcom-bangbang": (*SPLITCOM, "compression.controller=bangbang", "compression.codec=fp16"),
    "pruning-fixed": ("pruning.rates=[0.5, 0.0, 0.3]", "pruning.compensate=true", "pruning.method=fluctuation"),
    "pruning-jcpba": ("network.planner=jcpba", "federation.rounds=2", "devices.profiles=['phone', 'jetson', 'laptop']"),
    "network-equal-deadline": ("network.planner=equal", "network.fading=none", "network.distances_m=[2100, 30, 30]",
                               "network.rho_max=0", "network.deadline_s=1.15", "federation.rounds=2"),
    "ray-fedllm": RAY,
    "ray-kd": (*RAY, *KD),
    "ray-split": (*RAY, *SPLIT, "runtime.workers=1"),  # a private Ray instance has 2 CPUs: 1 client + the server
    "ray-splitcom-ushape": (*RAY, *SPLITCOM, *DDPG_INT8, "split.ushape=true", "split.server_adapter=per_client",
                            "runtime.workers=1"),
}
COMPARE = ("compare", TINY, "--paradigms", "fedllm,kd,split", "--set", "federation.rounds=2",
           "--set", "kd.public_samples=16", "--sweep", "alpha=0.5,5")
PLAN = ("plan", TINY, "--set", "network.planner=jcpba", "--set", "devices.profiles=['phone', 'jetson', 'laptop']",
        "--round", "2")

DROP = {"wall_s", "cum_wall_s", "node_id", "pid", "nodes", "server_node"}


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(FEDTUNE_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONHASHSEED="0",
               COLUMNS="200")
    return env


def _fedtune(args: tuple[str, ...], env: dict[str, str], log: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "fedtune", *args], env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"fedtune {' '.join(args)} failed (exit {proc.returncode}); see {log}")
    return proc.stdout


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in DROP}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _run_record(run_dir: Path) -> dict:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    weights = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    return {"metrics": _strip(lines), "summary": _strip(json.loads((run_dir / "summary.json").read_text())),
            "partition": json.loads((run_dir / "partition.json").read_text()),
            "adapter_sha256": hashlib.sha256(weights).hexdigest()}


def _compare_record(out: Path) -> dict:
    report = (out / "report.md").read_text()
    report = re.sub(r"\b\d+(\.\d+)?\s?(ms|s|min|h)\b", "<time>", report)  # wall (and simulated) seconds
    return {"report": report, "runs": {d.name: _run_record(d) for d in sorted((out / "runs").iterdir())}}


def record(out: Path, jobs: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = _env(out / "cache")
    (out / "logs").mkdir(exist_ok=True)
    if not (out / "warm" / "summary.json").is_file():
        shutil.rmtree(out / "warm", ignore_errors=True)
        _fedtune(("run", TINY, "--out", str(out / "warm"), "--set", "federation.rounds=1"), env, out / "logs" / "warm")

    def one(name: str) -> tuple[str, dict]:
        run_dir = out / "runs" / name
        sets = [x for kv in RUNS[name] for x in ("--set", kv)]
        if not (run_dir / "summary.json").is_file():  # a record interrupted earlier keeps its finished runs
            shutil.rmtree(run_dir, ignore_errors=True)
            _fedtune(("run", TINY, "--out", str(run_dir), *sets), env, out / "logs" / name)
        return name, _run_record(run_dir)

    local = [n for n in RUNS if not n.startswith("ray-")]
    with ThreadPoolExecutor(jobs) as pool:
        results = dict(pool.map(one, local))
    results.update(one(n) for n in RUNS if n.startswith("ray-"))  # alone: each starts its own Ray instance
    _fedtune((*COMPARE, "--out", str(out / "compare")), env, out / "logs" / "compare")  # resumes what it has
    results["compare"] = _compare_record(out / "compare")
    results["plan"] = {"stdout": _fedtune(PLAN, env, out / "logs" / "plan")}
    (out / "record.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    print(f"recorded {len(results)} cases -> {out / 'record.json'}")


def _diff(a, b, where: str, found: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                found.append(f"{where}.{key}: only in {'B' if key not in a else 'A'}")
            else:
                _diff(a[key], b[key], f"{where}.{key}", found)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", found)
    elif a != b or type(a) is not type(b):
        found.append(f"{where}: {str(a)[:120]!r} != {str(b)[:120]!r}")


def _runs(record: dict) -> dict[str, dict]:
    """Every run's record by name (the comparison's runs as compare/NAME), plus the comparison report and the plan."""
    runs = {name: rec for name, rec in record.items() if name not in ("compare", "plan")}
    runs.update({f"compare/{name}": rec for name, rec in record["compare"]["runs"].items()})
    runs["compare report"] = {"report.md": record["compare"]["report"]}
    runs["plan"] = record["plan"]
    return runs


def check(a: Path, b: Path, details: bool) -> int:
    """Print, per run and part (metrics, summary, partition, adapter), whether B differs from A; 1 if any does.
    Keys only B has (fields a later version adds) are listed once, and are not differences."""
    ra, rb = (_runs(json.loads((p / "record.json" if p.is_dir() else p).read_text())) for p in (a, b))
    differing, added = 0, set()
    for name in sorted(set(ra) | set(rb)):
        if name not in ra or name not in rb:
            print(f"{name}: only in {'B' if name not in ra else 'A'}")
            differing += 1
            continue
        for part in sorted(set(ra[name]) | set(rb[name])):
            found: list[str] = []
            _diff(ra[name].get(part), rb[name].get(part), "", found)
            added |= {re.sub(r"\[\d+\]", "[]", f.split(":")[0]) for f in found if f.endswith(": only in B")}
            found = [f for f in found if not f.endswith(": only in B")]
            if found:
                differing += 1
                print(f"{name}: {part} differs ({len(found)} entries)")
                for line in found[:20] if details else []:
                    print(f"    {line}")
    if added:
        print(f"B adds: {', '.join(sorted(added))}")
    print(f"{len(ra)} runs: " + ("identical" if not differing else f"{differing} run parts differ"))
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--jobs", type=int, default=2, help="runs at once (the Ray runs go alone)")
    chk = sub.add_parser("check")
    chk.add_argument("a", type=Path)
    chk.add_argument("b", type=Path)
    chk.add_argument("--details", action="store_true", help="list the differing entries (20 a part at most)")
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.jobs)
        return 0
    return check(args.a, args.b, args.details)


if __name__ == "__main__":
    sys.exit(main())
