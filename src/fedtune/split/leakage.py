"""What split learning leaks: how many of a client's input tokens the server recovers from cut-layer activations.

The attacker is the server. It knows the public base model (its weights are public) but not the client's trained
LoRA, so the probe runs on the base model: a plain Hugging Face causal LM or one wrapped with freshly initialised
LoRA (which does not change outputs at init). It sees, per position, the hidden states leaving block ``cut - 1``,
with the client's activation noise (:func:`noisy_activations`, the very function the client uploads through), and
tries two attacks:

- **nearest neighbour**: every vocabulary token is passed alone (a length-1 sequence, position 0) through blocks
  ``[0, cut)``; a received activation is read as the token whose isolated activation is nearest by cosine
  similarity. Cosine, not Euclidean distance: the activation norm grows with depth and position while its
  direction carries the token, and noise scaled to the RMS changes norms more than directions.
- **learned inverter**: a small per-position MLP trained with cross-entropy on *public* text through the same
  frozen client blocks (noised as the client would noise them), then applied to the client's private text.

Recovery is the share of real (attention mask 1) positions read back as their token; chance is ``1 / vocab`` and,
stronger, the share of the victims' most common token (always guessing it).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.core.seeding import derive_seed, numpy_rng, seed_torch
from fedtune.data.formatting import collate
from fedtune.split.cut import SplitModel

DEFAULT_CUTS = (1, 2, 3, 6)


def activation_rms(act: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Root mean square of ``act`` (B, T, d) over the real positions of ``mask`` (B, T)."""
    return act[mask.bool()].float().pow(2).mean().sqrt()


