"""``fedtune`` command line: run a config, rebuild a report, list config keys."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console


def _run(args: argparse.Namespace, console: Console) -> None:
    from fedtune.config import load_config
    from fedtune.engine.runner import Runner
    from fedtune.errors import ConfigError
    from fedtune.report.render import print_summary

    if args.resume:
        out = Path(args.resume)
        if args.out and Path(args.out) != out:
            raise ConfigError("--out and --resume name different directories; --resume continues in place")
        source = args.config or out / "config.toml"
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

    report = sub.add_parser("report", help="rebuild report.md and plots from a run directory")
    report.add_argument("run_dir")
    report.set_defaults(handler=_report)

    config = sub.add_parser("config", help="list every config key with its default and help")
    config.add_argument("--defaults", action="store_true", help="print the default config as TOML")
    config.set_defaults(handler=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedtune.errors import FedtuneError

    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    try:
        args.handler(args, console)
    except FedtuneError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: the last checkpoint is intact; continue with --resume DIR")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
