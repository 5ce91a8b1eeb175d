"""Everything a run shares: config, device, the one base model with LoRA, data, partitions, ledger.

One base model lives in memory; a simulated client is only state (its data indices and position,
and whatever the paradigm keeps for it), loaded into the shared model when it trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from fedtune.comm.ledger import Ledger
from fedtune.comm.transport import Transport
from fedtune.config import RunConfig
from fedtune.data.formatting import collate, format_prompt, tokenize_examples
from fedtune.data.partition import partition_indices, partition_summary
from fedtune.data.references import reference_sets
from fedtune.data.sources import load_splits
from fedtune.engine.client_data import SampleStream
from fedtune.models.flops import ModelCost, model_cost
from fedtune.models.loading import load_model, resolve_device
from fedtune.models.lora import attach_lora
from fedtune.progress import RunProgress


@dataclass
class RunContext:
    cfg: RunConfig
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    base_model: torch.nn.Module
    train_samples: list[dict]
    eval_samples: list[dict]
    sample_prompt: str
    sample_reference: str
    metric_prompts: list[str]  # chat-formatted held-out prompts for the task metric
    metric_references: list[list[str]]  # all references of each
    partitions: list[list[int]]
    partition_info: dict
    cost: ModelCost
    ledger: Ledger
    transport: Transport
    progress: RunProgress
    run_dir: Path
    #: Optional per-round pruning-rate source (e.g. a JCPBA planner): ``round -> rates`` (a list indexed by client id,
    #: one value for all, or a {client: rate} mapping), or None to use ``[pruning] rates``. Read by FedLLM.
    pruning_rates: Callable[[int], Sequence[float] | Mapping[int, float] | None] | None = None
    #: Where client turns run (``fedtune.runtime``: in-process or Ray); created on first use by
    #: ``fedtune.runtime.backend_of(ctx)`` from ``runtime.backend``, closed by the runner.
    backend: object | None = None
    #: The simulated wireless network (``fedtune.network.simtime.NetworkSim``) when ``[network]`` is on: per-round
    #: plans, straggler checks, simulated seconds. Set by the runner.
    network: object | None = None

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def batches(self, stream: SampleStream, steps: int) -> Iterator[dict[str, torch.Tensor]]:
        """``steps`` collated batches drawn from ``stream`` (lazily, so a stopped run draws no more)."""
        for _, batch in self.indexed_batches(stream, steps):
            yield batch

    def indexed_batches(self, stream: SampleStream, steps: int) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Like :meth:`batches`, with the sample ids (training row indices) of each batch."""
        for _ in range(steps):
            rows = stream.take(self.cfg.train.batch_size)
            yield rows, collate([self.train_samples[i] for i in rows], self.pad_token_id)


def build_context(cfg: RunConfig, progress: RunProgress, run_dir: Path) -> RunContext:
    """Load model, tokenizer and data; tokenize; partition. Raises FedtuneError subclasses on bad input."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    base, tokenizer = load_model(cfg.model, device)
    from fedtune.paradigms import PARADIGMS

    rank_pattern = PARADIGMS.get(cfg.paradigm).lora_rank_pattern(cfg, base)
    model = attach_lora(base, cfg.lora, seed=cfg.seed, rank_pattern=rank_pattern)
    splits = load_splits(cfg.data, cfg.seed)
    train = tokenize_examples(splits.train, tokenizer, cfg.data.max_length, cfg.data.chat_template)
    evals = tokenize_examples(splits.eval, tokenizer, cfg.data.max_length, cfg.data.chat_template)
    parts = partition_indices(train, cfg.partition, cfg.federation.num_clients, cfg.seed, splits.label_column)
    label_column = cfg.partition.column or splits.label_column
    info = partition_summary(train, parts, label_column)
    info.update(method=cfg.partition.method, label_column=label_column)
    sample_index = min(cfg.eval.sample_index, len(splits.eval) - 1)
    sample = splits.eval[sample_index]
    references = reference_sets(splits.eval, cfg.eval.metric_samples) if cfg.eval.metric != "none" else []
    ledger = Ledger()
    return RunContext(
        cfg=cfg,
        device=device,
        model=model,
        tokenizer=tokenizer,
        base_model=base,
        train_samples=[{"input_ids": i, "labels": l} for i, l in zip(train["input_ids"], train["labels"])],
        eval_samples=[{"input_ids": i, "labels": l} for i, l in zip(evals["input_ids"], evals["labels"])],
        sample_prompt=format_prompt(tokenizer, sample["prompt"], cfg.data.chat_template),
        sample_reference=sample["response"],
        metric_prompts=[format_prompt(tokenizer, p, cfg.data.chat_template) for p, _ in references],
        metric_references=[refs for _, refs in references],
        partitions=parts,
        partition_info=info,
        cost=model_cost(model),
        ledger=ledger,
        transport=Transport(ledger),
        progress=progress,
        run_dir=Path(run_dir),
    )
