"""Heterogeneous LoRA ranks: each FedLLM client trains its own rank ``r_k`` <= the global rank ``R`` (``lora.r``).

A LoRA module's update is ``dW = s(r) * B @ A`` with PEFT's scale ``s(r) = alpha / r``, so the same update has
different factors at different ranks. Here every adapter is kept in the global scale: a client's download is the
global adapter's first ``r_k`` components with B rescaled by ``s(R) / s(r_k)``, so the client's ``dW`` is exactly
the global's leading part; its upload is mapped back the other way (:func:`to_global`). A client trains a genuine
rank-``r_k`` adapter: the shared model's rank-R modules hold it in their first components (the rest zero, and zero
they stay: their gradients vanish) and the scale is set to ``s(r_k)`` for the turn (:func:`client_rank`).

The aggregations (``lora.rank_aggregation``, :data:`RANK_AGGREGATIONS`) turn the clients' uploads into the next
global adapter (before the strategy's server step):

- ``zero_pad``: the naive baseline, each client's factors zero-padded to R and averaged (weighted by samples);
- ``hetlora``: zero-padded, each component averaged over the clients that hold it, weighted by samples times the
  norm of the client's update (HetLoRA, Cho et al. 2024); with ``lora.self_prune_share`` a client drops trailing
  components that carry less than that share of its update, and keeps the smaller rank;
- ``flexlora``: the weighted mean of the clients' full-size updates ``dW_k``, re-factorised to rank R by truncated
  SVD (FlexLoRA, Bai et al. 2024); a client's download is then the best rank-``r_k`` approximation of the global;
- ``flora``: the same exact weighted sum by stacking the clients' factors (FLoRA, Wang et al. 2024), re-factorised
  to R each round so the global rank does not grow with the clients, without forming any out x in matrix (QR of
  the stacked factors, SVD of their small core), each client's scale applied to its own factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from fedtune.config.base import registry_at
from fedtune.core.registry import Registry
from fedtune.federated.strategies import ClientUpdate, TensorDict, lora_pairs, refactorize, weighted_mean

#: name -> aggregate(global_state, [(update, rank)], global_rank, alpha) -> the next global adapter (rank R)
RANK_AGGREGATIONS: Registry[Callable[..., TensorDict]] = Registry("rank aggregation")


def client_ranks(cfg) -> list[int]:
    """Each client's LoRA rank from the run's config: ``lora.ranks`` (one for all or one per client), else
    ``lora.profile_ranks`` by the clients' device profiles, else ``lora.r`` for everyone."""
    n, lora = cfg.federation.num_clients, cfg.lora
    if lora.ranks:
        return list(lora.ranks) * n if len(lora.ranks) == 1 else list(lora.ranks)
    profiles = cfg.devices.profiles
    if lora.profile_ranks and profiles:
        names = profiles * n if len(profiles) == 1 else profiles
        return [lora.profile_ranks.get(name, lora.r) for name in names]
    return [lora.r] * n


def check_ranks(cfg, pruned: bool) -> None:
    """Per-client LoRA ranks: one for all or one per client, known profiles, and what they cannot combine with
    (``pruned``: the run prunes clients by choice, which the caller knows from its planners)."""
    n, lora, profiles = cfg.federation.num_clients, cfg.lora, cfg.devices.profiles
    if len(lora.ranks) not in (0, 1, n):
        raise ValueError(f"lora.ranks has {len(lora.ranks)} entries but federation.num_clients = {n}; give one "
                         "rank for all clients or one per client")
    if lora.profile_ranks:
        if not profiles:
            raise ValueError("lora.profile_ranks needs devices.profiles (one device for all or one per client)")
        known = {*registry_at("fedtune.network.devices:PRESETS"), *cfg.devices.custom}
        unknown = sorted(set(lora.profile_ranks) - known)
        if unknown:
            raise ValueError(f"lora.profile_ranks: unknown device {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(known))}")
    if all(r == lora.r for r in client_ranks(cfg)):
        return
    fed = cfg.federation
    if fed.strategy not in ("fedavg", "fedprox") or fed.lora_aggregation != "factors":
        raise ValueError(f"clients of different LoRA ranks are aggregated by lora.rank_aggregation; "
                         f"federation.strategy = {fed.strategy!r} and lora_aggregation = "
                         f"{fed.lora_aggregation!r} do not apply to them: use 'fedavg' or 'fedprox' and 'factors'")
    if pruned or cfg.deploy.secure_aggregation:
        raise ValueError("clients of different LoRA ranks cannot also be pruned (pruning.rates, a pruning "
                         "network.planner) or securely summed (deploy.secure_aggregation)")


