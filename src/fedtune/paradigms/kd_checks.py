"""KD-FedLLM's cross-checks of its settings: each raises ValueError naming the keys that cannot go together."""

from __future__ import annotations


def check_kd_config(cfg) -> None:
    names, known, n = cfg.kd.client_models, {"main", *cfg.kd.models}, cfg.federation.num_clients
    if len(names) not in (0, 1, n):
        raise ValueError(f"kd.client_models has {len(names)} entries but federation.num_clients = {n}; "
                         "give one name for all clients or one per client")
    if cfg.privacy.client_level and not cfg.kd.server_model:
        raise ValueError("privacy.client_dp with paradigm 'kd' needs kd.server_model = true: otherwise the "
                         "evaluated model is a client's own adapter, trained on its data without noise")
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"kd.client_models: unknown model(s) {unknown}; valid: {', '.join(sorted(known))} "
                         "(define others under [kd.models.NAME])")
