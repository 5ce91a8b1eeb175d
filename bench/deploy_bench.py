"""Deployment benchmark (issue 19), in one run on loopback, tiny model, three SuperNodes with TLS and SuperNode
authentication (tests/flower_lab.py starts and stops everything):

1. FedLLM: seconds per round deployed on Flower vs simulated in process (the same config and seed; rounds 1..R),
   and Flower's fixed cost of one message round trip (the backend's discovery query: SuperNode polling plus a
   fresh ClientApp process with its imports, no training);
2. split learning (standard, cut after block 1): per split step, the deployed exchange over the split stream
   (as the client timed it: from handing its frame to the stream until the reply frame is unpacked, less the
   server's handling of the frame, which the server reports; the frames carry fedtune's header and the random
   generator's raw state besides the messages) against a bare gRPC round trip of the same message bytes up and
   down (plain grpcio bidirectional stream to another process, TLS, no fedtune framing; goal: at most 1.2x), once
   answered at once and once after the split server's median handling time of work (less that time: waiting
   costs a wake-up that an instant echo never pays, so this is the like-for-like figure), and fedtune's stream
   alone between two processes with no Flower around (instant, the server busy, the client busy too between
   calls, as a real step is); what the client spends
   around it (encoding its message and the generator state, decoding the reply); and the whole step exchange
   (server compute included) deployed vs the Ray backend vs in process.

    python bench/deploy_bench.py            # prints the table, writes bench/out/deploy/result.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from flower_lab import FlowerLab  # noqa: E402
from ray_bench import _ray_env  # noqa: E402

NODES = 3


def _deploy(lab: FlowerLab, cfg, work: Path) -> dict:
    from fedtune.deploy.app_files import write_app
    from fedtune.engine.partition_files import write_partition_files

    write_partition_files(cfg, work / "data")
    for i in range(NODES):
        home = lab.root / f"node-{i}"
        home.mkdir(exist_ok=True)
        (home / "train.jsonl").write_bytes((work / "data" / f"client-{i}.jsonl").read_bytes())
    app = write_app(cfg, work / "app", work / "deployed", certificates=lab.creds.ca_cert.parent)
    lab.run_app(app, timeout=900)
    return json.loads((work / "deployed" / "summary.json").read_text())


def _round_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["wall_s"] for r in rows if r["round"] > 0]


def _timed_steps(cls, method: str) -> list[float]:
    """Wrap ``cls.method`` to time each call (the bench's own measurement of a backend's step exchange)."""
    times: list[float] = []
    original = getattr(cls, method)

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - start)

    setattr(cls, method, timed)
    return times


def _echo_server(creds_dir: str, port_file: str, down: int, busy_s: float) -> None:
    """A plain grpcio bidirectional stream (TLS, no fedtune framing) in its own process, as the split server is:
    each request is answered with ``down`` bytes after ``busy_s`` seconds of work (a spin, as the split server's
    compute keeps a core busy)."""
    import grpc

    from fedtune.runtime.split_stream import OPTIONS

    reply = b"x" * down

    def echo(requests, context):
        for _ in requests:
            _spin(busy_s)
            yield reply

    folder = Path(creds_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=OPTIONS)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(echo)})])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [((folder / "server.key").read_bytes(), (folder / "server.pem").read_bytes())]))
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def _stream_server(creds_dir: str, port_file: str, down: int, busy_s: float) -> None:
    """fedtune's split stream alone in its own process: each frame is answered with a ``down``-byte payload after
    ``busy_s`` seconds of work (reported as the server's handling time, as the split server does)."""
    from fedtune.runtime.split_stream import SplitStreamServer

    reply = b"x" * down

    def handle(header, payload):
        start = time.perf_counter()
        while time.perf_counter() - start < busy_s:
            pass
        return {"server_s": time.perf_counter() - start}, reply

    folder = Path(creds_dir)
    server = SplitStreamServer("127.0.0.1", folder / "server.pem", folder / "server.key", "bench",
                               lambda hello: handle)
    Path(port_file).write_text(str(server.port))
    server.server.wait_for_termination()


def _start(role: str, creds, down: int, busy_s: float):
    """A server process of ``role`` (``--echo-server`` or ``--stream-server``) and its port."""
    import subprocess

    port_file = Path(tempfile.mkdtemp(prefix="fedtune-bench-server-")) / "port"
    server = subprocess.Popen([sys.executable, __file__, role, str(creds.ca_cert.parent), str(port_file),
                               str(down), repr(busy_s)])
    while not port_file.exists():
        if server.poll() is not None:
            raise RuntimeError(f"the {role} process did not start")
        time.sleep(0.1)
    return server, int(port_file.read_text())


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _stream_alone(creds, up: int, down: int, busy_s: float = 0.0, client_busy_s: float = 0.0,
                  repeats: int = 100) -> float:
    """Median transfer seconds of fedtune's split stream between two processes with no Flower around (frame to
    reply frame, less the server's reported handling), the client working ``client_busy_s`` between calls."""
    from fedtune.runtime.split_stream import SplitStreamClient

    server, port = _start("--stream-server", creds, down, busy_s)
    try:
        client = SplitStreamClient(f"127.0.0.1:{port}", creds.ca_cert.read_bytes(), {"secret": "bench"})
        payload, times = b"y" * up, []
        for _ in range(repeats + 5):
            _spin(client_busy_s)
            start = time.perf_counter()
            reply, _ = client.call({"op": "step", "rng": [5056]}, payload)
            times.append(time.perf_counter() - start - reply["server_s"])
        client.close()
    finally:
        server.kill()
        server.wait()
    return statistics.median(times[5:])


def _bare_grpc(creds, up: int, down: int, busy_s: float = 0.0, repeats: int = 100) -> float:
    """Median seconds of one round trip of ``up`` bytes and ``down`` bytes back on a plain grpcio bidi stream to
    another process, less the server's ``busy_s`` of work per request."""
    import queue

    import grpc

    from fedtune.runtime.split_stream import OPTIONS

    server, port = _start("--echo-server", creds, down, busy_s)
    try:
        channel = grpc.secure_channel(f"127.0.0.1:{port}",
                                      grpc.ssl_channel_credentials(creds.ca_cert.read_bytes()), OPTIONS)
        requests: queue.Queue = queue.Queue()
        replies = iter(channel.stream_stream("/bench.Echo/Stream")(iter(requests.get, None)))
        payload, times = b"y" * up, []
        for _ in range(repeats + 5):
            start = time.perf_counter()
            requests.put(payload)
            next(replies)
            times.append(time.perf_counter() - start - busy_s)
        requests.put(None)
        channel.close()
    finally:
        server.kill()
        server.wait()
    return statistics.median(times[5:])


def main() -> None:
    from fedtune.config import load_config
    from fedtune.engine.runner import Runner
    from fedtune.runtime.ray_split import RayServer
    from fedtune.split.session import LocalServer

    work = Path(tempfile.mkdtemp(prefix="fedtune-deploy-bench-"))
    _ray_env(work)
    tiny = ROOT / "configs" / "tiny.toml"
    fed = load_config(tiny, ["federation.rounds=3", "name=bench-fedllm"])
    split = load_config(tiny, ["paradigm=split", "split.cut=1", "federation.rounds=2", "name=bench-split"])
    result: dict = {}
    Runner(fed, work / "fedllm-sim").run()
    in_process_steps = _timed_steps(LocalServer, "step")
    Runner(split, work / "split-sim").run()
    ray_steps = _timed_steps(RayServer, "step")
    Runner(load_config(tiny, ["paradigm=split", "split.cut=1", "federation.rounds=2", "runtime.backend=ray"]),
           work / "split-ray").run()
    with FlowerLab(work / "lab", NODES) as lab:
        lab.start_superlink()
        for i in range(NODES):
            lab.register(i)
            home = lab.root / f"node-{i}"
            lab.start_supernode(i, f'partition-id={i} data-path="{home}/train.jsonl" state-dir="{home}/state"')
        for i in range(NODES):
            lab.wait_connected(i)
        fed_summary = _deploy(lab, fed, work / "fedllm")
        split_summary = _deploy(lab, split, work / "split")
        exchanges = split_summary["runtime"]["split_exchanges"]
        sizes = int(exchanges["up_bytes_median"]), int(exchanges["down_bytes_median"])
        bare = _bare_grpc(lab.creds, *sizes)
        busy = exchanges["server_seconds_median"]
        bare_busy = _bare_grpc(lab.creds, *sizes, busy_s=busy)
        alone = {"instant": _stream_alone(lab.creds, *sizes), "server_busy": _stream_alone(lab.creds, *sizes, busy),
                 "both_busy": _stream_alone(lab.creds, *sizes, busy, client_busy_s=busy)}
    sim_round = statistics.median(_round_seconds(work / "fedllm-sim"))
    dep_round = statistics.median(_round_seconds(work / "fedllm" / "deployed"))
    result["fedllm"] = {"simulated_round_s": sim_round, "deployed_round_s": dep_round,
                        "flower_message_round_trip_s": fed_summary["runtime"]["hello_seconds"],
                        "carried_bytes": fed_summary["runtime"]["carried_bytes"], "ledger": fed_summary["comm"]}
    result["split"] = {"exchanges": exchanges, "bare_grpc_s": bare, "bare_grpc_busy_server_s": bare_busy,
                       "transfer_vs_bare": exchanges["transfer_seconds_median"] / bare,
                       "transfer_vs_bare_busy_server": exchanges["transfer_seconds_median"] / bare_busy,
                       "stream_alone_s": alone,
                       "step_exchange_s": {"deployed": exchanges["seconds_median"],
                                           "ray": statistics.median(ray_steps),
                                           "in_process": statistics.median(in_process_steps)},
                       "stream_bytes": split_summary["runtime"]["split_stream_bytes"], "ledger": split_summary["comm"]}
    out = ROOT / "bench" / "out" / "deploy"
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    f, s = result["fedllm"], result["split"]
    print("| measure | value |\n|---|---|")
    print(f"| FedLLM seconds per round, simulated in process | {f['simulated_round_s']:.2f} |")
    print(f"| FedLLM seconds per round, deployed (3 SuperNodes) | {f['deployed_round_s']:.2f} |")
    print(f"| Flower message round trip, no training (query to 3 SuperNodes) | {f['flower_message_round_trip_s']:.2f} |")
    print(f"| split step: stream transfer (frame to reply frame, less the server's handling), median | "
          f"{1e3 * exchanges['transfer_seconds_median']:.2f} ms |")
    print(f"| split step: client encoding and decoding around it (exchange less stream), median | "
          f"{1e3 * (exchanges['seconds_median'] - exchanges['stream_seconds_median']):.2f} ms |")
    print(f"| split step: bare gRPC round trip of the same bytes ({sizes[0]} up, {sizes[1]} down), instant reply | "
          f"{1e3 * bare:.2f} ms |")
    print(f"| ratio (goal <= 1.2) | {s['transfer_vs_bare']:.2f} |")
    print(f"| split step: bare gRPC round trip, the server busy for the split server's median "
          f"{1e3 * exchanges['server_seconds_median']:.1f} ms (less that time) | {1e3 * bare_busy:.2f} ms |")
    print(f"| ratio, like for like | {s['transfer_vs_bare_busy_server']:.2f} |")
    print(f"| fedtune's stream alone in two processes (no Flower), instant / server busy / client busy too | "
          f"{' / '.join(f'{1e3 * v:.2f}' for v in alone.values())} ms |")
    for name, value in s["step_exchange_s"].items():
        print(f"| split step exchange incl. server compute, {name} | {1e3 * value:.2f} ms |")


if __name__ == "__main__":
    if sys.argv[1:2] in (["--echo-server"], ["--stream-server"]):
        serve = _echo_server if sys.argv[1] == "--echo-server" else _stream_server
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    else:
        main()
