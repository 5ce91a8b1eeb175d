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
import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------
# Reporting


def _entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return float(-sum(c / total * math.log(c / total) for c in counts.values() if c)) if total else 0.0


def partition_summary(
    train: datasets.Dataset, parts: list[list[int]], label_column: str | None, num_length_classes: int = 4
) -> dict[str, Any]:
    """Per-client sizes, mean token length, top labels (with share and entropy) and length-class mix."""
    labels = [str(v) for v in list(train[label_column])] if label_column and label_column in train.column_names else None
    lengths = np.asarray(list(train["length"])) if "length" in train.column_names else None
    classes, edges = length_classes(lengths, num_length_classes) if lengths is not None else (None, [])
    clients = []
    for client, rows in enumerate(parts):
        entry: dict[str, Any] = {"client": client, "num_samples": len(rows), "mean_length": None}
        if lengths is not None:
            entry["mean_length"] = round(float(lengths[rows].mean()), 2) if rows else 0.0
            entry["length_classes"] = np.bincount(classes[rows], minlength=num_length_classes).tolist()
        if labels is not None:
            counts = Counter(labels[i] for i in rows)
            top = counts.most_common(TOP_LABELS)
            hist = dict(top)
            rest = len(rows) - sum(hist.values())
            if rest:
                hist[OTHER] = rest
            entry["labels"] = hist
            entry["top_label"] = top[0][0] if top else None
            entry["top_label_share"] = round(top[0][1] / len(rows), 4) if top else 0.0
            entry["label_entropy"] = round(_entropy(counts), 4)
        clients.append(entry)
    return {
        "label_column": label_column if labels is not None else None,
        "num_clients": len(parts),
        "num_samples": int(sum(len(p) for p in parts)),
        "length_class_edges": edges,
        "clients": clients,
    }


def format_partition_table(summary: dict[str, Any]) -> str:
    """A plain-text table: client, samples, mean length, top label and its share."""
    label = summary.get("label_column")
    header = f"{'client':>6}  {'samples':>7}  {'mean len':>8}  " + (f"top {label} (share)" if label else "length classes")
    lines = [header, "-" * len(header)]
    for c in summary["clients"]:
        mean = "-" if c.get("mean_length") is None else f"{c['mean_length']:.1f}"
        if label:
            extra = f"{c['top_label']} ({c['top_label_share']:.0%})" if c.get("top_label") is not None else "-"
        else:
            extra = " ".join(map(str, c.get("length_classes", []))) or "-"
        lines.append(f"{c['client']:>6}  {c['num_samples']:>7}  {mean:>8}  {extra}")
    return "\n".join(lines)


def plot_partition(summary: dict[str, Any], path: Path) -> None:
    """PNG with samples per client (bar) and the stacked label (or length-class) mix per client."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    clients = summary["clients"]
    x = np.arange(len(clients))
    fig = Figure(figsize=(max(8.0, 0.5 * len(clients) + 7), 4), layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas for this figure only; the global pyplot backend is untouched
    ax1, ax2 = fig.subplots(1, 2)
    ax1.bar(x, [c["num_samples"] for c in clients], color="tab:blue")
    ax1.set(title="Samples per client", xlabel="client", ylabel="samples", xticks=x)

    use_labels = summary.get("label_column") and all("labels" in c for c in clients)
    if use_labels:
        mixes = [c["labels"] for c in clients]
        title, legend_title = f"{summary['label_column']} mix per client", summary["label_column"]
    else:
        mixes = [{f"class {k}": v for k, v in enumerate(c.get("length_classes", []))} for c in clients]
        title, legend_title = "length-class mix per client", "length class"
    totals: Counter = Counter()
    for mix in mixes:
        totals.update(mix)
    keys = [k for k, _ in totals.most_common() if k != OTHER] + ([OTHER] if OTHER in totals else [])
    colors = colormaps["tab20"]
    bottom = np.zeros(len(clients))
    for i, key in enumerate(keys):
        share = np.array([mix.get(key, 0) / max(1, sum(mix.values())) for mix in mixes])
        ax2.bar(x, share, bottom=bottom, label=key, color="lightgrey" if key == OTHER else colors(i % 20))
        bottom += share
    ax2.set(title=title, xlabel="client", ylabel="share", xticks=x, ylim=(0, 1))
    if keys:
        ax2.legend(title=legend_title, fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
