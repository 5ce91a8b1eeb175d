"""FedLLM's cross-checks of its settings (pruning, ranks, strategies, secure aggregation, differential privacy):
each raises ValueError naming the keys that cannot go together."""

from __future__ import annotations

from fedtune.federated.ranks import check_ranks
from fedtune.federated.strategies import needs_whole_updates
from fedtune.core.errors import ConfigError
from fedtune.network.planner import PRUNING_PLANNERS
from fedtune.privacy.client_dp import ClientDP


def check_fedllm_config(cfg) -> None:
    n, rates = cfg.federation.num_clients, cfg.pruning.rates
    if len(rates) not in (0, 1, n):
        raise ValueError(f"pruning.rates has {len(rates)} entries but federation.num_clients = {n}; "
                         "give one rate for all clients or one per client")
    if cfg.deploy.secure_aggregation:
        check_secure_aggregation(cfg)
    net = cfg.network
    pruned = any(rates) or (net.enabled and net.planner in PRUNING_PLANNERS and net.rho_max > 0)
    check_ranks(cfg, pruned)
    needs = needs_whole_updates(cfg.federation)
    if needs and (pruned or cfg.deploy.secure_aggregation):
        raise ValueError(f"{needs} needs each client's whole update, which pruned clients (pruning.rates, "
                         f"network.planner in {PRUNING_PLANNERS}) and a secure sum (deploy.secure_aggregation) "
                         "do not give the server")
    if cfg.privacy.client_level:
        check_client_dp(cfg, pruned, needs)
    if cfg.privacy.sample_dp and cfg.federation.strategy in ("fedprox", "scaffold"):
        raise ValueError(f"privacy.sample_dp clips per-sample gradients of the loss; federation.strategy = "
                         f"{cfg.federation.strategy!r} changes the client's gradient outside them (a proximal term, "
                         "a control variate), which DP-SGD would not bound: use fedavg or a server optimizer")


def check_client_dp(cfg, pruned: bool, needs: str) -> None:
    """Client-level DP bounds each client's whole, equally shaped update and averages them unweighted."""
    mode = f"privacy.client_dp = {cfg.privacy.client_dp!r}"
    if pruned:
        raise ValueError(f"{mode} clips and noises whole adapters; pruned clients (pruning.rates, network.planner "
                         f"in {PRUNING_PLANNERS}) upload parts of one: use network.planner 'equal' or "
                         "'bandwidth_only', or pruning.rates = []")
    if cfg.lora.ranks or cfg.lora.profile_ranks:
        raise ValueError(f"{mode} needs every client at the global LoRA rank: set lora.ranks = [] and "
                         "lora.profile_ranks = {}")
    if needs:
        raise ValueError(f"{mode} releases only the noised mean of the clipped adapters, but {needs} needs each "
                         "client's whole update (its extra state would leave the client unprotected)")
    if cfg.deploy.secure_aggregation:
        raise ValueError(f"{mode}: deploy.secure_aggregation's sum is sample-weighted; DP's mean is unweighted "
                         "(set deploy.secure_aggregation = false)")
    try:
        ClientDP(cfg)  # calibrates the noise and checks adaptive clipping's share of it, before any loading
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def check_secure_aggregation(cfg) -> None:
    """What a secure sum (the server sees only the weighted mean of equally shaped adapters) rules out."""
    if cfg.runtime.backend != "flower":
        raise ValueError("deploy.secure_aggregation runs Flower's SecAgg+ between a ServerApp and its "
                         f"SuperNodes: set runtime.backend = 'flower' (it is {cfg.runtime.backend!r})")
    if any(cfg.pruning.rates):
        raise ValueError("deploy.secure_aggregation cannot average pruned adapters per coordinate (a secure "
                         "sum adds equally shaped vectors): set pruning.rates = []")
    if cfg.network.enabled:
        raise ValueError("deploy.secure_aggregation cannot follow a simulated network's plan (pruned clients, "
                         "and stragglers left out once their masked adapters are in the sum): set "
                         "network.planner = 'none'")
    if cfg.federation.sampled < 2:
        raise ValueError("deploy.secure_aggregation needs at least 2 clients per round "
                         "(federation.clients_per_round)")
    if cfg.federation.sampled * cfg.deploy.secagg_quantization_range >= 2**32:
        raise ValueError(f"{cfg.federation.sampled} clients per round x deploy.secagg_quantization_range "
                         f"{cfg.deploy.secagg_quantization_range} overflows SecAgg+'s 2^32 modulus: lower "
                         "the quantization range")
