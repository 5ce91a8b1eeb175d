"""Simulated time: a run's network (``ctx.network``) plans each round and turns what happened into seconds.

Before a round: the round's channel is drawn (seeded by round), and the configured planner splits the band
and picks pruning rates for the sampled clients from their nominal workload (:mod:`fedtune.network.workload`).

After a client's turn, its seconds come from what was measured: compute = FLOPs / device FLOP/s; uplink =
its ledger upload bytes at the Shannon rate of its share; downlink = its ledger download bytes at the
broadcast rate; energy = transmit power x uplink seconds + ``energy_pj_per_flop`` x FLOPs. A paradigm that
prunes (FedLLM) asks the network for the plan's rates (:meth:`NetworkSim.pruning_rates`) and trains at them, so the
FLOPs and bytes charged are those of the pruned models, measured; for the others the planner only splits the band (every rate 0). A round lasts
as long as its slowest client;
with ``deadline_s``, clients finishing later are stragglers (FedLLM leaves them out of the aggregate) and the
round lasts until the deadline.

Clients out of reach: where late clients are dropped (FedLLM) and a deadline is set, a sampled client that could not
meet it even alone on the whole band at ``rho_max`` (a deep fade, say) is left out of the round before it starts:
the server sends it nothing and does not wait for it, and the plan (band, pruning, the broadcast rate) is made for
the others. Without this, JCPBA would give a faded, power-limited client nearly all the band, and every client
would miss the deadline.

Everything is a function of (seed, round, config) and the ledger, so a resumed run gets the same seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedtune.comm.ledger import DOWN, UP
from fedtune.federated.sampling import sample_clients
from fedtune.network.channel import Channel, ChannelState, uplink_rate
from fedtune.network.devices import PRESETS, DeviceProfile, client_profiles
from fedtune.network.planner import PLANNERS, Plan, PlanProblem
from fedtune.network.workload import Workload

#: Device of every client when the network is on and ``[devices] profiles`` is not set.
DEFAULT_DEVICE = "laptop"


@dataclass(frozen=True)
class RoundPlan:
    """A round's channel, planning problem and plan (arrays in the order of ``clients``)."""

    round: int
    clients: list[int]
    channel: ChannelState
    down_rate_bps: float
    problem: PlanProblem
    plan: Plan
    left_out: list[int] = field(default_factory=list)  # sampled but out of reach of the deadline: not planned

    def index(self, cid: int) -> int:
        return self.clients.index(cid)


@dataclass(frozen=True)
class ClientTime:
    """One client's realised round: seconds, energy, and the allocation it ran under."""

    client: int
    share: float
    rho: float
    pruning_applied: bool
    compute_s: float
    up_s: float
    down_s: float
    energy_j: float

    @property
    def comm_s(self) -> float:
        return self.up_s + self.down_s

    @property
    def finish_s(self) -> float:
        return self.compute_s + self.up_s + self.down_s


def default_profiles(cfg) -> tuple[list[DeviceProfile], bool]:
    """Per-client device profiles from ``[devices]``, else every client a laptop (second value: defaulted)."""
    profiles = client_profiles(cfg.devices, cfg.federation.num_clients)
    if profiles is None:
        return [PRESETS[DEFAULT_DEVICE]] * cfg.federation.num_clients, True
    return profiles, False


def planning_problem(cfg, channel: Channel, state: ChannelState, workload: Workload,
                     profiles: list[DeviceProfile], prunes: bool = True) -> tuple[PlanProblem, float]:
    """The planning problem of the clients in ``state`` (and the downlink broadcast rate). Without ``prunes`` (the
    paradigm cannot prune its clients' models) the planner only splits the band: every rate is fixed at 0."""
    net, idx = cfg.network, state.clients
    devs = [profiles[c] for c in idx]
    power = np.array([d.tx_power_w for d in devs])
    flops = workload.flops[idx]
    memory = np.array([d.memory_bytes for d in devs], float)
    down_rate = channel.downlink_rate(state.gain)
    problem = PlanProblem(
        compute_s=flops / np.array([d.flops_per_s for d in devs]),
        up_bits=np.full(len(idx), 8.0 * workload.up_bytes),
        down_s=np.full(len(idx), 8.0 * workload.down_bytes / down_rate),
        snr=channel.snr(power, state.gain),
        bandwidth_hz=net.bandwidth_hz,
        rho_min=np.maximum(0.0, 1.0 - memory / workload.memory_bytes) if prunes else np.zeros(len(idx)),
        rho_max=net.rho_max if prunes else 0.0,
        budget=net.mean_rho_budget,
        tx_power_w=power,
        compute_j=net.energy_pj_per_flop * 1e-12 * flops,
        compute_cut=workload.compute_cut,
        bytes_cut=workload.bytes_cut,
        slack=net.latency_slack,
    )
    return problem, down_rate


