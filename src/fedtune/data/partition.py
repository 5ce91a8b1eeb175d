"""Federated partitioning of the training split, built on flwr-datasets' ``Partitioner`` interface.

Methods (registered in :data:`PARTITIONERS`, each a :class:`Partitioning` declaring what it needs):

- ``iid``: seeded shuffle, then flwr's ``IidPartitioner`` (equal contiguous shards).
- ``dirichlet``: flwr's ``DirichletPartitioner`` over a label column (self-balancing).
- ``natural_id``: flwr's ``NaturalIdPartitioner``; every value of the column lives on exactly one
  client. With fewer clients than distinct values, whole values are dealt round-robin over the
  clients in a seeded order; more clients than distinct values is a :class:`PartitionError`.
- ``length_dirichlet`` (SplitFT): :class:`LengthDirichletPartitioner`, Dirichlet over token-length
  classes (quantiles of ``length``).

:func:`partition_indices` returns sorted row indices per client and enforces ``min_samples``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner

from fedtune.config import PartitionConfig
from fedtune.core.errors import PartitionError
from fedtune.core.registry import Registry

ROW = "__row__"
LABEL = "__label__"
LENGTH_CLASS = "length_class"
TOP_LABELS = 5
OTHER = "(other)"

Builder = Callable[[datasets.Dataset, PartitionConfig, int, int], Partitioner]


@dataclass(frozen=True)
class Partitioning:
    """A registered method: its builder and what it needs from the data."""

    build: Builder
    needs_column: bool = False  # the frame gets LABEL: partition.column (or the dataset's label column) as str
    needs_lengths: bool = False  # the frame gets the token 'length' column
    # flwr's sampler retries to meet min_partition_size; on failure the builder is rerun with 0.
    retries_min_size: bool = False


PARTITIONERS: Registry[Partitioning] = Registry("partitioner")


def _partitioning(
    name: str, *, needs_column: bool = False, needs_lengths: bool = False, retries_min_size: bool = False
) -> Callable[[Builder], Builder]:
    """Decorator: register the builder under ``name`` with what it declares it needs."""

    def add(build: Builder) -> Builder:
        PARTITIONERS.register(name)(Partitioning(build, needs_column, needs_lengths, retries_min_size))
        return build

    return add


# ---------------------------------------------------------------------------------------------
# Length classes and the SplitFT partitioner


def length_classes(lengths: Sequence[int], num_classes: int) -> tuple[np.ndarray, list[float]]:
    """Bucket lengths into ``num_classes`` classes by quantiles; returns (class per sample, edges)."""
    arr = np.asarray(lengths, dtype=float)
    if arr.size == 0:
        return np.zeros(0, dtype=int), []
    edges = np.quantile(arr, np.linspace(0.0, 1.0, num_classes + 1)[1:-1])
    return np.searchsorted(edges, arr, side="right").astype(int), [float(e) for e in edges]


class LengthDirichletPartitioner(Partitioner):
    """SplitFT non-IID split: samples bucketed into K length classes, each dealt out ~ Dirichlet(alpha).

    Adds a ``length_class`` column to (a copy of) the dataset and delegates to flwr's
    :class:`DirichletPartitioner`; partitions returned keep that column.
    """

    def __init__(
        self,
        num_partitions: int,
        alpha: float,
        num_classes: int = 4,
        length_column: str = "length",
        min_partition_size: int = 0,
        self_balancing: bool = True,
        seed: int | None = 42,
    ) -> None:
        super().__init__()
        self._num_partitions = num_partitions
        self._num_classes = num_classes
        self._length_column = length_column
        self._inner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=LENGTH_CLASS,
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=self_balancing,
            seed=seed,
        )
        self.edges: list[float] = []

    def _prepare(self) -> None:
        if self._inner.is_dataset_assigned():
            return
        if self._length_column not in self.dataset.column_names:
            raise ValueError(f"column {self._length_column!r} not in dataset: {self.dataset.column_names}")
        classes, self.edges = length_classes(list(self.dataset[self._length_column]), self._num_classes)
        ds = self.dataset
        if LENGTH_CLASS in ds.column_names:
            ds = ds.remove_columns(LENGTH_CLASS)
        self._inner.dataset = ds.add_column(LENGTH_CLASS, classes.tolist())

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        self._prepare()
        return self._inner.load_partition(partition_id)

    @property
    def num_partitions(self) -> int:
        return self._num_partitions


# ---------------------------------------------------------------------------------------------
# Registered builders: (frame, cfg, num_clients, seed) -> Partitioner with its dataset assigned,
# each with its needs declared in its @_partitioning(...) line.
# The frame holds ROW (original row index), LABEL (column as str, when one is used) and length.


@_partitioning("iid")
def _iid(frame: datasets.Dataset, cfg: PartitionConfig, num_clients: int, seed: int) -> Partitioner:
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = frame.select(_rng(seed).permutation(len(frame)))
    return partitioner


@_partitioning("dirichlet", needs_column=True, retries_min_size=True)
def _dirichlet(frame: datasets.Dataset, cfg: PartitionConfig, num_clients: int, seed: int) -> Partitioner:
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by=LABEL,
        alpha=float(cfg.alpha),
        min_partition_size=cfg.min_samples,
        self_balancing=True,
        seed=seed % 2**32,
    )
    partitioner.dataset = frame
    return partitioner


@_partitioning("natural_id", needs_column=True)
def _natural_id(frame: datasets.Dataset, cfg: PartitionConfig, num_clients: int, seed: int) -> Partitioner:
    labels = list(frame[LABEL])
    values = sorted(set(labels))
    if num_clients > len(values):
        raise PartitionError(
            f"natural_id: {num_clients} clients but the partition column has only {len(values)} distinct "
            f"values; use at most {len(values)} clients (each value stays on one client)"
        )
    order = _rng(seed).permutation(len(values))
    client_of = {values[v]: rank % num_clients for rank, v in enumerate(order)}
    partitioner = NaturalIdPartitioner(partition_by="__client__")
    partitioner.dataset = frame.add_column("__client__", [client_of[v] for v in labels])
    return partitioner


@_partitioning("length_dirichlet", needs_lengths=True, retries_min_size=True)
def _length_dirichlet(frame: datasets.Dataset, cfg: PartitionConfig, num_clients: int, seed: int) -> Partitioner:
    partitioner = LengthDirichletPartitioner(
        num_partitions=num_clients,
        alpha=float(cfg.alpha),
        num_classes=cfg.num_length_classes,
        min_partition_size=cfg.min_samples,
        seed=seed % 2**32,
    )
    partitioner.dataset = frame
    return partitioner


# ---------------------------------------------------------------------------------------------
# Public API


def partition_indices(
    train: datasets.Dataset, cfg: PartitionConfig, num_clients: int, seed: int, label_column: str | None
) -> list[list[int]]:
    """Sorted row indices of ``train`` per client; deterministic for a seed; enforces ``cfg.min_samples``."""
    if num_clients < 1:
        raise PartitionError(f"need at least one client, got {num_clients}")
    if num_clients > len(train):
        raise PartitionError(f"{num_clients} clients but only {len(train)} training samples")
    method = PARTITIONERS.get(cfg.method)
    frame = _frame(train, cfg, method, label_column)
    try:
        parts = _run(method.build, frame, cfg, num_clients, seed)
    except ValueError as exc:
        if not method.retries_min_size:
            raise PartitionError(f"{cfg.method} partitioning failed: {exc}") from exc
        # flwr gave up after its retries; redo the first draw without the minimum to name the client.
        try:
            parts = _run(method.build, frame, cfg.model_copy(update={"min_samples": 0}), num_clients, seed)
        except ValueError as again:
            raise PartitionError(f"{cfg.method} partitioning failed: {again}") from again
        _check_min(parts, cfg, note=f" (flwr's Dirichlet sampler could not meet it: {exc})")
    _check_min(parts, cfg)
    return parts


def _frame(
    train: datasets.Dataset, cfg: PartitionConfig, method: Partitioning, label_column: str | None
) -> datasets.Dataset:
    """The builders' input: ROW, plus LABEL and/or length as ``method`` declares it needs them."""
    cols: dict[str, list[Any]] = {ROW: list(range(len(train)))}
    column = cfg.column or label_column
    if method.needs_column:
        if not column:
            raise PartitionError(
                f"partition method {cfg.method!r} needs a column: set partition.column "
                f"(dataset columns: {', '.join(train.column_names)})"
            )
        if column not in train.column_names:
            raise PartitionError(
                f"partition column {column!r} is not in the dataset; columns: {', '.join(train.column_names)}"
            )
        cols[LABEL] = [str(v) for v in train[column]]
    if method.needs_lengths:
        if "length" not in train.column_names:
            raise PartitionError(
                f"partition method {cfg.method!r} needs the token 'length' column (tokenize the data first); "
                f"columns: {', '.join(train.column_names)}"
            )
        cols["length"] = list(train["length"])
    return datasets.Dataset.from_dict(cols)


def _run(build: Builder, frame: datasets.Dataset, cfg: PartitionConfig, num_clients: int, seed: int) -> list[list[int]]:
    partitioner = build(frame, cfg, num_clients, seed)
    # flwr warns on each Dirichlet retry and NaturalIdPartitioner draws a tqdm bar: keep both quiet.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return [sorted(partitioner.load_partition(i)[ROW]) for i in range(num_clients)]


def _check_min(parts: list[list[int]], cfg: PartitionConfig, note: str = "") -> None:
    for client, rows in enumerate(parts):
        if len(rows) < cfg.min_samples:
            sizes = ", ".join(str(len(p)) for p in parts)
            raise PartitionError(
                f"client {client} got {len(rows)} training samples, fewer than partition.min_samples = "
                f"{cfg.min_samples}{note}; client sizes: [{sizes}]. Hint: raise partition.alpha (less skew), "
                "use fewer clients (federation.num_clients), or lower partition.min_samples."
            )


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed % 2**32)
