"""Ray backend benchmark, in one run:

1. rounds per minute of FedLLM on the tiny model with the in-process and the Ray backend, for 4, 8 and 16
   clients (all sampled every round; the same config, data and seed for both backends, whose final eval losses
   must agree);
2. Ray's per-step overhead for the split exchange: each split step moves activations client -> server and the
   cut-layer gradient back. (a) Timed with no model compute on either side, so only the exchange is measured: in
   process, the driver's transport encodes, records and decodes both messages; on Ray, a client actor produces
   the activation message, the driver records it and hands it to a server actor, which answers with the gradient
   message, which the driver records and hands back to the client actor (three actor calls per step, as a split
   step on Ray makes). Shapes: the tiny test model's batch (8 x 96 x 64) and SmolLM2's (8 x 128 x 576).
   (b) Real split training of the tiny model (4 clients, cut after block 2) on both backends: sessions run one
   after another on either, so the per-step difference is Ray's overhead in context.

Round times are the runner's per-round wall times of rounds 2 .. R-1 (round 1 includes the Ray pool start, the
last round the evaluation). Ray runs on this machine only (127.0.0.1, token authentication with a throw-away
token unless RAY_AUTH_MODE is set), with as many workers as it has CPUs, at most the clients per round.

    python bench/ray_bench.py                      # writes bench/out/ray/{results.md,result.json}
    python bench/ray_bench.py --clients 4,8 --rounds 4 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.toml"


def _ray_env(work: Path) -> None:
    """Loopback single-machine Ray (set before ray is imported), no usage stats, explicit auth mode."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if "RAY_AUTH_MODE" not in os.environ:
        token = work / "ray-token"
        token.write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import fedtune  # Ray's processes inherit the environment: let them import fedtune from a source checkout

    source = Path(fedtune.__file__).resolve().parents[1]
    if source.name == "src":
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(source), os.environ.get("PYTHONPATH", "")) if p)


def fedllm_rounds(clients: list[int], rounds: int, steps: int, work: Path, extra: list[str]) -> list[dict]:
    from fedtune.config import load_config
    from fedtune.engine.runner import Runner

    rows = []
    for n in clients:
        row = {"clients": n}
        for backend in ("inprocess", "ray"):
            cfg = load_config(TINY, [
                f"federation.num_clients={n}", f"federation.rounds={rounds}", f"train.local_steps={steps}",
                "partition.method=iid", f"data.max_train_samples={max(240, 24 * n)}", f"eval.every={rounds}",
                "eval.metric=none", "runtime.progress=false", f"runtime.backend={backend}", "runtime.threads=1",
                f"name=ray-bench-{backend}-{n}", *extra])
            out = work / f"{backend}-{n}"
            t0 = time.perf_counter()
            summary = Runner(cfg, out).run()
            total = time.perf_counter() - t0
            lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            walls = [r["wall_s"] for r in lines if 2 <= r["round"] <= rounds - 1]
            per_round = statistics.mean(walls)
            row[backend] = {"round_s": per_round, "rounds_per_min": 60.0 / per_round, "run_s": total,
                            "final_eval_loss": summary["final"]["eval_loss"],
                            "workers": summary.get("runtime", {}).get("workers")}
            print(f"  {n:2d} clients {backend:9s}: {per_round:6.3f} s/round = {60 / per_round:6.1f} rounds/min "
                  f"(whole run {total:5.1f} s, final eval loss {summary['final']['eval_loss']:.6f})", flush=True)
        row["speedup"] = row["ray"]["rounds_per_min"] / row["inprocess"]["rounds_per_min"]
        row["same_result"] = abs(row["ray"]["final_eval_loss"] - row["inprocess"]["final_eval_loss"]) < 1e-5
        rows.append(row)
    return rows


