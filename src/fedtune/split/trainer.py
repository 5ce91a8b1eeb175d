"""What either side of a split session needs from the run, as one small public object the paradigm hands out.

The sides (:mod:`fedtune.split.session`) never see the paradigm: only the run context (model, device, config,
batches), the model cut into blocks, which LoRA weights live on which block, the interfaces' channels, and the
coders of the LoRA weights a client downloads and uploads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from fedtune.split.cut import Cut, CutError, SplitModel
from fedtune.training.steps import guarded_step
from fedtune.training.streams import SampleStream


def blocks_of_keys(keys, blocks_name: str) -> dict[str, int]:
    """The transformer block of each LoRA key (``<blocks_name>.<i>.``); keys outside the blocks are an error."""
    out = {}
    for key in keys:
        match = re.match(rf"{re.escape(blocks_name)}\.(\d+)\.", key)
        if not match:
            raise CutError(f"split learning needs LoRA on transformer blocks only; {key} is outside "
                           f"{blocks_name} (check lora.target_modules)")
        out[key] = int(match.group(1))
    return out


@dataclass
class SplitTrainer:
    """The run as a session's sides see it."""

    ctx: object  # the run context: model, device, cfg, indexed_batches
    split: SplitModel
    key_block: dict[str, int]  # LoRA key -> transformer block
    channels: object  # fedtune.compression.channels.SplitChannels: the interfaces with their codecs and caches
    tail: int  # U-shape: blocks at the end kept on the client (0: standard split)
    rows: list[list[int]]  # each client's training rows (its data stream's samples)
    download_coder: object  # fedtune.compression.adapters.AdapterCoder of the client's LoRA download
    upload_coder: object  # ... and of its upload (its change from what it downloaded)

    @property
    def num_layers(self) -> int:
        return self.split.num_layers

    def cut(self, head: int) -> Cut:
        return Cut(head, self.tail)

    def stream(self, cid: int, position: dict) -> SampleStream:
        """Client ``cid``'s data stream at ``position`` (a ``SampleStream.state_dict``)."""
        stream = SampleStream(self.rows[cid], self.ctx.cfg.seed, cid)
        stream.load_state_dict(position)
        return stream

    def keys(self, blocks: set[int]) -> list[str]:
        """The LoRA keys of ``blocks``."""
        return [k for k, b in self.key_block.items() if b in blocks]

    def client_keys(self, cut: Cut) -> list[str]:
        """The LoRA keys of the blocks on the client (what it downloads and uploads)."""
        return self.keys(set(cut.client_blocks(self.num_layers)))

    def params(self, blocks: set[int]) -> list[torch.nn.Parameter]:
        """The trainable parameters of ``blocks``, in block order."""
        return [p for b in sorted(blocks) for p in self.split.blocks[b].parameters() if p.requires_grad]

    def client_modules(self, cut: Cut) -> torch.nn.ModuleList:
        """Modules resident on the client: embeddings, head blocks, and for a U-shape tail, norm and LM head."""
        model, L = self.ctx.model, self.split.num_layers
        modules = [model.get_input_embeddings(), *(self.split.blocks[b] for b in range(cut.head))]
        if cut.tail:
            modules += [*(self.split.blocks[b] for b in range(L - cut.tail, L)), model.get_output_embeddings()]
        return torch.nn.ModuleList(modules)

    def server_modules(self, cut: Cut) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([self.split.blocks[b] for b in cut.body(self.split.num_layers)])

    def step(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Clip and step as every local step does (a non-finite gradient norm skips it: the reason is returned)."""
        failure = guarded_step(optimizer, self.ctx.cfg.train.max_grad_norm)
        optimizer.zero_grad(set_to_none=True)
        return failure
