"""Config tables of the federation, the clients' devices and the simulated wireless network."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from fedtune.config.base import Section, registered, registry_at


class FederationConfig(Section):
    num_clients: int = Field(4, ge=1, description="Number of simulated clients (partitions).")
    clients_per_round: int | None = Field(None, ge=1, description="Clients sampled each round; none = all.")
    min_clients: int = Field(1, ge=1, description="A round completes when at least this many of its sampled clients "
                             "replied (with the Ray backend a turn can be lost to a dead or late worker); at most "
                             "clients_per_round.")
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    stop_after_rejected_rounds: int | None = Field(
        3, ge=1, description="Stop the run (at that round's checkpoint, with an error) when every client asked in a "
        "round had its update rejected this many rounds in a row: the model is not being trained. none = never.")
    strategy: Annotated[str, registered("fedtune.federated.strategies:STRATEGIES")] = Field(
        "fedavg", description="Server aggregation strategy: 'fedavg', 'fedprox' (client proximal term), or a server "
        "optimizer on the mean client change: 'fedavgm' (momentum), 'fedadagrad', 'fedadam', 'fedyogi'.")
    lora_aggregation: Annotated[str, registered("fedtune.federated.strategies:AGGREGATION_SPACES")] = Field(
        "factors", description="Where the clients' LoRA adapters are averaged: 'factors' (A and B separately, as "
        "FedAvg of PEFT adapters does; not the mean of the updates B.A) or 'product' (each module's B.A averaged, "
        "then re-factorised to the global rank by truncated SVD: exact up to that truncation).")
    proximal_mu: float = Field(0.01, ge=0, description="FedProx proximal coefficient mu.")
    server_lr: float | None = Field(None, gt=0, description="Server learning rate of the server optimizers; none = "
                                    "the strategy's default (fedavgm 1.0; fedadagrad, fedadam, fedyogi 0.01).")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="Server momentum beta (fedavgm).")
    server_betas: tuple[float, float] = Field((0.9, 0.99), description="Server first and second moment betas "
                                              "(fedadam, fedyogi; fedadagrad uses the first).")
    server_eps: float = Field(1e-3, gt=0, description="Server adaptivity tau added to sqrt(v) (fedadagrad, fedadam, "
                              "fedyogi).")


    @model_validator(mode="after")
    def _sampling(self) -> "FederationConfig":
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.clients_per_round}) exceeds "
                f"federation.num_clients ({self.num_clients}); allowed: 1..{self.num_clients}"
            )
        if self.min_clients > self.sampled:
            raise ValueError(f"federation.min_clients ({self.min_clients}) exceeds the {self.sampled} clients sampled "
                             f"per round; allowed: 1..{self.sampled}")
        return self

    @property
    def sampled(self) -> int:
        return self.clients_per_round or self.num_clients


class CustomDevice(Section):
    flops_per_s: float = Field(gt=0, description="Sustained training throughput, FLOP/s.")
    memory_gb: float = Field(gt=0, description="Memory available for training, GB (10^9 bytes).")
    tx_power_w: float = Field(0.2, gt=0, description="Uplink transmit power, W.")


class DevicesConfig(Section):
    profiles: list[str] = Field(
        default_factory=list, description="Device per client (one name for all, or one per client): presets "
        "'phone', 'jetson', 'laptop', 'workstation', or a name defined under [devices.custom].")
    custom: dict[str, CustomDevice] = Field(default_factory=dict, description="Your own device profiles by name.")

    @model_validator(mode="after")
    def _known_profiles(self) -> "DevicesConfig":
        known = {*registry_at("fedtune.network.devices:PRESETS"), *self.custom}
        for name in self.profiles:
            if name not in known:
                raise ValueError(f"devices.profiles: unknown device {name!r}; valid: {', '.join(sorted(known))}")
        return self


class NetworkConfig(Section):
    """The simulated wireless network that turns bytes and FLOPs into seconds (off while planner = 'none')."""

    planner: Annotated[str, registered("fedtune.network.planner:PLANNERS", "none")] = Field(
        "none", description="Simulated wireless network and its per-round plan: 'none' (no network: simulated time "
        "is 0), 'equal' (equal bandwidth, no pruning), 'bandwidth_only', 'pruning_only', 'uniform_pruning', or "
        "'jcpba' (per-client pruning rates and bandwidth shares minimising round latency). Every other [network] "
        "key has a default.")
    bandwidth_hz: float = Field(20e6, gt=0, description="Total uplink band B shared by a round's clients (FDMA "
                                "shares), Hz; the downlink broadcast uses all of it.")
    noise_dbm_per_hz: float = Field(-174.0, description="Noise power spectral density N0, dBm/Hz.")
    path_loss_ref_db: float = Field(128.1, description="Path loss at path_loss_ref_m, dB (default: 3GPP urban "
                                    "macro, 128.1 + 37.6 log10(d / 1 km)).")
    path_loss_ref_m: float = Field(1000.0, gt=0, description="Reference distance of path_loss_ref_db, m.")
    path_loss_exponent: float = Field(3.76, gt=0, description="Path-loss exponent n: "
                                      "PL(d) = path_loss_ref_db + 10 n log10(d / path_loss_ref_m).")
    fading: Annotated[str, registered("fedtune.network.channel:FADING")] = Field("rayleigh", description="Block fading, redrawn every round: 'rayleigh' (|h|^2 ~ Exp(1)) or "
                        "'none' (path loss only).")
    distances_m: list[float] = Field(
        default_factory=list, description="Client distances to the server, m (one for all, or one per client); "
        "empty: drawn once (seeded), uniformly over the area between min_distance_m and max_distance_m.")
    min_distance_m: float = Field(50.0, gt=0, description="Inner radius of the drawn client positions, m.")
    max_distance_m: float = Field(500.0, gt=0, description="Outer radius of the drawn client positions, m.")
    server_tx_power_w: float = Field(20.0, gt=0, description="Server transmit power of the downlink broadcast, W "
                                     "(clients' uplink power comes from their device profiles).")
    deadline_s: float | None = Field(None, gt=0, description="Round deadline, simulated seconds: a client finishing "
                                     "later is a straggler, left out of the round's aggregate (FedLLM) and counted; "
                                     "in FedLLM a client that could not meet it even alone on the whole band is left "
                                     "out before the round (out of reach). none = wait for every client.")
    rho_max: float = Field(0.5, ge=0, le=0.9, description="Largest pruning rate the planner may give a client.")
    mean_rho_budget: float = Field(0.3, ge=0, le=0.9, description="Quality constraint: the mean pruning rate over a "
                                   "round's clients stays within this.")
    latency_slack: float = Field(0.02, ge=0, le=1, description="JCPBA: round latency accepted above the fastest "
                                 "plan (a fraction of it) in exchange for less pruning: the plan is the least total "
                                 "pruning that meets it. 0: the fastest plan, pruning only where it buys time.")
    energy_pj_per_flop: float = Field(5.0, ge=0, description="Client compute energy per FLOP, pJ (energy = uplink "
                                      "power x upload seconds + this x FLOPs); 0 counts radio energy only.")



    @field_validator("distances_m")
    @classmethod
    def _distances(cls, v: list[float]) -> list[float]:
        bad = [d for d in v if not d > 0]
        if bad:
            raise ValueError(f"network.distances_m entries must be > 0 m, got {bad}")
        return v

    @model_validator(mode="after")
    def _ring(self) -> "NetworkConfig":
        if self.min_distance_m >= self.max_distance_m:
            raise ValueError(f"network.min_distance_m ({self.min_distance_m}) must be below "
                             f"network.max_distance_m ({self.max_distance_m})")
        return self

    @property
    def enabled(self) -> bool:
        return self.planner != "none"
