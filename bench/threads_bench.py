"""Seconds of one FedLLM round of configs/tiny.toml by torch thread count and OpenMP wait policy, alone and with a
competing process on the same cores.

OpenMP threads that finish a parallel region spin (by default for a while) waiting for the next one; when another
process needs the cores, spinning threads starve it and each other. fedtune's command line sets
``OMP_WAIT_POLICY=PASSIVE`` unless it is set already (so do its Ray workers): this bench measures why.

    python bench/threads_bench.py [--rounds 2] [--out bench/out/threads]

Each cell runs ``fedtune run`` in a fresh process (the wait policy is read when torch starts) and reports the mean
wall seconds of its training rounds (metrics.jsonl ``wall_s``, round 0's evaluation left out). "busy" runs a second,
identical fedtune run (2 threads, OpenMP's default policy) beside it the whole time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


#: How idle OpenMP threads wait, as environment settings (libgomp: spin GOMP_SPINCOUNT times, then sleep).
#: OMP_WAIT_POLICY "" is no policy to OpenMP (its own default) and keeps fedtune's own default off.
POLICIES = {
    "OpenMP default": {"OMP_WAIT_POLICY": ""},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=10000": {"OMP_WAIT_POLICY": "", "GOMP_SPINCOUNT": "10000"},
}


def _env(policy: str, cache: Path) -> dict[str, str]:
    drop = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(FEDTUNE_CACHE=str(cache), HF_HUB_OFFLINE="1", **POLICIES[policy])
    return env


EXTRA: list[str] = []  # --set overrides for every run (e.g. a wider model)


def _command(out: Path, threads: int, rounds: int) -> list[str]:
    sets = [f"runtime.threads={threads}", f"federation.rounds={rounds}", "eval.metric=none", "runtime.progress=false",
            *EXTRA]
    return [sys.executable, "-m", "fedtune", "run", str(TINY), "--out", str(out), *(x for s in sets for x in ("--set", s))]


def _round_seconds(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_s"] for r in rows if r["round"] > 0]
    return sum(walls) / len(walls)


def _competitor(work: Path, cache: Path, rounds: int) -> subprocess.Popen:
    """A second fedtune run that keeps both cores busy (restarted by the caller while a cell runs)."""
    out = work / f"competitor-{len(list(work.glob('competitor-*')))}"
    return subprocess.Popen(_command(out, 2, rounds * 50), env=_env("OpenMP default", cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def measure(rounds: int, work: Path) -> list[dict]:
    cache = work / "cache"
    subprocess.run(_command(work / "warm", 1, 1), env=_env("OpenMP default", cache), check=True, capture_output=True)
    rows = []
    for load, threads, policy in itertools.product(("alone", "busy"), (1, 2), POLICIES):
        out = work / f"{load}-{threads}-{policy.replace('=', '-').replace(' ', '-')}"
        competitor = _competitor(work, cache, rounds) if load == "busy" else None
        try:
            subprocess.run(_command(out, threads, rounds), env=_env(policy, cache), check=True, capture_output=True)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait(timeout=60)
        rows.append({"load": load, "threads": threads, "policy": policy,
                     "round_s": _round_seconds(out)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset of the waiting modes")
    args = parser.parse_args()
    EXTRA.extend(args.set)
    for name in set(POLICIES) - set(args.policies.split(",")):
        del POLICIES[name]
    work = Path(tempfile.mkdtemp(prefix="fedtune-threads-"))
    try:
        rows = measure(args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "threads.json").write_text(json.dumps(rows, indent=1))
    print("| load | threads | waiting | s per round |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['load']} | {r['threads']} | {r['policy']} | {r['round_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
