"""A deployed client's own copy of a run: the run's model and LoRA, trained on its own local data file only.

A SuperNode's ClientApp (:mod:`fedtune.deploy.client_turns`) builds it from the run's configuration and the client's
node config: ``data-path`` (its file, read by fedtune's local-file loader with the run's field mapping unless the
node config overrides it with ``data-<field>`` keys, e.g. ``data-prompt-field="question"``) and, for KD, the public
set's file (``public-path``). The copy holds no other client's rows and no evaluation split: in it, every client's
partition is this client's rows (it only ever trains as itself), and its streams shuffle them exactly as the
server's simulation would, so a deployed turn equals the simulated one. ``train_samples`` maps sample ids to
samples: the ids are the run's row ids where the file has ``fedtune_row`` (``fedtune partition`` writes it), so
reuse caches and messages name samples as in simulation; otherwise the file's row numbers.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.comm.ledger import Ledger
from fedtune.comm.transport import Transport
from fedtune.config import DataConfig, RunConfig, build_config
from fedtune.core.errors import ConfigError
from fedtune.core.progress import RunProgress
from fedtune.data.formatting import tokenize_examples
from fedtune.data.sources import load_local
from fedtune.engine.context import RunContext, build_model
from fedtune.models.flops import model_cost
from fedtune.models.loading import load_tokenizer, resolve_device
from fedtune.paradigms import PARADIGMS, Paradigm


def local_data_config(cfg: RunConfig, path: str | Path, overrides: dict | None = None) -> DataConfig:
    """The run's data settings pointed at a client's own file (``overrides``: DataConfig fields by name)."""
    fields = {**cfg.data.model_dump(), "dataset": "local", "path": str(path), "eval_path": "", **(overrides or {})}
    unknown = sorted(set(fields) - set(DataConfig.model_fields))
    if unknown:
        raise ConfigError(f"unknown data setting(s) {', '.join(unknown)} in node config; valid: "
                          f"{', '.join(sorted(DataConfig.model_fields))}")
    return DataConfig.model_validate(fields)


#: Column of ``fedtune partition``'s files: the row's id in the run that wrote them, kept as the sample's id.
ROW_COLUMN = "fedtune_row"


def _samples(data: DataConfig, tokenizer, first_id: int = 0) -> dict[int, dict]:
    """The file's tokenized samples by id: ``fedtune_row`` where the file has it, else ``first_id`` on."""
    rows = tokenize_examples(load_local(data)[0], tokenizer, data.max_length, data.chat_template)
    ids = rows[ROW_COLUMN] if ROW_COLUMN in rows.column_names else range(first_id, first_id + len(rows))
    return {int(k): {"input_ids": i, "labels": l} for k, i, l in zip(ids, rows["input_ids"], rows["labels"])}


def build_client_copy(cfg: RunConfig, client: int, data_path: str | Path, *, public_path: str | Path | None = None,
                      eval_path: str | Path | None = None,
                      data_overrides: dict | None = None) -> tuple[RunContext, Paradigm]:
    """Client ``client``'s copy of the run (context and paradigm), on its own data file (and the held-out file
    ``eval_path`` where the paradigm has clients evaluate their own adapters)."""
    data = cfg.model_dump(mode="json")  # the copy trains this client's turns; the secure sum is the ServerApp's
    cfg = build_config({**data, "runtime": {**data["runtime"], "backend": "inprocess", "progress": False},
                        "deploy": {**data["deploy"], "secure_aggregation": False}})
    if not 0 <= client < cfg.federation.num_clients:
        raise ConfigError(f"partition-id = {client} is not a client of this run; allowed: 0.."
                          f"{cfg.federation.num_clients - 1}")
    data = local_data_config(cfg, data_path, data_overrides)
    tokenizer = load_tokenizer(cfg.model)
    if not data.path or not Path(data.path).expanduser().is_file():
        raise ConfigError(f"this client's data file {data.path} does not exist (node config data-path)")
    public = _public_samples(cfg, data, tokenizer, public_path)
    own = _samples(data, tokenizer, first_id=max(public, default=-1) + 1)
    if not own:
        raise ConfigError(f"{data_path}: no training samples with response tokens")
    evals = _eval_samples(cfg, data, tokenizer, eval_path)
    device = resolve_device(cfg.runtime.device)
    base, model = build_model(cfg, device)
    rows = list(own)  # in the file's order, which is the partition's
    ledger = Ledger()
    ctx = RunContext(
        cfg=cfg, device=device, model=model, tokenizer=tokenizer, base_model=base, train_samples={**public, **own},
        eval_samples=evals, sample_prompt="", sample_reference="", metric_prompts=[], metric_references=[],
        partitions=[rows] * cfg.federation.num_clients, partition_info={}, cost=model_cost(model), ledger=ledger,
        transport=Transport(ledger), progress=RunProgress(False), run_dir=Path("."), public_rows=list(public),
        client_side=True,
    )
    return ctx, PARADIGMS.get(cfg.paradigm)(ctx)


def _public_samples(cfg: RunConfig, data: DataConfig, tokenizer, public_path) -> dict[int, dict]:
    """The public set's rows when the paradigm reserves one (KD), from its file (``fedtune partition`` writes it)."""
    if not PARADIGMS.get(cfg.paradigm).capabilities.public_set:
        return {}
    if public_path is None:
        raise ConfigError(f"paradigm {cfg.paradigm!r} needs the public set: give the SuperNode node config "
                          "public-path=\"…/public.jsonl\" (written by `fedtune partition`)")
    return _samples(data.model_copy(update={"path": str(public_path)}), tokenizer)


def _eval_samples(cfg: RunConfig, data: DataConfig, tokenizer, eval_path) -> list[dict]:
    """The held-out rows a client evaluates its own adapter on, where the paradigm keeps one per client (KD)."""
    if not PARADIGMS.get(cfg.paradigm).capabilities.client_adapters:
        return []
    if eval_path is None:
        raise ConfigError(f"paradigm {cfg.paradigm!r} has each client evaluate its own adapter: give the SuperNode "
                          "node config eval-path=\"…/eval.jsonl\" (written by `fedtune partition`)")
    return list(_samples(data.model_copy(update={"path": str(eval_path)}), tokenizer).values())