def scale(alpha: float, rank: int) -> float:
    return alpha / rank


def from_global(state: TensorDict, rank: int, global_rank: int) -> TensorDict:
    """A rank-``rank`` client's adapter from the global one: the first components, B rescaled to the client's
    scale (so that ``s(rank) B_k A_k`` is the leading part of the global's ``s(R) B A``)."""
    out = dict(state)
    for a, b in lora_pairs(state).values():
        out[a] = state[a][:rank].clone()
        out[b] = (state[b][:, :rank] * (rank / global_rank)).to(state[b].dtype)
    return out


def to_global(state: TensorDict, rank: int, global_rank: int) -> TensorDict:
    """A rank-``rank`` client's adapter in the global's shape and scale: zero-padded to R, B rescaled."""
    out = dict(state)
    for a, b in lora_pairs(state).values():
        out[a] = _pad_rows(state[a], global_rank)
        out[b] = _pad_rows((state[b] * (global_rank / rank)).to(state[b].dtype).T, global_rank).T.contiguous()
    return out


def into_container(state: TensorDict, global_rank: int) -> TensorDict:
    """A rank-``r`` adapter as the shared model's rank-R modules hold it: its factors unscaled in the first
    components, zeros after (trained under :func:`client_rank`)."""
    out = dict(state)
    for a, b in lora_pairs(state).values():
        out[a] = _pad_rows(state[a], global_rank)
        out[b] = _pad_rows(state[b].T, global_rank).T.contiguous()
    return out


def out_of_container(state: TensorDict, rank: int) -> TensorDict:
    """The first ``rank`` components of a container's adapter (inverse of :func:`into_container`)."""
    out = dict(state)
    for a, b in lora_pairs(state).values():
        out[a] = state[a][:rank].contiguous()
        out[b] = state[b][:, :rank].contiguous()
    return out


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


@contextmanager
def client_rank(model: torch.nn.Module, rank: int) -> Iterator[None]:
    """Every LoRA layer's scale set to that of rank ``rank`` (PEFT's ``alpha / r``) for the duration."""
    from peft.tuners.lora import LoraLayer

    saved = []
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, value in module.scaling.items():
                saved.append((module, name, value))
                module.scaling[name] = value * module.r[name] / rank
    try:
        yield
    finally:
        for module, name, value in saved:
            module.scaling[name] = value


def self_pruned_rank(state: TensorDict, rank: int, share: float) -> int:
    """HetLoRA's rank self-pruning: drop trailing components while the last one carries less than ``share`` of the
    update's squared norm (components measured as ``||B[:, i]|| * ||A[i]||``, summed over modules); at least 1."""
    pairs = list(lora_pairs(state).values())
    if share <= 0 or not pairs:
        return rank
    weight = sum((state[b][:, :rank].float().norm(dim=0) * state[a][:rank].float().norm(dim=1)) ** 2
                 for a, b in pairs)
    total = float(weight.sum())
    while rank > 1 and total > 0 and float(weight[rank - 1]) < share * total:
        total -= float(weight[rank - 1])
        rank -= 1
    return rank


def upload_at_own_rank(update: TensorDict, rank: int, lora) -> tuple[TensorDict, int]:
    """A client's upload at its own rank and that rank; with hetlora the client first drops trailing components that
    carry too little of its update (:func:`self_pruned_rank`) and keeps the smaller rank (the server learns it from
    the upload's meta)."""
    if lora.rank_aggregation != "hetlora":
        return update, rank
    kept = self_pruned_rank(update, rank, lora.self_prune_share)
    return out_of_container(update, kept), kept


