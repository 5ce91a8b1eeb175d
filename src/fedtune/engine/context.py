"""Everything a run shares: config, device, the one base model with LoRA, data, partitions, ledger, backend, network.

One base model lives in memory; a simulated client is only state (its data indices and position, and whatever the
paradigm keeps for it), loaded into the shared model when it trains. :func:`build_context` is the one place a run
is assembled: the runner, every Ray worker's copy of the run (:func:`build_worker_copy`) and, weightless (the model
on PyTorch's ``meta`` device: shapes only), ``fedtune plan``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from fedtune.comm.ledger import Ledger
from fedtune.comm.transport import Transport
from fedtune.config import RunConfig
from fedtune.core.errors import ConfigError, DataError
from fedtune.core.progress import RunProgress
from fedtune.data.formatting import collate, format_prompt, tokenize_examples
from fedtune.data.references import reference_sets
from fedtune.data.sources import DataSplits, load_splits
from fedtune.models.flops import ModelCost, model_cost
from fedtune.models.loading import (
    convert_bundled,
    load_model,
    load_tokenizer,
    needs_conversion,
    resolve_device,
    weightless_model,
)
from fedtune.models.lora import attach_lora
from fedtune.network.simtime import DEFAULT_DEVICE, NetworkSim, default_profiles
from fedtune.network.workload import round_workload
from fedtune.paradigms import PARADIGMS, Paradigm
from fedtune.runtime.base import Backend, make_backend
from fedtune.training.streams import SampleStream


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
    partitions: list[list[int]]  # each client's training rows (rows the paradigm reserves already left out)
    partition_info: dict
    cost: ModelCost
    ledger: Ledger
    transport: Transport
    progress: RunProgress
    run_dir: Path
    #: Where client turns run (``fedtune.runtime``: in-process or Ray); closed by the runner.
    backend: Backend | None = None
    #: The simulated wireless network (``fedtune.network.simtime.NetworkSim``) when ``[network]`` is on: per-round
    #: plans (band shares, pruning rates the paradigm asks it for), straggler checks, simulated seconds.
    network: NetworkSim | None = None
    #: Training rows the paradigm reserves for itself (KD's public set: ``Paradigm.reserved_rows``), in no partition.
    public_rows: list[int] = field(default_factory=list)
    #: A deployed client's own copy (:mod:`fedtune.engine.client_copy`): its data only; it evaluates what only it
    #: holds (KD's own adapter) on ``eval_samples``, the held-out file its SuperNode was given.
    client_side: bool = False

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def batches(self, stream: SampleStream, steps: int,
                samples: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """``steps`` collated batches drawn from ``stream`` (lazily, so a stopped run draws no more); with
        ``samples`` (``fedtune.federated.sampling.local_samples``) the last batch holds what is left of them."""
        for _, batch in self.indexed_batches(stream, steps, samples):
            yield batch

    def indexed_batches(self, stream: SampleStream, steps: int,
                        samples: int | None = None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """Like :meth:`batches`, with the sample ids (training row indices) of each batch."""
        size = self.cfg.train.batch_size
        for step in range(steps):
            rows = stream.take(size if samples is None else max(1, min(size, samples - step * size)))
            yield rows, collate([self.train_samples[i] for i in rows], self.pad_token_id)


def build_model(cfg: RunConfig, device: torch.device, weightless: bool = False):
    """(base model, base model with the paradigm's LoRA); weightless: on the meta device. (The run's tokenizer is
    loaded apart, before the data: :func:`build_context`.)"""
    base = weightless_model(cfg.model) if weightless else load_model(cfg.model, device)[0]
    rank_pattern = PARADIGMS.get(cfg.paradigm).lora_rank_pattern(cfg, base)
    return base, attach_lora(base, cfg.lora, seed=cfg.seed, rank_pattern=rank_pattern)


def _check_sizes(cfg: RunConfig, num_eval: int) -> None:
    if cfg.eval.sample_index >= num_eval:
        raise ConfigError(f"eval.sample_index ({cfg.eval.sample_index}) is beyond the eval split's {num_eval} "
                          f"samples; allowed: 0..{num_eval - 1}")


def _check_positions(cfg: RunConfig, config) -> None:
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and cfg.data.max_length > positions:
        raise ConfigError(f"data.max_length ({cfg.data.max_length}) exceeds the model's {positions} positions; "
                          f"allowed: 8..{positions}")


@dataclass
class RunData:
    """A run's data as its clients and server hold it: raw splits, tokenized rows, each client's rows."""

    splits: DataSplits
    tokenizer: object
    train: object  # the tokenized training split (row i of splits.train)
    evals: object
    partitions: list[list[int]]
    partition_info: dict
    reserved: list[int]  # rows the paradigm keeps out of every partition (KD's public set)


def load_run_data(cfg: RunConfig, progress: RunProgress | None = None) -> RunData:
    """Load, check, tokenize and partition the data exactly as a run of ``cfg`` does (no model weights); the data's
    own errors come before the tokenizer loads (and, on first use, the bundled model is converted)."""
    progress = progress or RunProgress(False)
    with progress.phase(f"data: loading {cfg.data.dataset}"):
        splits = load_splits(cfg.data, cfg.seed)
        _check_sizes(cfg, len(splits.eval))
        partition = _partition_config(cfg, splits.train.column_names)
    if needs_conversion(cfg.model):
        with progress.phase("converting the bundled SmolLM2 GGUF to safetensors (first use only; cached)"):
            convert_bundled(cfg.model)
    with progress.phase(f"data: tokenizing, partitioning over {cfg.federation.num_clients} clients"):
        tokenizer = load_tokenizer(cfg.model)
        max_length, template = cfg.data.max_length, cfg.data.chat_template
        train = tokenize_examples(splits.train, tokenizer, max_length, template, where="training split")
        evals = tokenize_examples(splits.eval, tokenizer, max_length, template, where="eval split")
        if len(evals) == 0:
            raise DataError(f"no eval row keeps a response token within data.max_length {max_length}; raise it")
        reserved = PARADIGMS.get(cfg.paradigm).reserved_rows(cfg, len(train))
        parts, info = _partitions(cfg.model_copy(update={"partition": partition}), train, splits.label_column,
                                  set(reserved))
    info["truncation"] = train.truncation.as_dict()
    return RunData(splits, tokenizer, train, evals, parts, info, reserved)


#: Where a source field of ``data`` ends up after formatting (:func:`fedtune.data.sources.map_fields`).
FORMATTED_AS = {"prompt_field": "prompt", "instruction_field": "prompt", "response_field": "response",
                "output_field": "response", "text_field": "response"}


def _partition_config(cfg: RunConfig, columns: list[str]):
    """``cfg.partition`` with its column named as the formatted data names it (a source field mapped to the prompt
    or response may be given by its own name); a column the data lacks is an error naming the columns."""
    column = cfg.partition.column
    if not column or column in columns:
        return cfg.partition
    formatted = next((FORMATTED_AS[key] for key in FORMATTED_AS if getattr(cfg.data, key) == column), None)
    if formatted in columns:
        return cfg.partition.model_copy(update={"column": formatted})
    raise DataError(f"partition.column {column!r} is not a column of the data; valid: {', '.join(columns)} (the "
                    "fields data.prompt_field / response_field name are formatted as 'prompt' / 'response')")


def _partitions(cfg: RunConfig, train, label_column: str | None, reserved: set[int]) -> tuple[list[list[int]], dict]:
    """Each client's rows, less the rows the paradigm reserves (before anything is written or planned from them)."""
    # Imported here: flwr-datasets brings seaborn and scipy.stats (1.5 s), which a deployed client's copy never needs.
    from fedtune.data.partition import partition_indices
    from fedtune.data.partition_report import partition_summary

    parts = partition_indices(train, cfg.partition, cfg.federation.num_clients, cfg.seed, label_column)
    if reserved:
        parts = [[i for i in part if i not in reserved] for part in parts]
    column = cfg.partition.column or label_column
    info = partition_summary(train, parts, column)
    info.update(method=cfg.partition.method, label_column=column)
    if reserved:
        info["reserved_rows"] = len(reserved)
    return parts, info