class NetworkSim:
    """The run's simulated wireless network (``ctx.network``, built with the run's context); None on the context
    when ``[network]`` is off."""

    def __init__(self, cfg, workload: Workload, profiles: list[DeviceProfile], prunes: bool = True,
                 drops_late: bool = False, ledger=None) -> None:
        self.cfg = cfg
        self.prunes = prunes
        self.drops_late = drops_late  # the paradigm drops stragglers: clients out of reach are left out of rounds
        self.workload = workload
        self.profiles = profiles
        self.channel = Channel(cfg.network, cfg.federation.num_clients, cfg.seed)
        self.planner = PLANNERS.get(cfg.network.planner)
        self._plans: dict[tuple[int, tuple[int, ...]], RoundPlan] = {}
        self.ledger = ledger  # the run's: realised seconds come from the bytes it recorded
        # memory and the quality budget do not depend on the channel: an impossible setting fails before training
        everyone = list(range(cfg.federation.num_clients))
        problem, _ = planning_problem(cfg, self.channel, self.channel.draw(1, everyone), workload, profiles, prunes)
        problem.check()

    # -- planning ----------------------------------------------------------------------------
    def plan(self, round: int, clients: list[int] | None = None) -> RoundPlan:
        """The plan of ``round`` for ``clients`` (default: the round's sampled clients), solved once; clients out of
        reach of the deadline are left out of it (module doc)."""
        clients = sample_clients(self.cfg, round) if clients is None else sorted(clients)
        key = (round, tuple(clients))
        if key not in self._plans:
            for old in [k for k in self._plans if k[0] < round - 1]:
                del self._plans[old]
            reachable = self.within_reach(round, clients)
            state = self.channel.draw(round, reachable)
            problem, down_rate = planning_problem(self.cfg, self.channel, state, self.workload, self.profiles,
                                                  self.prunes)
            left_out = [c for c in clients if c not in reachable]
            self._plans[key] = RoundPlan(round, reachable, state, down_rate, problem, self.planner(problem), left_out)
        return self._plans[key]

    def within_reach(self, round: int, clients: list[int]) -> list[int]:
        """``clients`` that could meet ``deadline_s`` in ``round`` alone on the whole band, pruned at ``rho_max``,
        receiving the broadcast at their own rate (all of them without a deadline, or when late clients are kept)."""
        deadline = self.cfg.network.deadline_s
        if deadline is None or not self.drops_late or not clients:
            return list(clients)
        state = self.channel.draw(round, clients)
        problem, _ = planning_problem(self.cfg, self.channel, state, self.workload, self.profiles, self.prunes)
        rho = np.full(problem.k, problem.rho_max)
        own_down_s = np.array([8.0 * self.workload.down_bytes / self.channel.downlink_rate(state.gain[i:i + 1])
                               for i in range(problem.k)])
        alone = (problem.keep_compute(rho) * problem.compute_s + problem.up_s(np.ones(problem.k), rho)
                 + problem.keep_bytes(rho) * own_down_s)
        return [c for c, t in zip(clients, alone) if t <= deadline]

    def left_out(self, round: int) -> list[int]:
        """The round's sampled clients that its plan leaves out (out of reach of the deadline)."""
        return self.plan(round).left_out

    def pruning_rates(self, round: int) -> dict[int, float]:
        """The plan's pruning rate per sampled client (the paradigm reads it; the network never writes its state)."""
        rp = self.plan(round)
        return {c: float(r) for c, r in zip(rp.clients, rp.plan.rho)}

    # -- realised seconds --------------------------------------------------------------------
    def client_time(self, rp: RoundPlan, cid: int, flops: float, up_bytes: int, down_bytes: int,
                    applied_rate: float = 0.0) -> ClientTime:
        """Seconds and energy of ``cid``'s measured round under plan ``rp`` (see the module doc)."""
        i = rp.index(cid)
        share, rho = float(rp.plan.share[i]), float(rp.plan.rho[i])
        device = self.profiles[cid]
        rate = float(uplink_rate(np.array([share]), self.cfg.network.bandwidth_hz, rp.problem.snr[i:i + 1])[0])
        up_s = 8.0 * up_bytes / rate if up_bytes > 0 else 0.0
        down_s = 8.0 * down_bytes / rp.down_rate_bps if down_bytes > 0 else 0.0
        energy = device.tx_power_w * up_s + self.cfg.network.energy_pj_per_flop * 1e-12 * flops
        return ClientTime(cid, share, rho, applied_rate > 0, flops / device.flops_per_s, up_s, down_s, energy)

    def _measured(self, round: int, cid: int, flops: float, applied_rate: float, rp: RoundPlan) -> ClientTime:
        up = self.ledger.bytes(round=round, client=cid, direction=UP)
        down = self.ledger.bytes(round=round, client=cid, direction=DOWN)
        return self.client_time(rp, cid, flops, up, down, applied_rate)

    def straggler(self, round: int, cid: int, flops: float, applied_rate: float = 0.0) -> bool:
        """Whether ``cid`` (its turn done, upload in the ledger) finishes after ``network.deadline_s``."""
        deadline = self.cfg.network.deadline_s
        if deadline is None:
            return False
        return self._measured(round, cid, flops, applied_rate, self.plan(round)).finish_s > deadline

    def round_record(self, round: int, result) -> dict:
        """metrics.jsonl fields of a finished round: ``sim_s``, ``stragglers`` and per-client ``sim_clients``."""
        clients = list(result.clients)
        if not clients:
            return {"sim_s": 0.0, "stragglers": 0, "sim_clients": [], "left_out": len(self.left_out(round))}
        rp = self.plan(round)
        if sorted(clients) != rp.clients:
            rp = self.plan(round, clients)
        applied = dict(zip(clients, result.extra.get("pruning_rates") or [0.0] * len(clients)))
        deadline = self.cfg.network.deadline_s
        rows, finishes, late = [], [], 0
        for cid in clients:
            t = self._measured(round, cid, result.client_flops.get(cid, 0), float(applied.get(cid, 0.0)), rp)
            i = rp.index(cid)
            is_late = deadline is not None and t.finish_s > deadline
            late += is_late
            finishes.append(t.finish_s)
            rows.append({
                "client": cid, "device": self.profiles[cid].name,
                "distance_m": float(rp.channel.distance_m[i]), "gain_db": float(rp.channel.gain_db[i]),
                "share": t.share, "rho": t.rho, "pruning_applied": t.pruning_applied,
                "compute_s": t.compute_s, "up_s": t.up_s, "down_s": t.down_s, "comm_s": t.comm_s,
                "energy_j": t.energy_j, "finish_s": t.finish_s, "straggler": bool(is_late),
            })
        sim = float(deadline) if late else float(max(finishes))
        return {"sim_s": sim, "stragglers": int(late), "sim_clients": rows, "planned_s": float(rp.plan.latency_s),
                "planner": self.cfg.network.planner, "down_rate_bps": float(rp.down_rate_bps),
                "left_out": len(self.left_out(round))}


def summarise(records: list[dict], clients: list[dict]) -> dict:
    """Totals over metrics records: adds compute_s, comm_s, energy_j, stragglers to each client entry and returns
    the summary's ``network`` section."""
    totals = {c["id"]: {"compute_s": 0.0, "comm_s": 0.0, "energy_j": 0.0, "stragglers": 0} for c in clients}
    planned = 0.0
    for rec in records:
        planned += rec.get("planned_s") or 0.0
        for row in rec.get("sim_clients") or []:
            t = totals.setdefault(row["client"], {"compute_s": 0.0, "comm_s": 0.0, "energy_j": 0.0, "stragglers": 0})
            for key in ("compute_s", "comm_s", "energy_j"):
                t[key] += row[key]
            t["stragglers"] += int(row["straggler"])
    for entry in clients:
        entry.update(totals.get(entry["id"], {}))
    return {"planned_s": planned, "energy_j": sum(t["energy_j"] for t in totals.values()),
            "stragglers": sum(int(r.get("stragglers") or 0) for r in records),
            "left_out": sum(int(r.get("left_out") or 0) for r in records)}
