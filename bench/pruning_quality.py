"""Pruning quality without training: eval loss of SmolLM2 pruned by each importance method, target and rate.

Uses configs/jcpba.toml's data and model and FedLLM's calibration set (the same masks a pruned client gets).
Prints one line per (method, targets) with the eval loss at rates 5, 10, 20, 30 and 50 %. About 10 minutes on
2 CPU cores. This is what the README's pruning table reports:

    PYTHONPATH=src python bench/pruning_quality.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fedtune.config import load_config
from fedtune.engine.context import build_context
from fedtune.engine.evaluation import evaluate
from fedtune.models.pruning import Pruner, build_pruned_model
from fedtune.paradigms.fedllm import FedLLM
from fedtune.progress import RunProgress

RATES = (0.05, 0.1, 0.2, 0.3, 0.5)


def main() -> None:
    cfg = load_config(Path("configs/jcpba.toml"), ["network.planner=none", "runtime.threads=1"])
    ctx = build_context(cfg, RunProgress(False), Path(tempfile.mkdtemp()))
    calibration = FedLLM(ctx)._calibration_batches

    def loss(model) -> float:
        return evaluate(model, ctx.eval_samples, batch_size=16, pad_token_id=ctx.pad_token_id, device=ctx.device).loss

    print("unpruned", round(loss(ctx.base_model), 3), flush=True)
    for method in ("activation", "magnitude", "random"):
        for targets in ("mlp", "heads", "both"):
            pruner = Pruner(ctx.model, method=method, targets=targets, seed=cfg.seed, calibration=calibration)
            losses = []
            for rate in RATES:
                with ctx.model.disable_adapter():
                    losses.append(round(loss(build_pruned_model(ctx.model, pruner.mask(rate))), 3))
            print(method, targets, losses, flush=True)


if __name__ == "__main__":
    main()
