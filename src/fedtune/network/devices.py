"""Device profiles: a client's sustained training throughput, memory for training, and transmit power.

Presets are order-of-magnitude figures for sustained (not peak) throughput of LoRA training in fp16/fp32
on each class of device; give your own with ``[devices.custom.NAME]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.core.errors import ConfigError


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops_per_s: float  # sustained training FLOP/s
    memory_bytes: int  # memory the client can give to training
    tx_power_w: float  # uplink transmit power (W)


GB = 10**9

PRESETS: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("phone", flops_per_s=0.5e12, memory_bytes=1 * GB, tx_power_w=0.2),
        DeviceProfile("jetson", flops_per_s=4e12, memory_bytes=4 * GB, tx_power_w=0.5),
        DeviceProfile("laptop", flops_per_s=8e12, memory_bytes=8 * GB, tx_power_w=0.3),
        DeviceProfile("workstation", flops_per_s=60e12, memory_bytes=24 * GB, tx_power_w=1.0),
    )
}


def client_profiles(cfg, num_clients: int) -> list[DeviceProfile] | None:
    """One profile per client from ``[devices]`` (a single name applies to all), or None if none is set."""
    names = cfg.profiles
    if not names:
        return None
    if len(names) not in (1, num_clients):
        raise ConfigError(f"devices.profiles has {len(names)} entries; give one, or one per client ({num_clients})")
    known = {**PRESETS, **{n: DeviceProfile(n, c.flops_per_s, int(c.memory_gb * GB), c.tx_power_w)
                           for n, c in cfg.custom.items()}}
    out = []
    for name in (names * num_clients if len(names) == 1 else names):
        if name not in known:
            raise ConfigError(f"devices.profiles: unknown device {name!r}; valid: {', '.join(sorted(known))}")
        out.append(known[name])
    return out
