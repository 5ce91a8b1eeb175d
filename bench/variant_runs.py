"""What the split benchmarks share: one run directory per variant, reused when it finished with the same training
configuration, resumed from its checkpoint, otherwise (re)started; an untimed warm-up before the first run."""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig, load_config
from fedtune.core.errors import ConfigError, FedtuneError
from fedtune.engine.checkpoint import Checkpointer
from fedtune.engine.runner import Runner, training_fingerprint

SMOLLM2_LAYERS = 30


@dataclass
class Outcome:
    variant: str
    group: str  # the bench's scenario or split shape
    run_dir: str
    status: str = "ran"  # ran | reused | resumed | failed
    summary: dict[str, Any] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.group}/{self.variant}"


def add_run_arguments(parser: argparse.ArgumentParser, config: str, out: str) -> None:
    """The options every variant bench takes: --config, --set, --fresh, --no-warmup, --out."""
    parser.add_argument("--config", default=config)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override applied to every variant (repeatable)")
    parser.add_argument("--fresh", action="store_true", help="rerun every variant, even with a matching summary")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the short untimed warm-up run before the first variant that trains")
    parser.add_argument("--out", default=out)


#: Overrides of the short untimed warm-up run the benches on configs/compare.toml start with.
SHORT_WARMUP = ["federation.rounds=1", "train.local_steps=1", "data.max_eval_samples=8", "eval.max_new_tokens=4"]


def chosen_variants(parser: argparse.ArgumentParser, listed: str, valid: dict[str, Any]) -> list[str]:
    """The comma-separated ``listed`` variants, or a parser error naming the unknown ones and the valid ones."""
    chosen = [v.strip() for v in listed.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in valid]
    if unknown:
        parser.error(f"unknown variant {', '.join(unknown)}; valid: {', '.join(valid)}")
    return chosen


def parse_variant_args(doc: str, config: str, out: str, valid: dict[str, Any]) -> tuple[argparse.Namespace, list[str]]:
    """The command line of a bench whose only own option is ``--variants`` (default: all of ``valid``): (args, the
    chosen variants)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, config=config, out=out)
    parser.add_argument("--variants", default=",".join(valid), help=f"subset of {','.join(valid)}")
    args = parser.parse_args()
    return args, chosen_variants(parser, args.variants, valid)


def num_layers(cfg: RunConfig) -> int | None:
    """Transformer blocks of the configured model without loading it (None when unknown)."""
    if cfg.model.source == "tiny":
        return cfg.model.tiny.num_layers
    if cfg.model.source == "smollm2":
        return SMOLLM2_LAYERS
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(cfg.model.path, local_files_only=True).num_hidden_layers)
    except Exception:  # noqa: BLE001 - unknown: let the run itself report an impossible cut
        return None


def same_config(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether the run in ``run_dir`` trained with what ``cfg`` would train (keys added to fedtune since it ran
    take their defaults; runtime settings don't count)."""
    path = run_dir / "config.toml"
    if not path.is_file():
        return False
    try:
        return training_fingerprint(load_config(path))[0] == training_fingerprint(cfg)[0]
    except ConfigError:
        return False


def will_run(run_dir: Path, cfg: RunConfig, fresh: bool) -> bool:
    return fresh or not ((run_dir / "summary.json").is_file() and same_config(run_dir, cfg))


def warm_up(config: str, overrides: list[str], warmup: list[str], out: Path) -> None:
    """One short throwaway run (``warmup`` overrides: 1 round, 1 step) so that one-time start-up costs (lazy
    imports, allocator warm-up, file caches) are not charged to the wall time of whichever variant runs first."""
    run_dir = out / "_warmup"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        Runner(load_config(config, [*overrides, *warmup]), run_dir).run()
        print(f"  warm-up run {time.perf_counter() - t0:.1f} s (untimed)", flush=True)
    except Exception as exc:  # noqa: BLE001 - the warm-up is optional
        print(f"  warm-up run failed (ignored): {exc}", flush=True)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_variant(outcome: Outcome, cfg: RunConfig, fresh: bool) -> Outcome:
    """Reuse, resume or run ``outcome.run_dir``; a failure is recorded in the outcome, not raised."""
    run_dir = Path(outcome.run_dir)
    summary_path = run_dir / "summary.json"
    resume = False
    if run_dir.exists() and not fresh and same_config(run_dir, cfg):
        if summary_path.is_file():
            try:
                outcome.summary = json.loads(summary_path.read_text())
                outcome.status = "reused"
                return outcome
            except (OSError, json.JSONDecodeError):
                pass
        elif Checkpointer(run_dir, keep=cfg.checkpoint.keep).exists():
            resume = True
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    print(f"  {'resuming' if resume else 'running'} {outcome.label} -> {run_dir}", flush=True)
    try:
        outcome.summary = Runner(cfg, run_dir).run(resume=resume)
        outcome.status = "resumed" if resume else "ran"
    except FedtuneError as exc:
        outcome.status, outcome.error = "failed", str(exc)
        print(f"  {outcome.label} FAILED: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 - a bug in one variant must not lose the others' results
        outcome.status, outcome.error = "failed", f"unexpected {type(exc).__name__}: {exc}"
        print(f"  {outcome.label} FAILED with an unexpected error (a fedtune bug?):", flush=True)
        traceback.print_exc()
    return outcome


@dataclass
class VariantRunner:
    """Runs variants of ``config`` into ``out/GROUP/VARIANT``; the user's ``sets`` come first, so a variant's own
    overrides always apply. ``warmup``: overrides of the warm-up run before the first variant that trains (None:
    no warm-up)."""

    config: str
    sets: list[str]
    out: Path
    fresh: bool = False
    warmup: list[str] | None = None

    @property
    def base_overrides(self) -> list[str]:
        return [*self.sets, "runtime.progress=false"]

    def run(self, group: str, variant: str, overrides: list[str], notes: list[str]) -> Outcome:
        outcome = Outcome(variant, group, str(self.out / group / variant), notes=list(notes),
                          overrides=[*self.sets, *overrides])
        try:
            cfg = load_config(self.config, [*self.base_overrides, *overrides])
        except FedtuneError as exc:
            outcome.status, outcome.error = "failed", str(exc)
            print(f"  {outcome.label} FAILED (configuration): {exc}", flush=True)
            return outcome
        if self.warmup is not None and will_run(Path(outcome.run_dir), cfg, self.fresh):
            warm_up(self.config, self.base_overrides, self.warmup, self.out)
            self.warmup = None
        return run_variant(outcome, cfg, self.fresh)


def labels_with(outcomes: dict[str, list[Outcome]], status: str) -> list[str]:
    """Labels of the outcomes with ``status`` (e.g. reused, resumed)."""
    return [o.label for group in outcomes.values() for o in group if o.status == status]


def reused_note(outcomes: dict[str, list[Outcome]]) -> list[str]:
    """The markdown lines naming the variants reused from a finished run of the same configuration (none: [])."""
    reused = labels_with(outcomes, "reused")
    return ["", f"reused (a finished run of the same configuration): {', '.join(reused)}"] if reused else []


def publish(out: Path, md: list[str], data: dict[str, Any], started: float) -> None:
    """Print the markdown and the bench's wall time; write ``out/results.md`` and ``out/result.json`` (``data`` plus
    ``bench_s``)."""
    elapsed = time.perf_counter() - started
    text = "\n".join(md)
    print()
    print(text)
    print(f"\nbench total {elapsed:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(text + "\n")
    (out / "result.json").write_text(json.dumps({**data, "bench_s": elapsed}, indent=1, default=str))
