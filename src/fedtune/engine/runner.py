"""The round loop: evaluate, train a round, log metrics, checkpoint; then summarise and report."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from fedtune.comm.ledger import DOWN, UP
from fedtune.config import RunConfig
from fedtune.core.errors import CheckpointError, FedtuneError, RoundAbortedError, TrainingError
from fedtune.core.files import atomic_write
from fedtune.core.progress import RunProgress
from fedtune.engine.accounting import Accounting
from fedtune.engine.checkpoint import Checkpointer
from fedtune.engine.context import RunContext, build_context
from fedtune.engine.metrics_log import MetricsLog, json_safe
from fedtune.engine.run_lock import RunLock
from fedtune.models.generation import generate_answer
from fedtune.models.lora import save_adapter
from fedtune.network.simtime import summarise as summarise_network
from fedtune.paradigms import PARADIGMS, Paradigm, RoundResult, reads_key
from fedtune.training.evaluation import EvalResult, evaluate, task_metrics

#: Keys that may differ between a checkpoint and the run resuming it (they don't change the results).
RESUMABLE_CHANGES = ("name", "runtime", "checkpoint", "federation.rounds", "federation.stop_after_rejected_rounds",
                     "privacy.target_epsilon")


_ABSENT = object()


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def training_fingerprint(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """Hash of every config value that affects results (not runtime, checkpointing or total rounds, nor the keys
    only other paradigms read)."""
    flat = {k: v for k, v in _flatten(cfg.model_dump(mode="json")).items()
            if not any(k == p or k.startswith(p + ".") for p in RESUMABLE_CHANGES) and reads_key(cfg.paradigm, k)}
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()
    return digest, flat


class Runner:
    """Runs one configuration into one run directory, resumable from its last checkpoint."""

    def __init__(self, cfg: RunConfig, out_dir: Path, console: Console | None = None,
                 backend_resources: dict | None = None) -> None:
        self.cfg = cfg
        self.backend_resources = backend_resources  # what the backend needs from the hosting process (Flower: grid)
        self.out = Path(out_dir)
        self.console = console or Console(stderr=True)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        self.checkpointer = Checkpointer(self.out, keep=cfg.checkpoint.keep)
        self.accounting = Accounting()

    # -- set-up ------------------------------------------------------------------------------
    def _prepare_dir(self, resume: bool) -> Path | None:
        """Check the run directory (before writing anything) and write the resolved config. Returns the checkpoint
        to resume from (None: start at round 0, also for a resumed run that was stopped before its first one)."""
        folder = None
        if resume:
            folder = self._resumable()
        elif self.checkpointer.exists() or self.metrics.path.exists():
            raise FedtuneError(f"{self.out} already holds a run; resume it with --resume {self.out} "
                               "or choose another --out")
        for stale in self.checkpointer.remove_stale():
            self.console.print(f"[yellow]removed {stale.name}, left in {self.checkpointer.root} by a crash[/]")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / "config.toml", self.cfg.to_toml().encode())
        return folder

    def _resumable(self) -> Path | None:
        """The checkpoint a resume continues from, checked against this configuration; None when the run was
        stopped before its first checkpoint (it starts over: everything derives from the seed, so exactly)."""
        if not self.checkpointer.exists():
            if not (self.out / "config.toml").is_file():
                raise CheckpointError(f"cannot resume {self.out}: it holds no fedtune run (no config.toml)")
            self.console.print(f"[yellow]{self.out} holds no checkpoint yet: starting from round 0[/]")
            self.metrics.path.unlink(missing_ok=True)
            return None
        folder = self.checkpointer.latest_folder()
        if not (self.checkpointer.root / "latest").exists():
            self.console.print(f"[yellow]checkpoints/latest is missing: resuming from {folder.name}[/]")
        meta = self.checkpointer.load_meta(folder)
        digest, flat = training_fingerprint(self.cfg)
        if meta.get("fingerprint") != digest:
            saved = {k: v for k, v in meta.get("config", {}).items() if reads_key(self.cfg.paradigm, k)}
            diff = sorted(k for k in set(saved) | set(flat) if saved.get(k, _ABSENT) != flat.get(k, _ABSENT))
            defaults = _flatten(RunConfig().model_dump(mode="json"))
            added = [k for k in diff if k not in saved and flat[k] == defaults.get(k, _ABSENT)]
            if not diff:  # an older fedtune's fingerprint also covered keys only other paradigms read
                return self._check_rounds(folder, meta)
            if diff == added:  # keys a newer fedtune added, at their defaults: the same training
                self.console.print(f"[yellow]the checkpoint predates the config keys {', '.join(added)}; their "
                                   "defaults reproduce its run[/]")
                return self._check_rounds(folder, meta)
            raise CheckpointError(
                f"checkpoint in {self.out} was written by a different configuration; differing keys: "
                f"{', '.join(diff) or '(unknown: fingerprint mismatch)'}. Only {', '.join(RESUMABLE_CHANGES)} "
                "may change on resume")
        return self._check_rounds(folder, meta)

    def _check_rounds(self, folder: Path, meta: dict) -> Path:
        self._warn_inexact(meta)
        done = int(meta["round"])
        if self.cfg.federation.rounds < done:
            raise CheckpointError(f"{self.out} has trained {done} rounds; federation.rounds = "
                                  f"{self.cfg.federation.rounds} would undo some: give at least {done}")
        return folder

    def _restore(self, folder: Path, paradigm: Paradigm, ctx: RunContext) -> int:
        state, meta = self.checkpointer.load(folder)
        try:
            paradigm.load_state_dict(state["paradigm"])
            ctx.ledger.load_state_dict(state["ledger"])
            self.accounting.load_state_dict(state["accounting"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint in {self.out} does not match this run: {exc}") from None
        done = int(meta["round"])
        self._restore_metrics(state.get("metrics"), done)
        return done

    def _restore_metrics(self, saved: list[dict] | None, done: int) -> None:
        """metrics.jsonl up to round ``done`` as the checkpoint holds it; say what had to be repaired."""
        rows, partial = self.metrics.parse()
        if saved is None:  # a checkpoint written before it held the metrics: keep the file's rows
            self.metrics.truncate(done)
            return
        kept = [r for r in rows if r["round"] <= done]
        problem = ("is missing" if not self.metrics.path.exists() else
                   "ended in a partial line" if partial and len(kept) < len(saved) else
                   "differs from the checkpoint's rows" if kept != saved else None)
        if problem:
            self.console.print(f"[yellow]{self.metrics.path.name} {problem}: rewritten from the checkpoint[/]")
        self.metrics.write(saved)

    def _save(self, round: int, paradigm: Paradigm, ctx: RunContext) -> None:
        digest, flat = training_fingerprint(self.cfg)
        state = {"paradigm": paradigm.state_dict(), "ledger": ctx.ledger.state_dict(),
                 "accounting": self.accounting.state_dict(), "metrics": self.metrics.read()}
        self.checkpointer.save(round, state, {"fingerprint": digest, "config": flat, "paradigm": self.cfg.paradigm,
                                              "runtime": self._exactness()})

    def _exactness(self) -> dict[str, Any]:
        """The runtime settings a run's floating-point results depend on, though its configuration does not."""
        rt = self.cfg.runtime
        default = int(rt.cpus_per_client) if rt.backend == "ray" else torch.get_num_threads()
        return {"backend": rt.backend, "device": rt.device, "threads": rt.threads or max(1, default)}

    def _warn_inexact(self, meta: dict) -> None:
        """A resume that changes what floating-point results depend on is allowed, and said."""
        saved, now = meta.get("runtime") or {}, self._exactness()
        changed = [f"runtime.{k} {saved[k]!r} -> {now[k]!r}" for k in saved if k in now and saved[k] != now[k]]
        if changed:
            self.console.print(f"[yellow]resuming with {', '.join(changed)}: the remaining rounds may differ in the "
                               "last digits from an uninterrupted run (results are bit-identical only with the same "
                               "backend, device and thread count)[/]")

    # -- the loop ----------------------------------------------------------------------------
    def _evaluate(self, paradigm: Paradigm, ctx: RunContext) -> EvalResult:
        paradigm.load_global()
        return evaluate(ctx.model, ctx.eval_samples, batch_size=self.cfg.eval.batch_size,
                        pad_token_id=ctx.pad_token_id, device=ctx.device)

    def _round_record(self, round: int, result: RoundResult | None, ev: EvalResult | None,
                      wall_s: float, ctx: RunContext) -> dict[str, Any]:
        ledger = ctx.ledger
        return {
            "round": round,
            "train_loss": result.train_loss if result else None,
            "eval_loss": ev.loss if ev else None,
            "eval_ppl": ev.ppl if ev else None,
            "uplink_bytes": ledger.bytes(round=round, direction=UP),
            "downlink_bytes": ledger.bytes(round=round, direction=DOWN),
            "cum_uplink_bytes": ledger.bytes(direction=UP),
            "cum_downlink_bytes": ledger.bytes(direction=DOWN),
            # what the same messages would have cost uncompressed (equal to the above without compression)
            "cum_uncompressed_uplink_bytes": ledger.baseline_bytes(direction=UP),
            "cum_uncompressed_downlink_bytes": ledger.baseline_bytes(direction=DOWN),
            "retransmitted_bytes": ledger.retransmitted_bytes(round=round),  # part of the bytes above: sent again
            "cum_retransmitted_bytes": ledger.retransmitted_bytes(),
            "client_flops": sum(result.client_flops.values()) if result else 0,
            "server_flops": result.server_flops if result else 0,
            "wall_s": wall_s,
            "cum_wall_s": self.accounting.wall_s,
            "sim_s": 0.0,
            "clients": result.clients if result else [],
            "rejected": result.rejected if result else [],
            "peak_memory_bytes": max(result.client_peak_memory.values(), default=0) if result else 0,
            **(result.extra if result else {}),
            **(ctx.network.round_record(round, result) if ctx.network is not None and result else {}),
        }

    def run(self, resume: bool = False) -> dict[str, Any]:
        self._ctx: RunContext | None = None
        with RunLock(self.out):
            try:
                return self._run(resume)
            finally:  # release the backend's workers (Ray actors; a Ray instance this run started)
                backend = getattr(self._ctx, "backend", None)
                if backend is not None:
                    backend.close()

    def _run(self, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        folder = self._prepare_dir(resume)
        progress = RunProgress(cfg.runtime.progress, self.console)
        self.stopped: dict[str, Any] | None = None
        ctx = self._ctx = build_context(cfg, progress, self.out, backend_resources=self.backend_resources)
        self._write_partition(ctx)
        paradigm = PARADIGMS.get(cfg.paradigm)(ctx)
        done = self._restore(folder, paradigm, ctx) if folder is not None else 0
        if done == 0:
            t0 = time.perf_counter()
            with progress.phase(f"round 0: the base model's eval loss on {len(ctx.eval_samples)} held-out rows"
                                f"{self._metric_label(ctx)}"):
                initial = self._evaluate(paradigm, ctx)
                record = self._round_record(0, None, initial, time.perf_counter() - t0, ctx)
                self.metrics.append({**record, "task_metrics": task_metrics(ctx)})
        with progress.run(cfg.federation.rounds, done):
            for round in range(done + 1, cfg.federation.rounds + 1):
                reason = paradigm.stop_before(round)
                if reason:
                    self._stop_early(round, reason, paradigm, ctx)
                    break
                ev = self._round(round, paradigm, ctx)
                progress.round_done(f"eval {ev.loss:.4f}" if ev else "")
        return self._finish(paradigm, ctx)

    @staticmethod
    def _metric_label(ctx: RunContext) -> str:
        n = len(ctx.metric_prompts)
        return f", task metric: generating {n} answers" if n and ctx.cfg.eval.metric != "none" else ""

    def _round(self, round: int, paradigm: Paradigm, ctx: RunContext) -> EvalResult | None:
        """Train, evaluate, log and checkpoint one round; stop (at that checkpoint) when it leaves nothing to
        report: a non-finite evaluation, or too many rounds in a row without an accepted update."""
        cfg = self.cfg
        t0 = time.perf_counter()
        try:
            result = paradigm.run_round(round)
        except RoundAbortedError as exc:
            self._stop_at_checkpoint(exc, paradigm, ctx)
        last = round == cfg.federation.rounds
        ev = self._evaluate(paradigm, ctx) if (round % cfg.eval.every == 0 or last) else None
        if ev is not None:
            paradigm.observe_eval(round, ev)
        wall = time.perf_counter() - t0
        self.accounting.add(result, wall)
        self.metrics.append(self._round_record(round, result, ev, wall, ctx))
        failure = self._unreportable(round, result, ev)
        if round % cfg.checkpoint.every == 0 or last or failure:
            self._save(round, paradigm, ctx)
        if failure:
            raise TrainingError(f"{failure}. The run stopped at the checkpoint of round {round} in {self.out}")
        return ev

    def _unreportable(self, round: int, result: RoundResult, ev: EvalResult | None) -> str | None:
        """Why the run cannot go on to a result after ``round`` (None: it can)."""
        if ev is not None and not math.isfinite(ev.loss):
            return (f"round {round}: the evaluated model's eval loss is {ev.loss} (the model diverged); fedtune "
                    "reports no result from it")
        limit, streak = self.cfg.federation.stop_after_rejected_rounds, self.accounting.rejected_streak
        if limit is not None and streak >= limit:
            reasons = sorted({str(item["reason"]) for item in result.rejected if not item.get("retried")})
            return (f"every client's update was rejected in the last {streak} rounds (federation."
                    f"stop_after_rejected_rounds = {limit}; reasons in round {round}: {'; '.join(reasons)})")
        return None

    def _saved_round(self) -> int:
        """The round of the latest checkpoint (-1: none yet)."""
        return int(self.checkpointer.latest_folder().name.split("-")[1]) if self.checkpointer.exists() else -1

    def _stop_early(self, round: int, reason: str, paradigm: Paradigm, ctx: RunContext) -> None:
        """End the run before ``round`` with a result (its checkpoint is that of round - 1: a resume with a larger
        budget continues it)."""
        if self._saved_round() != round - 1:
            self._save(round - 1, paradigm, ctx)
        self.stopped = {"before_round": round, "reason": reason}
        ctx.progress.log(f"[yellow]stopped before round {round}: {reason}")

    def _stop_at_checkpoint(self, exc: RoundAbortedError, paradigm: Paradigm, ctx: RunContext) -> None:
        """A round cannot complete (too few clients replied, the split server was lost): checkpoint the last
        complete round (unless it already is) and stop.

        The failed round left the paradigm's state as it was (replies are applied only once a round completes);
        the bytes of its attempts are dropped like those of a killed run's unfinished round."""
        done = exc.round - 1
        ctx.ledger.drop_after(done)
        if self._saved_round() != done:
            if done == 0:  # nothing trained yet: a resume re-evaluates round 0
                self.metrics.truncate(-1)
            self._save(done, paradigm, ctx)
        raise type(exc)(f"{exc}. The run stopped at the checkpoint of round {done}; continue it with "
                        f"`fedtune run --resume {self.out}`", exc.round) from None

    # -- outputs -----------------------------------------------------------------------------
    def _write_partition(self, ctx: RunContext) -> None:
        from fedtune.data.partition_report import format_partition_table, plot_partition

        atomic_write(self.out / "partition.json", json.dumps(json_safe(ctx.partition_info), indent=1).encode())
        if self.cfg.runtime.plots:
            with ctx.progress.phase("drawing partition.png"):
                plot_partition(ctx.partition_info, self.out / "partition.png")
        if self.cfg.runtime.progress:
            self.console.print(format_partition_table(ctx.partition_info))

    def _finish(self, paradigm: Paradigm, ctx: RunContext) -> dict[str, Any]:
        from fedtune.report.model_card import write_model_card
        from fedtune.report.render import write_report

        progress = ctx.progress
        paradigm.load_global()
        save_adapter(ctx.model, self.out / "adapter")
        with progress.phase(f"final: the sample answer (base and tuned){self._metric_label(ctx)}"):
            tuned = generate_answer(ctx.model, ctx.tokenizer, ctx.sample_prompt, self.cfg.eval.max_new_tokens)
            with ctx.model.disable_adapter():
                base = generate_answer(ctx.model, ctx.tokenizer, ctx.sample_prompt, self.cfg.eval.max_new_tokens)
            summary = self._summary(paradigm, ctx, {"prompt": ctx.sample_prompt, "reference": ctx.sample_reference,
                                                    "base": base, "tuned": tuned})
            summary["final"]["metrics"] = task_metrics(ctx)
        if self.stopped:
            summary["stopped"] = self.stopped
        summary["runtime"] = ctx.backend.info() if ctx.backend is not None else {"backend": self.cfg.runtime.backend}
        atomic_write(self.out / "summary.json", json.dumps(json_safe(summary), indent=1).encode())
        write_model_card(self.cfg, summary, self.out / "adapter")
        with progress.phase("report.md" + (" and eval_loss.png" if self.cfg.runtime.plots else "")):
            write_report(self.out, plots=self.cfg.runtime.plots, redraw_partition=False)  # drawn at the start
        return summary

    def _summary(self, paradigm: Paradigm, ctx: RunContext, sample: dict[str, str]) -> dict[str, Any]:
        records = self.metrics.read()
        evals = [r for r in records if r.get("eval_loss") is not None]
        trains = [r for r in records if r.get("train_loss") is not None]
        ledger, acc = ctx.ledger, self.accounting
        sizes = paradigm.client_sizes()
        clients = [{
            "id": cid, "num_samples": sizes.get(cid, 0),
            "uplink_bytes": ledger.bytes(client=cid, direction=UP),
            "downlink_bytes": ledger.bytes(client=cid, direction=DOWN),
            "flops": acc.client_flops.get(cid, 0), "peak_memory_bytes": acc.client_peak_memory.get(cid, 0),
            "rounds_trained": acc.rounds_trained.get(cid, 0), "rejected_updates": acc.rejected.get(cid, 0),
        } for cid in range(len(ctx.partitions))]
        extra = paradigm.summary_extra()
        for cid, fields in extra.pop("clients", {}).items():
            clients[cid].update(fields)
        params = sum(p.numel() for p in ctx.model.parameters())
        trainable = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        up, down = ledger.bytes(direction=UP), ledger.bytes(direction=DOWN)
        summary = {
            "paradigm": self.cfg.paradigm,
            "name": self.cfg.name,
            "rounds": self.cfg.federation.rounds,
            "seed": self.cfg.seed,
            "initial": {"eval_loss": evals[0]["eval_loss"], "eval_ppl": evals[0]["eval_ppl"],
                        "metrics": records[0].get("task_metrics")},
            "final": {"eval_loss": evals[-1]["eval_loss"], "eval_ppl": evals[-1]["eval_ppl"],
                      "train_loss": trains[-1]["train_loss"] if trains else None},
            "comm": {"uplink_bytes": up, "downlink_bytes": down, "total_bytes": up + down,
                     "messages": ledger.messages(), "retransmitted_bytes": ledger.retransmitted_bytes()},
            "compute": {"client_flops": sum(acc.client_flops.values()), "server_flops": acc.server_flops},
            "memory": {"client_peak_bytes": max(acc.client_peak_memory.values(), default=0),
                       "server_peak_bytes": acc.server_peak_memory},
            "time": {"wall_s": acc.wall_s, "simulated_s": sum(r.get("sim_s") or 0.0 for r in records)},
            "clients": clients,
            "eval": {"rows": len(ctx.eval_samples), "metric_prompts": len(ctx.metric_prompts),
                     "metric_references": sum(len(refs) for refs in ctx.metric_references)},
            "rejected_updates": sum(acc.rejected.values()),
            "sample": sample,
            "model": {"source": self.cfg.model.source, "name": getattr(ctx.base_model.config, "_name_or_path", ""),
                      "params": params, "trainable_params": trainable, "device": str(ctx.device)},
        }
        if ctx.network is not None:  # per-client compute_s, comm_s, energy_j; stragglers
            summary["network"] = {"planner": self.cfg.network.planner, **summarise_network(records, clients)}
            summary["stragglers"] = summary["network"]["stragglers"]
        for section, fields in extra.items():
            summary.setdefault(section, {}).update(fields)
        return summary
