"""Pruning quality without training: eval loss of SmolLM2 pruned by each importance method, target and rate.

Uses configs/jcpba.toml's data and model and FedLLM's calibration set (the same masks a pruned client gets).
Prints one line per (method, targets, compensation) with the eval loss at rates 5, 10, 20, 30, 40 and 50 %. The
whole grid takes about 15 minutes on 2 CPU cores; this is what the README's pruning table reports:

    PYTHONPATH=src python bench/pruning_quality.py
    PYTHONPATH=src python bench/pruning_quality.py --methods activation,fluctuation --targets mlp --compensate both
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedtune.config import load_config
from fedtune.core.progress import RunProgress
from fedtune.engine.context import build_context
from fedtune.models.pruning import CALIBRATED_METHODS, PRUNING_METHODS, TARGETS, Pruner, build_pruned_model
from fedtune.paradigms.fedllm import FedLLM
from fedtune.training.evaluation import evaluate

RATES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="activation,fluctuation,magnitude,random",
                        help=f"comma-separated, from {', '.join(PRUNING_METHODS.names())}")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, from {', '.join(TARGETS)}")
    parser.add_argument("--compensate", choices=("off", "on", "both"), default="both",
                        help="bias compensation (calibrated methods only; 'both' = a line without and one with)")
    args = parser.parse_args()
    cfg = load_config(Path("configs/jcpba.toml"), ["network.planner=none", "runtime.threads=1"])
    ctx = build_context(cfg, RunProgress(False), Path(tempfile.mkdtemp()))
    calibration = FedLLM(ctx)._calibration_batches

    def loss(model) -> float:
        return evaluate(model, ctx.eval_samples, batch_size=16, pad_token_id=ctx.pad_token_id, device=ctx.device).loss

    print("unpruned", round(loss(ctx.base_model), 3), flush=True)
    switches = {"off": (False,), "on": (True,), "both": (False, True)}[args.compensate]
    for method in args.methods.split(","):
        for targets in args.targets.split(","):
            for compensate in switches if method in CALIBRATED_METHODS else (False,):
                pruner = Pruner(ctx.model, method=method, targets=targets, seed=cfg.seed, calibration=calibration,
                                compensate=compensate)
                losses = []
                for rate in RATES:
                    with ctx.model.disable_adapter():
                        losses.append(round(loss(build_pruned_model(ctx.model, pruner.mask(rate))), 3))
                print(method, targets, "compensated" if compensate else "plain", losses, flush=True)


if __name__ == "__main__":
    main()
