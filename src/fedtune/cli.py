"""``fedtune`` command line: run a config, compare paradigms, rebuild a report, list config keys."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape


def _run(args: argparse.Namespace, console: Console) -> None:
    from fedtune.config import load_config
    from fedtune.core.errors import ConfigError
    from fedtune.engine.runner import Runner
    from fedtune.report.render import print_summary

    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out) != out:
            raise ConfigError("--out and --resume name different directories; --resume continues in place")
        source = args.config or out / "config.toml"
        if not Path(source).is_file():
            raise ConfigError(f"cannot resume {out}: it holds no fedtune run (no config.toml)" if not args.config
                              else f"config file not found: {source}")
    else:
        if not args.config:
            raise ConfigError("fedtune run needs a CONFIG.toml (or --resume DIR)")
        source = args.config
    cfg = load_config(source, args.set)
    if not args.resume:
        out = Path(args.out) if args.out else Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"[bold]fedtune[/] {cfg.paradigm} run -> {out}")
    summary = Runner(cfg, out, console).run(resume=bool(args.resume))
    print_summary(summary, console)
    console.print(f"report: {out / 'report.md'}")


def _compare(args: argparse.Namespace, console: Console) -> None:
    from fedtune.engine.compare import ComparisonPlan, Sweep, run_comparison

    paradigms = [p.strip() for p in args.paradigms.split(",") if p.strip()]
    plan = ComparisonPlan(config=args.config, paradigms=paradigms, overrides=args.set,
                          sweeps=[Sweep.parse(s) for s in args.sweep], baselines=not args.no_baselines)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"[bold]fedtune compare[/] {', '.join(plan.all_paradigms)} "
                  f"({len(plan.cells())} setting(s)) -> {out}")
    report = run_comparison(plan, out, console, target_loss=args.target_loss)
    console.print(report.read_text(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {report}")


def _plan(args: argparse.Namespace, console: Console) -> None:
    from fedtune.config import load_config
    from fedtune.engine.plan_table import print_plan

    cfg = load_config(args.config, args.set)
    if not cfg.network.enabled:
        console.print("network.planner is 'none' in this configuration; planning with 'jcpba'")
        cfg = load_config(args.config, [*args.set, "network.planner=jcpba"])
    print_plan(cfg, args.round, Console())


def _partition(args: argparse.Namespace, console: Console) -> None:
    from fedtune.config import load_config
    from fedtune.engine.partition_files import write_partition_files

    cfg = load_config(args.config, args.set)
    files = write_partition_files(cfg, Path(args.out))
    console.print(f"wrote {len(files)} client files, eval.jsonl and partition.json to {args.out} (read one back "
                  f"with --set data.dataset=local --set data.path={files[0]})")


def _deploy_init(args: argparse.Namespace, console: Console) -> None:
    from fedtune.config import load_config
    from fedtune.deploy.app_files import write_app

    cfg = load_config(args.config, [*args.set, "runtime.backend=flower"])  # checked as it will run: deployed
    run_dir = Path(args.run_dir or Path(args.out) / "run")
    out = write_app(cfg, Path(args.out), run_dir, Path(args.certificates) if args.certificates else None,
                    args.split_host)
    console.print(f"wrote the Flower app to {out}; start it with `flwr run {out} <superlink>` (its run directory: "
                  f"{run_dir.expanduser().resolve()})")


def _deploy_credentials(args: argparse.Namespace, console: Console) -> None:
    from fedtune.deploy.credentials import make_credentials

    creds = make_credentials(Path(args.out), args.hosts.split(","), args.nodes)
    console.print(f"wrote {creds.ca_cert}, {creds.server_cert}, {creds.server_key} and {args.nodes} SuperNode "
                  f"key pairs under {creds.root / 'keys'}")


def _add_deploy(sub) -> None:
    deploy = sub.add_parser("deploy", help="run a federation across machines on Flower").add_subparsers(
        dest="deploy_command", required=True)
    init = deploy.add_parser("init", help="write a Flower app (pyproject and app module) for a config")
    init.add_argument("config", help="TOML config of the run")
    init.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    init.add_argument("--out", required=True, help="folder for the app")
    init.add_argument("--run-dir", help="where the ServerApp writes the run directory (default: OUT/run)")
    init.add_argument("--certificates", help="split learning: folder with ca.crt, server.pem and server.key for "
                      "the split stream's TLS (the SuperLink's own serve)")
    init.add_argument("--split-host", default="127.0.0.1", help="split learning: the address the split server "
                      "listens on and clients dial (named in the certificate), HOST or HOST:PORT (no port: a free "
                      "one; give one for a firewall)")
    init.set_defaults(handler=_deploy_init)
    creds = deploy.add_parser("credentials", help="a self-signed CA, the SuperLink's TLS certificate and "
                              "SuperNode authentication keys (laboratories and tests)")
    creds.add_argument("--out", required=True, help="folder for certificates/ and keys/")
    creds.add_argument("--hosts", default="127.0.0.1,localhost",
                       help="comma-separated addresses the SuperLink is reached at (certificate names)")
    creds.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to make")
    creds.set_defaults(handler=_deploy_credentials)


def _probe(args: argparse.Namespace, console: Console) -> None:
    import torch

    from fedtune.config import load_config
    from fedtune.engine.context import build_model, load_run_data
    from fedtune.models.loading import resolve_device
    from fedtune.report.leakage import print_leakage, setting_notes, write_leakage
    from fedtune.split.leakage import InverterSettings, probe_leakage

    cfg = load_config(args.config, args.set)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    data = load_run_data(cfg)
    _, model = build_model(cfg, resolve_device(cfg.runtime.device))
    victims, public = data.evals["input_ids"][:args.samples], data.train["input_ids"][:args.public]
    console.print(f"[bold]fedtune probe leakage[/] {cfg.name}: {len(victims)} victim texts, {len(public)} public")
    inverter = InverterSettings() if args.inverter_steps is None else InverterSettings(steps=args.inverter_steps)
    report = probe_leakage(model, victims, public, int(data.tokenizer.pad_token_id),
                           cuts=[int(c) for c in args.cuts.split(",")], noise=[float(n) for n in args.noise.split(",")],
                           seed=cfg.seed, batch_size=cfg.train.batch_size, inverter=inverter)
    report.notes = setting_notes(cfg, len(victims), len(public))
    print_leakage(report, console)
    json_path, md_path = write_leakage(report, Path(args.out or Path("runs") / f"leakage-{cfg.name}"))
    console.print(f"wrote {json_path} and {md_path}")


def _add_probe(sub) -> None:
    probe = sub.add_parser("probe", help="measure what a configuration leaks").add_subparsers(
        dest="probe_command", required=True)
    leakage = probe.add_parser("leakage", help="split learning: how many input tokens the server recovers from "
                               "the cut-layer activations, per cut and activation noise")
    leakage.add_argument("config", help="TOML config of the run (model, data)")
    leakage.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    leakage.add_argument("--cuts", default="1,2,3,6", help="comma-separated cut layers (those the model allows)")
    leakage.add_argument("--noise", default="0", help="comma-separated activation noise ratios")
    leakage.add_argument("--samples", type=int, default=32, help="victim texts from the eval split")
    leakage.add_argument("--public", type=int, default=256, help="public inverter-training texts from the "
                         "training split")
    leakage.add_argument("--inverter-steps", type=int, help="training steps of the learned inverter "
                         "(default: InverterSettings.steps of fedtune.split.leakage)")
    leakage.add_argument("--out", help="folder for leakage.json and leakage.md (default runs/leakage-NAME)")
    leakage.set_defaults(handler=_probe)


def _report(args: argparse.Namespace, console: Console) -> None:
    from fedtune.report.render import write_report

    console.print(f"wrote {write_report(Path(args.run_dir))}")


def _config(args: argparse.Namespace, console: Console) -> None:
    from fedtune.config import RunConfig, describe_fields

    if args.defaults:
        print(RunConfig().to_toml())
        return
    for key, default, help_text in describe_fields():
        print(f"{key} = {default}\n    {help_text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train one configuration")
    run.add_argument("config", nargs="?", help="TOML config (optional with --resume: the run's own is used)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. federation.rounds=5 or paradigm=centralized")
    run.add_argument("--out", help="run directory (default runs/NAME-TIMESTAMP)")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.set_defaults(handler=_run)

    compare = sub.add_parser("compare", help="run several paradigms (and baselines) on the same setting, one report")
    compare.add_argument("config", help="TOML config shared by every run")
    compare.add_argument("--paradigms", default="fedllm,kd,split",
                         help="comma-separated paradigms to compare (default fedllm,kd,split)")
    compare.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                         help="run everything once per value (repeatable: the product); KEY is a config key or "
                              "clients, alpha, rank, cut, topk")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    compare.add_argument("--out", help="comparison directory (default runs/compare-TIMESTAMP); "
                                       "repeat the command with the same --out to resume")
    compare.add_argument("--target-loss", type=float, default=None,
                         help="eval loss for 'bytes to target' (default: the worst final loss of the paradigms)")
    compare.add_argument("--no-baselines", action="store_true", help="skip the centralized and local-only baselines")
    compare.set_defaults(handler=_compare)

    plan = sub.add_parser("plan", help="one round's network plan per client (bandwidth share, pruning rate, "
                          "seconds) and every planner's latency, without training")
    plan.add_argument("config", help="TOML config ([network] planner; devices from [devices])")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    plan.add_argument("--round", type=int, default=1, help="round whose channel draw is planned (default 1)")
    plan.set_defaults(handler=_plan)

    partition = sub.add_parser("partition", help="write each client's training data as its own file "
                               "(client-K.jsonl), partitioned as a run of the config would, and eval.jsonl")
    partition.add_argument("config", help="TOML config ([data], [partition], federation.num_clients)")
    partition.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    partition.add_argument("--out", required=True, help="folder for the files")
    partition.set_defaults(handler=_partition)

    _add_deploy(sub)
    _add_probe(sub)

    report = sub.add_parser("report", help="rebuild report.md and plots from a run directory")
    report.add_argument("run_dir")
    report.set_defaults(handler=_report)

    config = sub.add_parser("config", help="list every config key with its default and help")
    config.add_argument("--defaults", action="store_true", help="print the default config as TOML")
    config.set_defaults(handler=_config)
    return parser


#: Set for fedtune's processes unless the user set it: idle OpenMP threads sleep instead of spinning, so a run
#: sharing its cores (the test suite, a Ray driver beside its workers, a shared server) is not starved by them
#: (bench/threads_bench.py). OpenMP reads it when torch starts, hence here, before anything imports torch.
OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def main(argv: list[str] | None = None) -> int:
    for key, value in OMP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from fedtune.core.errors import FedtuneError

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        args.handler(args, console)
    except FedtuneError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the last checkpoint is intact; continue with --resume DIR")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