class ExchangeClient:
    """Split client stand-in: produces the activation message of one step, takes the gradient back."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        import torch

        from fedtune.comm.messages import Message, encode

        b, t, d = shape
        g = torch.Generator().manual_seed(0)
        self.up = encode(Message("activations", {
            "hidden": torch.randn(b, t, d, generator=g), "attention_mask": torch.ones(b, t, dtype=torch.bool),
            "labels": torch.randint(0, 1000, (b, t), generator=g).to(torch.int32)}))

    def forward(self) -> bytes:
        return self.up

    def backward(self, grad: bytes) -> int:
        from fedtune.comm.messages import decode

        return decode(grad).tensors["grad"].numel()


class ExchangeServer:
    """Split server stand-in: takes the activations, answers with a gradient of the same shape."""

    def step(self, act: bytes) -> bytes:
        import torch

        from fedtune.comm.messages import Message, decode, encode

        hidden = decode(act).tensors["hidden"]
        return encode(Message("gradients", {"grad": torch.zeros_like(hidden)}))


def split_exchange(shapes: list[tuple[int, int, int]], steps: int) -> list[dict]:
    import ray
    import torch

    from fedtune.comm.ledger import DOWN, UP, Ledger
    from fedtune.comm.messages import Message, decode
    from fedtune.comm.transport import Transport

    rows = []
    for shape in shapes:
        transport = Transport(Ledger())
        client = ExchangeClient(shape)
        act = decode(client.forward())
        grad = Message("gradients", {"grad": torch.zeros_like(act.tensors["hidden"])})
        for _ in range(3):  # warm up
            transport.upload(act, round=0, client=0)
            transport.download(grad, round=0, client=0)
        t0 = time.perf_counter()
        for _ in range(steps):
            up = transport.upload(act, round=1, client=0)
            transport.download(Message("gradients", {"grad": torch.zeros_like(up.tensors["hidden"])}),
                               round=1, client=0)
        inproc = (time.perf_counter() - t0) / steps

        c = ray.remote(num_cpus=0)(ExchangeClient).remote(shape)
        s = ray.remote(num_cpus=0)(ExchangeServer).remote()
        transport = Transport(Ledger())

        def ray_step(round: int) -> None:
            data = ray.get(c.forward.remote())
            transport.receive(data, round=round, client=0, direction=UP)
            back = ray.get(s.step.remote(data))
            transport.receive(back, round=round, client=0, direction=DOWN)
            ray.get(c.backward.remote(back))

        for _ in range(3):
            ray_step(0)
        t0 = time.perf_counter()
        for _ in range(steps):
            ray_step(1)
        on_ray = (time.perf_counter() - t0) / steps
        ray.kill(c)
        ray.kill(s)
        mb = (transport.ledger.bytes(round=1, direction=UP) + transport.ledger.bytes(round=1, direction=DOWN)) / steps / 1e6
        rows.append({"shape": list(shape), "mb_per_step": mb, "inprocess_ms": inproc * 1e3, "ray_ms": on_ray * 1e3,
                     "overhead_ms": (on_ray - inproc) * 1e3})
        print(f"  split exchange {shape}: {mb:.2f} MB/step, in-process {inproc * 1e3:.2f} ms, Ray {on_ray * 1e3:.2f} ms "
              f"-> Ray adds {(on_ray - inproc) * 1e3:.2f} ms per step", flush=True)
    return rows


def split_rounds(clients: int, rounds: int, steps: int, work: Path, extra: list[str]) -> dict:
    """Split learning on both backends: per-step time from the round times (sessions run one after another, so
    the difference is what Ray adds to each step's exchange)."""
    from fedtune.config import load_config
    from fedtune.engine.runner import Runner

    row = {"clients": clients, "steps_per_round": clients * steps}
    for backend in ("inprocess", "ray"):
        cfg = load_config(TINY, [
            "paradigm=split", "split.cut=2", f"federation.num_clients={clients}", f"federation.rounds={rounds}",
            f"train.local_steps={steps}", "partition.method=iid", f"eval.every={rounds}", "eval.metric=none",
            "runtime.progress=false", f"runtime.backend={backend}", "runtime.threads=1", *extra])
        out = work / f"split-{backend}"
        summary = Runner(cfg, out).run()
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        per_round = statistics.mean(r["wall_s"] for r in lines if 2 <= r["round"] <= rounds - 1)
        row[backend] = {"round_s": per_round, "step_ms": per_round / (clients * steps) * 1e3,
                        "final_eval_loss": summary["final"]["eval_loss"]}
    row["overhead_ms"] = row["ray"]["step_ms"] - row["inprocess"]["step_ms"]
    row["same_result"] = abs(row["ray"]["final_eval_loss"] - row["inprocess"]["final_eval_loss"]) < 1e-5
    print(f"  split, {clients} clients x {steps} steps: in-process {row['inprocess']['step_ms']:.1f} ms/step, "
          f"Ray {row['ray']['step_ms']:.1f} ms/step -> Ray adds {row['overhead_ms']:.1f} ms per step", flush=True)
    return row


def markdown(result: dict) -> str:
    lines = [f"Ray backend benchmark ({result['cpus']} CPUs, {result['rounds']} rounds x {result['steps']} local steps, "
             "tiny model)", "",
             "| clients | in-process rounds/min | Ray rounds/min | Ray workers | Ray / in-process | same final eval loss |",
             "|---|---|---|---|---|---|"]
    for r in result["fedllm"]:
        lines.append(f"| {r['clients']} | {r['inprocess']['rounds_per_min']:.1f} | {r['ray']['rounds_per_min']:.1f} | "
                     f"{r['ray']['workers']} | {r['speedup']:.2f} | {'yes' if r['same_result'] else 'NO'} |")
    lines += ["", "| split exchange per step, no compute | MB (both ways) | in-process ms | Ray ms | Ray overhead ms |",
              "|---|---|---|---|---|"]
    for r in result["split_exchange"]:
        b, t, d = r["shape"]
        lines.append(f"| {b} x {t} x {d} | {r['mb_per_step']:.2f} | {r['inprocess_ms']:.2f} | {r['ray_ms']:.2f} | "
                     f"{r['overhead_ms']:.2f} |")
    r = result["split"]
    lines += ["", "| split training step (tiny, cut 2) | in-process ms | Ray ms | Ray overhead ms | same final eval loss |",
              "|---|---|---|---|---|",
              f"| {r['clients']} clients x {r['steps_per_round'] // r['clients']} steps per round | "
              f"{r['inprocess']['step_ms']:.1f} | {r['ray']['step_ms']:.1f} | {r['overhead_ms']:.1f} | "
              f"{'yes' if r['same_result'] else 'NO'} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,8,16", help="client counts (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (>= 3; rounds 2..R-1 are timed)")
    parser.add_argument("--steps", type=int, default=4, help="local steps per client and round")
    parser.add_argument("--exchange-steps", type=int, default=100, help="timed split-exchange steps per shape")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "ray"))
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    _ray_env(work)
    import ray
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("FEDTUNE_CACHE", str(work / "cache"))
    ray.init(num_cpus=args.cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="warning")
    try:
        cpus = int(ray.cluster_resources().get("CPU", 0))
        print(f"FedLLM rounds per minute ({cpus} CPUs for Ray):", flush=True)
        fed = fedllm_rounds([int(c) for c in args.clients.split(",")], args.rounds, args.steps, work, args.set)
        from fedtune.runtime.ray_pool import release_parked

        release_parked()
        print("Split exchange per step:", flush=True)
        exchange = split_exchange([(8, 96, 64), (8, 128, 576)], args.exchange_steps)
        print("Split training steps:", flush=True)
        split = split_rounds(4, max(3, args.rounds - 1), args.steps, work, args.set)
    finally:
        ray.shutdown()
    result = {"cpus": cpus, "rounds": args.rounds, "steps": args.steps, "fedllm": fed, "split_exchange": exchange,
              "split": split,
              "python": sys.version.split()[0], "ray": ray.__version__}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
