"""``fedtune compare``: every paradigm (plus centralized and local-only baselines) on one model, data, partition
and seed, optionally swept over config values; interrupted comparisons resume where they stopped.

Each run lives in ``OUT/runs/<paradigm>[,key=value...]`` where the key=value parts are the swept values that can
change that paradigm's result (a ``kd.*`` sweep does not rerun FedLLM). A finished run (it has ``summary.json``) is
reused, a started one resumes from its last checkpoint, one that stopped before its first checkpoint starts over.
``OUT/plan.json`` records what was asked; rerunning with a different plan into the same directory is refused.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from fedtune.config import RunConfig, load_config
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.core.files import atomic_write
from fedtune.paradigms import reads_key

#: Short names accepted by ``--sweep`` for the usual sweep keys.
SWEEP_ALIASES = {"clients": "federation.num_clients", "alpha": "partition.alpha", "rank": "lora.r",
                 "cut": "split.cut", "topk": "kd.topk"}
BASELINES = ("centralized", "local")


@dataclass(frozen=True)
class Sweep:
    key: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Sweep":
        """``key=v1,v2,...`` (key may be an alias from :data:`SWEEP_ALIASES`)."""
        key, sep, values = text.partition("=")
        items = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not key.strip() or not items:
            raise ConfigError(f"--sweep {text!r}: expected KEY=V1,V2,... (keys: a config key or one of "
                              f"{', '.join(sorted(SWEEP_ALIASES))})")
        return cls(SWEEP_ALIASES.get(key.strip(), key.strip()), items)

    def affects(self, paradigm: str) -> bool:
        """Whether the swept key can change ``paradigm``'s result: not when it is in a section or is a key that only
        another paradigm reads (``Paradigm.own_sections``, ``Paradigm.own_keys``)."""
        return reads_key(paradigm, self.key)


@dataclass
class ComparisonPlan:
    config: str
    paradigms: list[str]
    overrides: list[str] = field(default_factory=list)
    sweeps: list[Sweep] = field(default_factory=list)
    baselines: bool = True

    @property
    def all_paradigms(self) -> list[str]:
        extra = [b for b in BASELINES if self.baselines and b not in self.paradigms]
        return list(self.paradigms) + extra

    def cells(self) -> list[dict[str, str]]:
        """One {key: value} per combination of the sweeps' values (one empty cell without sweeps)."""
        keys = [s.key for s in self.sweeps]
        return [dict(zip(keys, combo)) for combo in itertools.product(*(s.values for s in self.sweeps))]

    def relevant(self, paradigm: str, cell: dict[str, str]) -> dict[str, str]:
        """The cell's settings that can change ``paradigm``'s result (the others are not applied to it)."""
        return {k: v for k, v in cell.items() if next(s for s in self.sweeps if s.key == k).affects(paradigm)}

    def run_label(self, paradigm: str, cell: dict[str, str]) -> str:
        return ",".join([paradigm, *(f"{k}={v}" for k, v in self.relevant(paradigm, cell).items())]).replace("/", "_")

    def run_config(self, paradigm: str, cell: dict[str, str]) -> RunConfig:
        sets = [*self.overrides, *(f"{k}={v}" for k, v in self.relevant(paradigm, cell).items()),
                f"paradigm={paradigm}", f"name={self.run_label(paradigm, cell)}"]
        try:
            return load_config(self.config, sets)
        except ConfigError as exc:
            raise ConfigError(f"paradigm {paradigm}{' with ' + str(cell) if cell else ''}: {exc}") from None

    def to_json(self) -> dict:
        return {"config": str(self.config), "config_text": Path(self.config).read_text(), **{
            k: v for k, v in asdict(self).items() if k != "config"}}


def _run_one(cfg: RunConfig, run_dir: Path, console: Console) -> dict:
    """Finished: read its summary; checkpointed: resume; otherwise (re)start from scratch."""
    from fedtune.engine.checkpoint import Checkpointer
    from fedtune.engine.runner import Runner

    summary = run_dir / "summary.json"
    if summary.is_file():
        console.print(f"[dim]reusing finished run {run_dir}[/]")
        return json.loads(summary.read_text())
    resume = Checkpointer(run_dir, keep=cfg.checkpoint.keep).exists()
    if not resume and run_dir.exists():  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    console.print(f"[bold]{'resuming' if resume else 'running'}[/] {cfg.paradigm} -> {run_dir}")
    return Runner(cfg, run_dir, console).run(resume=resume)


def run_comparison(plan: ComparisonPlan, out: Path, console: Console | None = None,
                   target_loss: float | None = None) -> Path:
    """Run (or resume) every paradigm of every cell of ``plan`` into ``out``; write the report; return its path."""
    from fedtune.report.comparison import write_comparison

    console = console or Console(stderr=True)
    out = Path(out)
    wanted = plan.to_json()
    plan_file = out / "plan.json"
    if plan_file.is_file():
        saved = json.loads(plan_file.read_text())
        if saved != json.loads(json.dumps(wanted)):
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != json.loads(json.dumps(wanted)).get(k))
            raise FedtuneError(f"{out} holds a different comparison (differs in: {', '.join(diff)}); "
                               "choose another --out or repeat the same command to resume it")
    configs = {(p, json.dumps(cell)): plan.run_config(p, cell) for cell in plan.cells() for p in plan.all_paradigms}
    out.mkdir(parents=True, exist_ok=True)  # every config is valid: only now touch the disk
    atomic_write(plan_file, json.dumps(wanted, indent=1).encode())
    runs: dict[str, dict[str, Path]] = {}
    for cell in plan.cells():
        key = json.dumps(cell)
        runs[key] = {}
        for paradigm in plan.all_paradigms:
            run_dir = out / "runs" / plan.run_label(paradigm, cell)
            _run_one(configs[(paradigm, key)], run_dir, console)
            runs[key][paradigm] = run_dir
    return write_comparison(out, [(json.loads(k), v) for k, v in runs.items()], target_loss=target_loss,
                            baselines=[b for b in BASELINES if b in plan.all_paradigms and b not in plan.paradigms])