def build_context(cfg: RunConfig, progress: RunProgress, run_dir: Path, *, weightless: bool = False,
                  network: bool = True, backend_resources: dict | None = None) -> RunContext:
    """Load model, tokenizer and data; tokenize; partition; make the backend and (unless ``network`` is false) the
    simulated network. Raises FedtuneError subclasses on bad input. ``weightless``: the model has shapes but no
    weights (planning, not training). ``backend_resources``: handed to the backend (the Flower ServerApp's grid)."""
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = resolve_device(cfg.runtime.device)
    # Data, tokenizer and partitions before the weights: bad data or an impossible partition is reported at once.
    data = load_run_data(cfg, progress)
    splits, tokenizer, train, evals = data.splits, data.tokenizer, data.train, data.evals
    with progress.phase(f"loading the model ({cfg.model.source}{'' if weightless else ', weights'}) and LoRA"):
        base, model = build_model(cfg, device, weightless)
    _check_positions(cfg, base.config)
    sample = splits.eval[cfg.eval.sample_index]
    source = splits.eval_source if splits.eval_source is not None else splits.eval
    references = (reference_sets(splits.eval["prompt"], zip(source["prompt"], source["response"]),
                                 cfg.eval.metric_samples) if cfg.eval.metric != "none" else [])
    ledger = Ledger()
    ctx = RunContext(
        cfg=cfg, device=device, model=model, tokenizer=tokenizer, base_model=base,
        train_samples=[{"input_ids": i, "labels": l} for i, l in zip(train["input_ids"], train["labels"])],
        eval_samples=[{"input_ids": i, "labels": l} for i, l in zip(evals["input_ids"], evals["labels"])],
        sample_prompt=format_prompt(tokenizer, sample["prompt"], cfg.data.chat_template),
        sample_reference=sample["response"],
        metric_prompts=[format_prompt(tokenizer, p, cfg.data.chat_template) for p, _ in references],
        metric_references=[refs for _, refs in references],
        partitions=data.partitions, partition_info=data.partition_info, cost=model_cost(model), ledger=ledger, transport=Transport(ledger),
        progress=progress, run_dir=Path(run_dir), public_rows=data.reserved,
    )
    capabilities = PARADIGMS.get(cfg.paradigm).capabilities
    ctx.backend = make_backend(ctx, capabilities, build_worker_copy, **(backend_resources or {}))
    ctx.network = _network(ctx, weightless) if network else None
    return ctx