@RANK_AGGREGATIONS.register("zero_pad")
def zero_pad(global_state: TensorDict, uploads: list[tuple[ClientUpdate, int]], global_rank: int,
             alpha: float) -> TensorDict:
    """Sample-weighted mean of the zero-padded factors (in the global scale)."""
    padded = [ClientUpdate(u.client, u.num_samples, to_global(u.tensors, r, global_rank), u.train_loss)
              for u, r in uploads]
    return weighted_mean(padded)


@RANK_AGGREGATIONS.register("hetlora")
def hetlora(global_state: TensorDict, uploads: list[tuple[ClientUpdate, int]], global_rank: int,
            alpha: float) -> TensorDict:
    """Zero-padded factors, each component averaged over the clients holding it, weights samples x ||dW_k||."""
    out = zero_pad(global_state, uploads, global_rank, alpha)  # the tensors that are not LoRA pairs
    norms = [_update_norm(u.tensors, r, alpha) for u, r in uploads]
    weights = [u.num_samples * n for (u, _), n in zip(uploads, norms)]
    if sum(weights) <= 0:
        return out
    for a, b in lora_pairs(global_state).values():
        acc_a = torch.zeros_like(global_state[a], dtype=torch.float64)
        acc_b = torch.zeros_like(global_state[b], dtype=torch.float64)
        cover = torch.zeros(global_rank, dtype=torch.float64)
        for (u, r), w in zip(uploads, weights):
            g = to_global(u.tensors, r, global_rank)
            acc_a += g[a].double() * w
            acc_b += g[b].double() * w
            cover[:r] += w
        held = cover > 0
        acc_a[held] /= cover[held, None]
        acc_b[:, held] /= cover[held]
        acc_a[~held], acc_b[:, ~held] = global_state[a][~held].double(), global_state[b][:, ~held].double()
        out[a], out[b] = acc_a.to(global_state[a].dtype), acc_b.to(global_state[b].dtype)
    return out


def _update_norm(state: TensorDict, rank: int, alpha: float) -> float:
    """||s(r) B A||_F over all modules."""
    return sum(float((scale(alpha, rank) * state[b].double() @ state[a].double()).square().sum())
               for a, b in lora_pairs(state).values()) ** 0.5


@RANK_AGGREGATIONS.register("flexlora")
def flexlora(global_state: TensorDict, uploads: list[tuple[ClientUpdate, int]], global_rank: int,
             alpha: float) -> TensorDict:
    """The sample-weighted mean of the full-size updates, re-factorised to rank R by truncated SVD."""
    out = zero_pad(global_state, uploads, global_rank, alpha)
    total = float(sum(u.num_samples for u, _ in uploads))
    for a, b in lora_pairs(global_state).values():
        mean = sum(scale(alpha, r) * (u.tensors[b].double() @ u.tensors[a].double()) * (u.num_samples / total)
                   for u, r in uploads)
        new_b, new_a = refactorize(mean / scale(alpha, global_rank), global_rank)
        out[a], out[b] = new_a.to(global_state[a].dtype), new_b.to(global_state[b].dtype)
    return out


@RANK_AGGREGATIONS.register("flora")
def flora(global_state: TensorDict, uploads: list[tuple[ClientUpdate, int]], global_rank: int,
          alpha: float) -> TensorDict:
    """The exact weighted sum by stacking (B_stack = [w_k s_k B_k], A_stack = [A_k]), re-factorised to rank R from
    the QR factors of the stack: no out x in matrix is formed."""
    out = zero_pad(global_state, uploads, global_rank, alpha)
    total = float(sum(u.num_samples for u, _ in uploads))
    for a, b in lora_pairs(global_state).values():
        b_stack = torch.cat([u.tensors[b].double() * (scale(alpha, r) * u.num_samples / total) for u, r in uploads],
                            dim=1)
        a_stack = torch.cat([u.tensors[a].double() for u, _ in uploads], dim=0)
        qb, rb = torch.linalg.qr(b_stack)
        qa, ra = torch.linalg.qr(a_stack.T)
        core_b, core_a = refactorize(rb @ ra.T / scale(alpha, global_rank), global_rank)
        out[a] = (core_a @ qa.T).to(global_state[a].dtype)
        out[b] = (qb @ core_b).to(global_state[b].dtype)
    return out
