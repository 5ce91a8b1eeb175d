"""A Flower federation on this host, for the deployment tests and bench: a SuperLink and SuperNodes on loopback
(127.0.0.x), TLS and SuperNode authentication on, with credentials made by ``fedtune deploy credentials``.

Everything is started as its own process group and stopped by that id (``stop()``, also on failure): the Flower
daemons spawn their own helpers (SuperExec, ServerApp and ClientApp processes), which go with their group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.deploy.credentials import make_credentials

BIN = Path(sys.executable).parent


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def lab_env(home: Path) -> dict:
    return {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "OMP_WAIT_POLICY": "PASSIVE",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@dataclass
class FlowerLab:
    root: Path
    nodes: int
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.home = self.root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        hosts = ["127.0.0.1"] + [f"127.0.0.{i + 2}" for i in range(self.nodes)] + ["localhost"]
        self.creds = make_credentials(self.root / "credentials", hosts, self.nodes + 1)
        self.port = free_port("127.0.0.1")
        self.address = f"127.0.0.1:{self.port}"
        self.env = lab_env(self.home)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.creds.ca_cert}"\n')

    # -- processes -------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=cwd or self.root,
                                start_new_session=True)
        self.processes[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        c = self.creds
        self._start("superlink", [str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(c.ca_cert),
                                  "--ssl-certfile", str(c.server_cert), "--ssl-keyfile", str(c.server_key),
                                  "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port)])
        self._wait_for(lambda: "Uvicorn running" in self.log("superlink"), "the SuperLink to start", "superlink")

    def register(self, index: int) -> None:
        self.flwr("supernode", "register", f"{self.creds.node_key(index)}.pub", "lab")

    def start_supernode(self, index: int, node_config: str, key: Path | None = None,
                        root_certificates: Path | None = None) -> subprocess.Popen:
        host = f"127.0.0.{index + 2}"
        return self._start(f"supernode-{index}", [
            str(BIN / "flower-supernode"), "--root-certificates", str(root_certificates or self.creds.ca_cert),
            "--superlink", self.address, "--auth-supernode-private-key", str(key or self.creds.node_key(index)),
            "--node-config", node_config, "--host", host, "--port", str(free_port(host)), "--max-retries", "3"])

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def run_app(self, app: Path, *run_config: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run APP lab --stream`` (waits for the run to end)."""
        extra = [a for item in run_config for a in ("--run-config", item)]
        return self.flwr("run", str(app), "lab", "--stream", *extra, timeout=timeout)

    def start_run(self, app: Path, *run_config: str, name: str = "run") -> subprocess.Popen:
        """``flwr run APP lab --stream`` in the background (its output in ``<name>.log``)."""
        extra = [a for item in run_config for a in ("--run-config", item)]
        return self._start(name, [str(BIN / "flwr"), "run", str(app), "lab", "--stream", *extra])

    def run_id(self, name: str = "run") -> int:
        self._wait_for(lambda: "Successfully started run" in self.log(name), "the run to start", name)
        return int(self.log(name).split("Successfully started run", 1)[1].split()[0])

    def wait_log(self, name: str, text: str, timeout: float = 300, after: int = 0) -> None:
        """Wait until ``name``'s log shows ``text`` (past its first ``after`` characters)."""
        self._wait_for(lambda: text in self.log(name)[after:], repr(text), name, timeout)

    def descendants(self, name: str) -> list:
        """The processes ``name`` started, and theirs (psutil; Flower's SuperExec starts its own session)."""
        import psutil

        try:
            return psutil.Process(self.processes[name].pid).children(recursive=True)
        except (KeyError, psutil.Error):
            return []

    def processes_named(self, owner: str, command: str) -> list:
        """Descendants of ``owner`` whose command line names ``command``."""
        import psutil

        found = []
        for proc in self.descendants(owner):
            try:
                if any(command in part for part in proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def serverapps_holding(self, lock: Path) -> list:
        """The SuperLink's ServerApp processes that hold ``lock`` open (a fedtune run directory's lock file)."""
        import psutil

        held = []
        for proc in self.processes_named("superlink", "flwr-serverapp"):
            try:
                if any(Path(f.path) == Path(lock) for f in proc.open_files()):
                    held.append(proc)
            except psutil.Error:
                continue
        return held

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop ``name``: its process group, then whatever it started outside the group."""
        import psutil

        children = self.descendants(name)
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for child in children:
            try:
                child.send_signal(sig)
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=20)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name, signal.SIGTERM)

    def _wait_for(self, ready, what: str, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            proc = self.processes.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) before {what}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)

    def restart_supernode(self, index: int, node_config: str, timeout: float = 180) -> None:
        """Start SuperNode ``index`` again until the SuperLink accepts it: a node that died is refused until the
        SuperLink has missed its heartbeats (Flower: 30 s interval, patience 2), and the refused SuperNode exits."""
        deadline = time.monotonic() + timeout
        while True:
            seen = len(self.log(f"supernode-{index}"))
            proc = self.start_supernode(index, node_config)
            while proc.poll() is None and "SuperNode ID" not in self.log(f"supernode-{index}")[seen:]:
                time.sleep(0.5)
            if proc.poll() is None:
                return
            self.processes.pop(f"supernode-{index}", None)
            if time.monotonic() > deadline:
                log = self.log(f"supernode-{index}")[-2000:]
                raise TimeoutError(f"SuperNode {index} was not accepted again:\n{log}")
            time.sleep(5)

    def wait_connected(self, index: int, timeout: float = 60) -> None:
        self._wait_for(lambda: "SuperNode ID" in self.log(f"supernode-{index}"), f"SuperNode {index} to connect",
                       f"supernode-{index}", timeout)

    def __enter__(self) -> "FlowerLab":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# -- what the deployment test modules share --------------------------------------------------------------------
NODES = 3


def node_config(lab: FlowerLab, i: int) -> str:
    """SuperNode ``i``'s node config: its organisation's files, which each test replaces with its run's."""
    home = lab.root / f"node-{i}"
    return (f'partition-id={i} data-path="{home}/train.jsonl" public-path="{home}/public.jsonl" '
            f'eval-path="{home}/eval.jsonl" state-dir="{home}/state"')


def running_lab(root: Path):
    """A SuperLink and three registered, connected SuperNodes (a generator for a module-scoped fixture: a
    SuperNode that stops cannot rejoin until the SuperLink has missed its heartbeats, about a minute)."""
    with FlowerLab(root, NODES) as lab:
        lab.start_superlink()
        for i in range(NODES):
            lab.register(i)
        for i in range(NODES):
            lab.start_supernode(i, node_config(lab, i))
        for i in range(NODES):
            lab.wait_connected(i)
        yield lab


def give_data(lab: FlowerLab, cfg, work: Path) -> None:
    """Partition ``cfg``'s data as a laboratory does and hand each organisation its file (and the shared ones)."""
    import shutil

    from fedtune.engine.partition_files import write_partition_files

    data = work / "data"
    write_partition_files(cfg, data)
    for i in range(NODES):
        home = lab.root / f"node-{i}"
        home.mkdir(exist_ok=True)
        shutil.copyfile(data / f"client-{i}.jsonl", home / "train.jsonl")
        shutil.copyfile(data / "eval.jsonl", home / "eval.jsonl")
        if (data / "public.jsonl").exists():
            shutil.copyfile(data / "public.jsonl", home / "public.jsonl")


def wait_file(path: Path, ready, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and ready(path)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {path}")
        time.sleep(0.5)