def noisy_activations(act: torch.Tensor, mask: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``act`` plus Gaussian noise of std ``ratio`` x its RMS over real tokens, on the real positions only.

    ``ratio`` 0 returns ``act`` itself and draws nothing. The noise is drawn from ``generator`` (on its device) in
    float32, so one seed gives one noise on any device."""
    if ratio == 0:
        return act
    noise = torch.randn(act.shape, generator=generator, device=generator.device, dtype=torch.float32).to(act.device)
    std = ratio * activation_rms(act, mask)
    return act + (noise * std * mask[..., None].to(act.device)).to(act.dtype)


def noise_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded by ``derive_seed(seed, *keys)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def usable_cuts(cuts: Sequence[int], num_layers: int) -> list[int]:
    """The distinct cuts of ``cuts`` the model allows (1 <= cut < number of blocks), ascending."""
    return sorted({c for c in cuts if 1 <= c < num_layers})


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout), restored afterwards; no gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def activations_by_cut(split: SplitModel, cuts: list[int], input_ids: torch.Tensor,
                       mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """The hidden states leaving block ``cut - 1`` for each of ``cuts`` (ascending), each slice run once."""
    out, hidden, start = {}, None, 0
    for cut in cuts:
        if start == 0:
            hidden = split.run(0, cut, input_ids=input_ids, attention_mask=mask)
        else:
            hidden = split.run(start, cut, hidden=hidden, attention_mask=mask)
        out[cut], start = hidden, cut
    return out


def isolated_vocabulary(split: SplitModel, cuts: list[int], vocab_size: int, chunk: int,
                        device: torch.device) -> dict[int, torch.Tensor]:
    """Per cut, the unit-norm activation (vocab, d) of every token alone at position 0, in chunks of ``chunk``."""
    parts: dict[int, list[torch.Tensor]] = {c: [] for c in cuts}
    for first in range(0, vocab_size, chunk):
        ids = torch.arange(first, min(first + chunk, vocab_size), device=device)[:, None]
        for cut, act in activations_by_cut(split, cuts, ids, torch.ones_like(ids)).items():
            parts[cut].append(F.normalize(act[:, 0].float(), dim=-1))
    return {c: torch.cat(p) for c, p in parts.items()}


@dataclass
class Positions:
    """The real positions of some texts: their token ids and, per cut, the batches' activations and masks."""

    ids: torch.Tensor  # (N,) token ids of the real positions
    batches: list[tuple[torch.Tensor, dict[int, torch.Tensor]]]  # (mask, {cut: activations}) per batch

    def received(self, cut: int, ratio: float, seed: int, role: str) -> torch.Tensor:
        """(N, d) activations at ``cut`` of the real positions, noised per batch as the client noises an upload."""
        rows = []
        for index, (mask, acts) in enumerate(self.batches):
            noisy = noisy_activations(acts[cut], mask, ratio, noise_generator(seed, "leakage-noise", role, index))
            rows.append(noisy[mask.bool()].float())
        return torch.cat(rows)


def text_positions(split: SplitModel, cuts: list[int], texts: Sequence[Sequence[int]], pad_token_id: int,
                   batch_size: int, device: torch.device) -> Positions:
    """Run ``texts`` (token id lists) through the client blocks in right-padded batches, as a client does."""
    ids, batches = [], []
    for first in range(0, len(texts), batch_size):
        batch = collate([{"input_ids": t, "labels": t} for t in texts[first:first + batch_size]], pad_token_id)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        batches.append((mask, activations_by_cut(split, cuts, input_ids, mask)))
        ids.append(input_ids[mask.bool()])
    return Positions(torch.cat(ids).cpu(), batches)


def nearest_tokens(received: torch.Tensor, vocabulary: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """The token whose unit isolated activation (row of ``vocabulary``) is most cosine-similar to each row."""
    picks = [(F.normalize(r, dim=-1) @ vocabulary.T).argmax(-1) for r in received.split(chunk)]
    return torch.cat(picks).cpu()


class TokenInverter(nn.Module):
    """One position's activation -> a token: LayerNorm, a 2-layer MLP, logits over the tokens seen in training
    (a token absent from the public text could never be learned)."""

    def __init__(self, dim: int, hidden: int, classes: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("classes", classes)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, len(classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        return torch.cat([self.classes[self(part).argmax(-1)] for part in x.split(chunk)]).cpu()


@dataclass(frozen=True)
class InverterSettings:
    steps: int = 300
    batch: int = 512
    hidden: int = 512
    lr: float = 3e-3


def train_inverter(features: torch.Tensor, ids: torch.Tensor, settings: InverterSettings, seed: int,
                   *keys: int | str) -> TokenInverter:
    """A :class:`TokenInverter` trained ``settings.steps`` Adam steps on (activation, token) pairs; seeded by
    ``seed`` and ``keys`` (initialisation and batches), so deterministic."""
    classes = torch.unique(ids)
    targets = torch.searchsorted(classes, ids).to(features.device)
    seed_torch(seed, "leakage-inverter", *keys)
    inverter = TokenInverter(features.shape[1], settings.hidden, classes.to(features.device)).to(features.device)
    opt = torch.optim.Adam(inverter.parameters(), lr=settings.lr)
    rng = numpy_rng(seed, "leakage-inverter-batches", *keys)
    with torch.enable_grad():
        for _ in range(settings.steps):
            rows = torch.as_tensor(rng.integers(0, len(ids), settings.batch), device=features.device)
            loss = F.cross_entropy(inverter(features[rows]), targets[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return inverter.eval()


@dataclass(frozen=True)
class LeakageRow:
    """Token recovery at one cut and noise ratio (rates in [0, 1])."""

    cut: int
    noise: float
    nearest_neighbour: float
    learned: float
    chance_uniform: float
    chance_majority: float
    tokens: int
    seconds: float


@dataclass
class LeakageReport:
    rows: list[LeakageRow]
    vocab_size: int
    num_layers: int
    victim_texts: int
    public_texts: int
    public_tokens: int
    seconds: float  # the whole probe, shared forward passes included
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def recovery(predicted: torch.Tensor, ids: torch.Tensor) -> float:
    return float((predicted == ids).float().mean())


def majority_rate(ids: torch.Tensor) -> float:
    """The share of ``ids`` that are its most common token."""
    return float(torch.bincount(ids).max()) / len(ids)


def probe_leakage(model: nn.Module, victims: Sequence[Sequence[int]], public: Sequence[Sequence[int]],
                  pad_token_id: int, *, cuts: Sequence[int] = DEFAULT_CUTS, noise: Sequence[float] = (0.0,),
                  seed: int = 0, batch_size: int = 8, chunk: int = 2048,
                  inverter: InverterSettings = InverterSettings()) -> LeakageReport:
    """Token recovery of both attacks per (cut, noise ratio) on the ``victims`` (the client's private texts, token id
    lists), the inverter trained on ``public`` texts. ``model``: the public base model (see the module docstring);
    cuts the model does not allow (cut >= number of blocks) are left out."""
    started = time.perf_counter()
    split = SplitModel(model)
    cuts = usable_cuts(cuts, split.num_layers)
    device = next(model.parameters()).device
    vocab_size = model.get_input_embeddings().num_embeddings
    with eval_mode(model):
        vocabulary = isolated_vocabulary(split, cuts, vocab_size, chunk, device)
        victim = text_positions(split, cuts, victims, pad_token_id, batch_size, device)
        known = text_positions(split, cuts, public, pad_token_id, batch_size, device)
        rows = []
        for cut in cuts:
            for index, ratio in enumerate(noise):
                t0 = time.perf_counter()
                received = victim.received(cut, ratio, seed, "victim")
                nearest = recovery(nearest_tokens(received, vocabulary[cut]), victim.ids)
                learner = train_inverter(known.received(cut, ratio, seed, "public"), known.ids, inverter, seed, cut,
                                         index)
                learned = recovery(learner.predict(received), victim.ids)
                rows.append(LeakageRow(cut, float(ratio), nearest, learned, 1 / vocab_size,
                                       majority_rate(victim.ids), len(victim.ids), time.perf_counter() - t0))
    return LeakageReport(rows, vocab_size, split.num_layers, len(victims), len(public), len(known.ids),
                         time.perf_counter() - started)
