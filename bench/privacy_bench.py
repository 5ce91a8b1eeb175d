"""FedLLM eval loss against the privacy spent: client-level DP (central, calibrated to a target epsilon) and
sample-level DP-SGD (Opacus), beside the non-private run and clipping alone.

On the comparison config's scale (configs/compare.toml: SmolLM2-135M-Instruct on E2E, 4 clients, Dirichlet alpha
0.5, 3 rounds x 3 local steps x batch 8), every variant on the same samples and seed, each into --out/dp/<variant>:

    non-private       the reference
    clip-only         client updates clipped to C = 1 (privacy.noise_multiplier = 0: no guarantee), unweighted mean
    central-eps-E     central client-level DP, noise calibrated to spend epsilon E at delta 1e-5 over the 3 rounds
    dp-sgd-z-Z        sample-level DP-SGD with noise multiplier Z, per-sample clip 1

It prints eval loss, task metric, epsilon and the noise std per adapter coordinate. The split learning half
(token recovery from the cut activations, per cut and activation noise) is bench/leakage_bench.py; this bench runs
it after its own variants unless --no-leakage.

    python bench/privacy_bench.py                          # -> bench/out/privacy
    python bench/privacy_bench.py --variants non-private,central-eps-8 --no-leakage
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fedtune.config import load_config
from variant_runs import SHORT_WARMUP, VariantRunner, add_run_arguments, chosen_variants, publish, reused_note

CENTRAL = ["privacy.client_dp='central'", "privacy.clip_norm=1.0"]
VARIANTS = {
    "non-private": [],
    "clip-only": [*CENTRAL, "privacy.noise_multiplier=0"],
    **{f"central-eps-{e}": [*CENTRAL, f"privacy.target_epsilon={e}"] for e in (8, 128, 2048)},
    **{f"dp-sgd-z-{z}": ["privacy.sample_dp=true", f"privacy.sample_noise_multiplier={z}",
                         "privacy.sample_clip_norm=1.0"] for z in (0.5, 1.0)},
}


def _row(o) -> tuple[str, dict]:
    s = o.summary or {}
    if not s:
        return f"| {o.variant} | FAILED: {o.error} | | | | |", {}
    cfg = load_config(Path(o.run_dir) / "config.toml")
    per_round, batch = cfg.federation.sampled, cfg.train.batch_size
    p = s.get("privacy") or {}
    m = s["final"].get("metrics") or {}
    if p.get("client_dp"):
        eps, z = p["epsilon"], p["noise_multiplier"]
        std = f"{z * p['clip_norm_final'] / per_round:.3g} (z {z:.3g} x C / {per_round} clients)"
    elif p.get("sample_dp"):
        eps, z = p["sample_dp"]["epsilon"], p["sample_dp"]["noise_multiplier"]
        std = f"{z:.3g} x clip / batch {batch} per step, per client"
    else:
        eps, std = None, "—"
    private = bool(p.get("client_dp") or p.get("sample_dp"))  # summary.json stores an infinite epsilon as null
    eps_text = ("inf" if private else "—") if eps in (None, float("inf")) else f"{eps:.3g}"
    line = (f"| {o.variant} | {s['initial']['eval_loss']:.4f} → {s['final']['eval_loss']:.4f} | "
            + (f"{m['bleu']:.1f} / {m['rougeL']:.1f}" if "bleu" in m else "—") + f" | {eps_text} | {std} | "
            + f"{s['comm']['total_bytes'] / 1e6:.1f} |")
    return line, {"variant": o.variant, "final_eval_loss": s["final"]["eval_loss"], "epsilon": eps, "metrics": m}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, config="configs/compare.toml", out="bench/out/privacy")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--no-leakage", action="store_true", help="skip bench/leakage_bench.py")
    args = parser.parse_args(argv)
    chosen = chosen_variants(parser, args.variants, VARIANTS)
    started, out = time.perf_counter(), Path(args.out)
    sets = [*args.set, "paradigm=fedllm"]
    runner = VariantRunner(args.config, sets, out, args.fresh, None if args.no_warmup else SHORT_WARMUP)
    outcomes = {"dp": [runner.run("dp", v, VARIANTS[v], []) for v in chosen]}
    md = ["# Privacy: FedLLM eval loss against epsilon", "", f"config {args.config} {' '.join(sets)}".rstrip(), "",
          "delta 1e-5; client-level epsilon: one client's data replaced, clients sampled without replacement; "
          "DP-SGD epsilon: one sample added or removed, the largest client's", "",
          "| variant | eval loss (before → after) | BLEU / ROUGE-L | epsilon | noise std | total MB |",
          "|---|---|---|---|---|---|"]
    rows = []
    for o in outcomes["dp"]:
        line, row = _row(o)
        md.append(line)
        rows.append(row)
    md += reused_note(outcomes)
    publish(out, md, {"args": vars(args), "rows": rows}, started)
    if not args.no_leakage and (Path(__file__).parent / "leakage_bench.py").exists():
        import leakage_bench

        return leakage_bench.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
