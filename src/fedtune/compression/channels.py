"""The split interfaces of a run, each with its codec, SplitCom reuse caches and threshold controller."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fedtune.comm.ledger import DOWN, UP, Ledger
from fedtune.comm.split_interfaces import SPLIT_INTERFACES as INTERFACES
from fedtune.comm.split_interfaces import USHAPE_ONLY
from fedtune.compression.controllers import SessionObservation, make_controller
from fedtune.compression.interfaces import Interface, InterfaceSettings
from fedtune.compression.reuse import CREDIT
from fedtune.compression.store import TensorStore
from fedtune.core.seeding import derive_seed


class SplitChannels:
    """Builds the interfaces from ``[compression]``; one controller per interface that reuses."""

    def __init__(self, cfg, d_model: int, ushape: bool, spill_dir: Path) -> None:
        c = cfg.compression
        names = ["activations", "gradients"] + (list(USHAPE_ONLY) if ushape else [])
        default = names if ushape else ["activations"]
        selected = set(c.interfaces or default) | set(c.per_interface) if c.on else set()
        budget = int(c.cache_budget_mb * 1e6) if c.cache_budget_mb else None
        self.ifaces: dict[str, Interface] = {}
        self.controllers = {}
        for name in names:
            settings = self._settings(c, name, name in selected, budget)
            self.ifaces[name] = Interface(settings, d_model, derive_seed(cfg.seed, "projection", name), spill_dir)
            if settings.reuse:
                self.controllers[name] = make_controller(c.controller, c.thresholds.get(name, c.theta),
                                                         derive_seed(cfg.seed, "controller", name),
                                                         c.controller_settings())
        self.thetas: dict[str, float] = {}
        self.trajectory: dict[str, list[list]] = {name: [] for name in self.controllers}
        self._counts_at_start: dict[str, tuple[int, int]] = {}

    @staticmethod
    def _settings(c, name: str, on: bool, budget: int | None) -> InterfaceSettings:
        """Interface ``name``'s settings: the table's, overridden by ``per_interface.<name>``; all off unless ``on``."""
        o = c.per_interface.get(name)

        def pick(key: str):
            own = getattr(o, key) if o is not None else None
            return getattr(c, key) if own is None else own

        reuse = on and c.method == "splitcom" and (o is None or o.reuse is not False)
        return InterfaceSettings(
            kind=name, field=INTERFACES[name][0], codec=pick("codec") if on else "none", reuse=reuse,
            metric=c.metric, projection_dim=c.projection_dim, cache_dtype=getattr(torch, c.cache_dtype),
            receiver_budget_bytes=budget, residual=on and reuse and pick("residual"),
            error_feedback=on and not reuse and pick("error_feedback"), entropy=c.entropy if on else "none",
            resend_budget=c.resend_budget if reuse else None)

    def __getitem__(self, name: str) -> Interface:
        return self.ifaces[name]

    def start_session(self) -> None:
        self.thetas = {name: ctrl.start_session() for name, ctrl in self.controllers.items()}
        self._counts_at_start = {n: (i.counts.sent, i.counts.total) for n, i in self.ifaces.items()}

    def end_session(self, round: int, client: int, loss: float, progress: float, ledger: Ledger) -> None:
        for name, ctrl in self.controllers.items():
            iface = self.ifaces[name]
            sent0, total0 = self._counts_at_start[name]
            total = iface.counts.total - total0
            direction = INTERFACES[name][1]
            ctrl.end_session(SessionObservation(
                train_loss=loss, upload_ratio=(iface.counts.sent - sent0) / total if total else 1.0,
                bytes_sent=ledger.bytes(round=round, client=client, kind=name, direction=direction),
                bytes_full=ledger.baseline_bytes(round=round, client=client, kind=name, direction=direction),
                progress=progress))
            self.trajectory[name].append([round, client, self.thetas[name]])

    def count(self, sends: list[tuple[str, int, int, int]]) -> None:
        """Add the reuse counts of messages sent by a side that ran in a worker's copy of the channels."""
        for name, sent, total, epoch in sends:
            self.ifaces[name].counts.add(sent, total, epoch)

    def observe_eval(self, eval_ppl: float) -> None:
        for ctrl in self.controllers.values():
            ctrl.observe_eval(eval_ppl)

    # -- the reuse caches of one side (a client's travel with it on Ray; the server's stay on its worker) ------
    def _stores(self, side: str) -> dict[str, TensorStore]:
        """The stores ``side`` ("client" or "server") keeps: its senders' where it sends, its receivers' where
        it receives."""
        out = {}
        for name, iface in self.ifaces.items():
            if iface.sender is None:
                continue
            if INTERFACES[name][2] == side:
                out[f"{name}.projections"] = iface.sender.projections
                if iface.sender.held is not None:
                    out[f"{name}.held"] = iface.sender.held
                out[f"{name}.credit"] = iface.sender.credit
            else:
                out[f"{name}.received"] = iface.receiver.store
        for name, iface in self.ifaces.items():
            if iface.feedback is not None and INTERFACES[name][2] == side:
                out[f"{name}.feedback"] = iface.feedback.store
        return out

    def export_caches(self, side: str, client: int | None = None, samples: set[int] | None = None) -> dict:
        """``side``'s cache entries (of ``client``, of its ``samples``, when given) as store states."""
        def wanted(key: tuple) -> bool:
            in_samples = samples is None or key[1] in samples or key[1] == CREDIT  # the credit travels with them
            return (client is None or key[0] == client) and in_samples

        return {name: store.state_dict(wanted) for name, store in self._stores(side).items()}

    def update_caches(self, side: str, caches: dict) -> None:
        """Put the entries of ``caches`` (from :meth:`export_caches`) in ``side``'s stores."""
        for name, store in self._stores(side).items():
            store.update(caches[name])

    def load_caches(self, side: str, caches: dict, client: int | None = None) -> None:
        """Replace ``side``'s cache entries (``client``'s only, when given) with those of ``caches``."""
        for store in self._stores(side).values():
            store.discard(lambda key: client is None or key[0] == client)
        self.update_caches(side, caches)

    # -- state --------------------------------------------------------------------------------
    def round_state(self) -> dict:
        """A copy of everything but the caches (controllers, counts, trajectories), to undo a failed round."""
        return copy.deepcopy({"controllers": {n: c.state_dict() for n, c in self.controllers.items()},
                              "counts": {n: i.counts for n, i in self.ifaces.items()},
                              "trajectory": self.trajectory})

    def load_round_state(self, state: dict) -> None:
        for name, ctrl in self.controllers.items():
            ctrl.load_state_dict(state["controllers"][name])
        for name, iface in self.ifaces.items():
            iface.counts = state["counts"][name]
        self.trajectory = state["trajectory"]

    def state_dict(self) -> dict:
        return {"ifaces": {n: i.state_dict() for n, i in self.ifaces.items()},
                "controllers": {n: c.state_dict() for n, c in self.controllers.items()},
                "trajectory": self.trajectory}

    def load_state_dict(self, state: dict) -> None:
        for name, iface in self.ifaces.items():
            iface.load_state_dict(state["ifaces"][name])
        for name, ctrl in self.controllers.items():
            ctrl.load_state_dict(state["controllers"][name])
        self.trajectory = {n: [list(x) for x in t] for n, t in state["trajectory"].items()}

    def summary(self, ledger: Ledger) -> dict:
        """Reductions against the run's own uncompressed equivalent, upload ratios, threshold trajectories."""
        def reduction(actual: int, baseline: int) -> float:
            return 1.0 - actual / baseline if baseline else 0.0

        exchange_up = [n for n in self.ifaces if INTERFACES[n][1] == UP]
        exchange_down = [n for n in self.ifaces if INTERFACES[n][1] == DOWN]
        ex_up = sum(ledger.bytes(kind=n, direction=UP) for n in exchange_up)
        ex_up_base = sum(ledger.baseline_bytes(kind=n, direction=UP) for n in exchange_up)
        ex_all = ex_up + sum(ledger.bytes(kind=n, direction=DOWN) for n in exchange_down)
        ex_all_base = ex_up_base + sum(ledger.baseline_bytes(kind=n, direction=DOWN) for n in exchange_down)
        return {
            "comm": {
                "uplink_reduction": reduction(ledger.bytes(direction=UP), ledger.baseline_bytes(direction=UP)),
                "total_reduction": reduction(ledger.bytes(), ledger.baseline_bytes()),
                "exchange_uplink_reduction": reduction(ex_up, ex_up_base),
                "exchange_total_reduction": reduction(ex_all, ex_all_base),
                "uncompressed_uplink_bytes": ledger.baseline_bytes(direction=UP),
                "uncompressed_total_bytes": ledger.baseline_bytes(),
            },
            "compression": {
                name: {
                    "codec": iface.s.codec, "reuse": iface.s.reuse, "upload_ratio": iface.counts.ratio,
                    "upload_ratio_per_epoch": {str(e): s / t if t else 1.0
                                               for e, (s, t) in sorted(iface.counts.by_epoch.items())},
                    "threshold_trajectory": self.trajectory.get(name, []),
                    "bytes": ledger.bytes(kind=name), "uncompressed_bytes": ledger.baseline_bytes(kind=name),
                }
                for name, iface in self.ifaces.items()
            },
        }