def _network(ctx: RunContext, weightless: bool) -> NetworkSim | None:
    """The run's simulated network, or None without ``[network] planner``. When the paradigm prunes its clients, the
    planner's pruning cuts are measured on a weightless copy of the model (the model itself when it is one)."""
    cfg = ctx.cfg
    if not cfg.network.enabled:
        return None
    capabilities = PARADIGMS.get(cfg.paradigm).capabilities
    profiles, defaulted = default_profiles(cfg)
    if defaulted:
        ctx.progress.log(f"network: devices.profiles is not set; every client is a '{DEFAULT_DEVICE}'")
    skeleton = None
    if capabilities.prunes_clients and cfg.network.rho_max > 0:
        skeleton = ctx.model if weightless else build_model(cfg, ctx.device, weightless=True)[1]
    workload = round_workload(cfg, ctx.model, ctx.cost, [len(p) for p in ctx.partitions], skeleton)
    return NetworkSim(cfg, workload, profiles, capabilities.prunes_clients, capabilities.drops_stragglers, ctx.ledger)


def build_worker_copy(cfg: RunConfig, run_dir: Path) -> tuple[RunContext, Paradigm]:
    """A backend worker's own copy of a run: its context (no progress bars, no network: the driver plans) and
    paradigm."""
    ctx = build_context(cfg, RunProgress(False), run_dir, network=False)
    return ctx, PARADIGMS.get(cfg.paradigm)(ctx)
