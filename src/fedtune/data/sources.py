"""Dataset loaders: every source yields string columns ``prompt`` and ``response`` plus metadata.

Loaders are registered in :data:`DATASETS` by name (``e2e``, ``chatterbot``, ``local``, ``hf``) and
return ``(train, eval or None, label_column)``; :func:`load_splits` then carves an eval split when
the source has none and applies the seeded sample caps.
"""

from __future__ import annotations

import codecs
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np

from fedtune.config import DataConfig
from fedtune.core.errors import DataError
from fedtune.core.registry import Registry

RawSplits = tuple[datasets.Dataset, datasets.Dataset | None, str | None]
Loader = Callable[[DataConfig], RawSplits]

DATASETS: Registry[Loader] = Registry("dataset")
log = logging.getLogger(__name__)

E2E_DIR = Path(__file__).parent / "builtin" / "e2e"
E2E_INSTRUCTION = "Write a one-sentence restaurant description from these attributes: "
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataSplits:
    """Training and held-out data; ``label_column`` is the natural metadata column for partitioning."""

    train: datasets.Dataset
    eval: datasets.Dataset
    label_column: str | None
    #: The whole held-out data before ``max_eval_samples`` capped it: where a metric prompt's references are
    #: gathered from (E2E's test file has up to 45 per input).
    eval_source: datasets.Dataset | None = None


def load_splits(cfg: DataConfig, seed: int) -> DataSplits:
    """Load ``cfg.dataset``, hold out ``eval_fraction`` (by input) if it has no eval split, then cap sizes."""
    train, eval_ds, label_column = DATASETS.get(cfg.dataset)(cfg)
    if eval_ds is None:
        train, eval_ds = _holdout(train, cfg.eval_fraction, _rng(seed, 0))
    source = eval_ds
    train = _cap(train, cfg.max_train_samples, _rng(seed, 1))
    eval_ds = _cap(eval_ds, cfg.max_eval_samples, _rng(seed, 2))
    if len(train) == 0:
        raise DataError(f"dataset {cfg.dataset!r} has no training samples")
    return DataSplits(train=train, eval=eval_ds, label_column=label_column, eval_source=source)


def shared_inputs(train: datasets.Dataset, eval_ds: datasets.Dataset) -> int:
    """Eval rows whose (non-empty) prompt is also a training row's prompt: what a held-out split should not have."""
    seen = set(train["prompt"])
    return sum(1 for prompt in eval_ds["prompt"] if prompt and prompt in seen)


# ---------------------------------------------------------------------------------------------
# Loaders


@DATASETS.register("e2e")
def load_e2e(cfg: DataConfig) -> RawSplits:
    """Bundled E2E NLG data: ``MR||text`` lines; validation split = train, test split = eval."""
    return _read_e2e(E2E_DIR / "train.txt"), _read_e2e(E2E_DIR / "test.txt"), "name"


@DATASETS.register("chatterbot")
def load_chatterbot(cfg: DataConfig) -> RawSplits:
    """English chatterbot-corpus Q&A: the first two turns of each conversation, ``topic`` = category."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the chatterbot-corpus package is not installed (pip install chatterbot-corpus)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise DataError(f"no chatterbot-corpus YAML files found in {folder}")
    rows: dict[str, list[str]] = {"prompt": [], "response": [], "topic": []}
    for path in files:
        for prompt, response, topic in _read_chatterbot_file(path):
            rows["prompt"].append(prompt)
            rows["response"].append(response)
            rows["topic"].append(topic)
    return datasets.Dataset.from_dict(rows), None, "topic"


@DATASETS.register("local")
def load_local(cfg: DataConfig) -> RawSplits:
    """A JSONL/JSON, CSV or parquet file; fields mapped to prompt/response by ``cfg.format``. ``cfg.eval_path``,
    when set, is the held-out file (same type and mapping)."""
    train = _read_local(Path(cfg.path).expanduser(), cfg)
    if not cfg.eval_path:
        return train, None, None
    eval_ds = _read_local(Path(cfg.eval_path).expanduser(), cfg)
    shared = shared_inputs(train, eval_ds)
    if shared:
        log.warning("%s: %d of %d eval rows share their prompt with a training row of %s", cfg.eval_path, shared,
                    len(eval_ds), cfg.path)
    return train, eval_ds, None


def _read_local(path: Path, cfg: DataConfig) -> datasets.Dataset:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"unsupported data file type {path.suffix!r} ({path}); use one of: {', '.join(LOCAL_BUILDERS)}")
    if builder in ("json", "csv"):
        _check_utf8(path)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise DataError(f"cannot read {path} as {builder}: {exc}") from exc
    try:
        return map_fields(ds, cfg, str(path))
    except UnicodeDecodeError as exc:  # a parquet string column holding bytes that are not UTF-8
        raise DataError(f"{path}: a text value is not UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset "
                        f"{exc.start} of {bytes(exc.object[:60])!r})") from None


@DATASETS.register("hf")
def load_hf(cfg: DataConfig) -> RawSplits:
    """``datasets.load_dataset(cfg.path)`` (local directory or hub/cached name) with the configured splits."""
    try:
        dsd = datasets.load_dataset(cfg.path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load Hugging Face dataset {cfg.path!r}: {exc}") from exc
    splits = list(dsd.keys())
    for name in (cfg.train_split, cfg.eval_split):
        if name and name not in dsd:
            raise DataError(f"dataset {cfg.path!r} has no split {name!r}; available splits: {', '.join(splits)}")
    train = map_fields(dsd[cfg.train_split], cfg, f"{cfg.path}[{cfg.train_split}]")
    eval_ds = map_fields(dsd[cfg.eval_split], cfg, f"{cfg.path}[{cfg.eval_split}]") if cfg.eval_split else None
    return train, eval_ds, None


# ---------------------------------------------------------------------------------------------
# Parsing and field mapping


def _check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """A text data file must be UTF-8 (what the JSON and CSV readers assume): name the first bad byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0  # bytes read before this chunk; newlines in them
    with path.open("rb") as f:
        while True:
            chunk = f.read(chunk_size)
            pending = len(decoder.getstate()[0])  # the last chunk's incomplete character, decoded with this one
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                line = lines + chunk[: max(exc.start - pending, 0)].count(b"\n") + 1
                raise DataError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {at}, "
                                f"line {line}); save it as UTF-8") from None
            if not chunk:
                return
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def _read_e2e(path: Path) -> datasets.Dataset:
    rows: dict[str, list[str]] = {"prompt": [], "response": [], "name": []}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DataError(f"{path}:{lineno}: expected 'MR||text', got {line[:80]!r}")
        mr, text = (part.strip() for part in line.split("||", 1))
        rows["prompt"].append(E2E_INSTRUCTION + mr)
        rows["response"].append(text)
        rows["name"].append(parse_mr(mr).get("name", ""))
    return datasets.Dataset.from_dict(rows)


def parse_mr(mr: str) -> dict[str, str]:
    """``'name : X | area : Y'`` -> ``{'name': 'X', 'area': 'Y'}``."""
    attrs = {}
    for item in mr.split("|"):
        key, sep, value = item.partition(":")
        if sep:
            attrs[key.strip()] = value.strip()
    return attrs


def _read_chatterbot_file(path: Path) -> list[tuple[str, str, str]]:
    import yaml  # local: only this loader needs it

    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~5x faster
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"cannot parse {path}: {exc}") from exc
    categories = doc.get("categories") or [path.stem]
    topic = _text(categories[0]) or path.stem
    pairs = []
    for conv in doc.get("conversations") or []:
        if not isinstance(conv, list) or len(conv) < 2:
            continue
        prompt, response = _text(conv[0]), _text(conv[1])
        if prompt and response:
            pairs.append((prompt, response, topic))
    return pairs


def _text(value: Any) -> str:
    """Robust string form of a field value (YAML/JSON may yield numbers, booleans or None)."""
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    return str(value).strip()


def _detect_format(columns: list[str], cfg: DataConfig) -> str:
    candidates = [
        ("prompt_response", (cfg.prompt_field, cfg.response_field)),
        ("instruction", (cfg.instruction_field, cfg.output_field)),
        ("text", (cfg.text_field,)),
    ]
    for name, needed in candidates:
        if all(c in columns for c in needed):
            return name
    expected = "; ".join(f"{name}: {', '.join(needed)}" for name, needed in candidates)
    raise DataError(f"cannot detect the data format from columns [{', '.join(columns)}]; expected one of ({expected})")


def map_fields(ds: datasets.Dataset, cfg: DataConfig, where: str) -> datasets.Dataset:
    """Map raw records to ``prompt``/``response`` per ``cfg.format``; other columns stay as metadata."""
    columns = list(ds.column_names)
    fmt = _detect_format(columns, cfg) if cfg.format == "auto" else cfg.format
    required = {
        "prompt_response": [cfg.prompt_field, cfg.response_field],
        "instruction": [cfg.instruction_field, cfg.output_field],
        "text": [cfg.text_field],
    }[fmt]
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(
            f"{where}: format {fmt!r} needs column(s) {', '.join(map(repr, missing))}, "
            f"but the data has: {', '.join(columns) or '(none)'}"
        )
    data = ds.to_dict()
    n = len(ds)
    if fmt == "prompt_response":
        prompts = [_text(v) for v in data[cfg.prompt_field]]
        responses = [_text(v) for v in data[cfg.response_field]]
        used = required
    elif fmt == "instruction":
        inputs = data.get(cfg.input_field, [None] * n)
        prompts = [
            "\n\n".join(p for p in (_text(ins), _text(inp)) if p)
            for ins, inp in zip(data[cfg.instruction_field], inputs)
        ]
        responses = [_text(v) for v in data[cfg.output_field]]
        used = required + ([cfg.input_field] if cfg.input_field in columns else [])
    else:
        prompts = [""] * n
        responses = [_text(v) for v in data[cfg.text_field]]
        used = required
    meta = {c: data[c] for c in columns if c not in used and c not in ("prompt", "response")}
    return datasets.Dataset.from_dict({"prompt": prompts, "response": responses, **meta})


# ---------------------------------------------------------------------------------------------
# Seeded splitting and capping


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**32, salt])


def _holdout(ds: datasets.Dataset, fraction: float,
             rng: np.random.Generator) -> tuple[datasets.Dataset, datasets.Dataset]:
    """About ``fraction`` of the rows held out, whole inputs at a time (in a seeded order, each input taken while
    it brings the count closer): rows that share a prompt (several references of one input) land on the same side.
    Rows with an empty prompt (plain text) are each their own input; with every prompt distinct this is a plain
    seeded row split."""
    n = len(ds)
    if n < 2:
        raise DataError(f"need at least 2 samples to hold out an eval split, got {n}")
    groups: dict[object, list[int]] = {}
    for row, prompt in enumerate(ds["prompt"]):
        groups.setdefault(prompt or ("row", row), []).append(row)
    members = list(groups.values())
    if len(members) < 2:
        raise DataError(f"need at least 2 distinct prompts to hold out an eval split, got {n} rows of one prompt; "
                        "set data.eval_path (local files) or data.eval_split (hf)")
    n_eval = min(n - 1, max(1, round(n * fraction)))
    held: list[int] = []
    for group in rng.permutation(len(members))[:-1]:  # the last group drawn always trains
        if len(held) >= n_eval:
            break
        if len(members[group]) < 2 * (n_eval - len(held)):  # it brings the held-out size closer to n_eval
            held.extend(members[group])
    if not held:  # every input has more than twice the eval share of rows: hold out the smallest
        held = list(min(members, key=len))
    held_set = set(held)
    return ds.select([r for r in range(n) if r not in held_set]), ds.select(sorted(held))


def _cap(ds: datasets.Dataset, limit: int | None, rng: np.random.Generator) -> datasets.Dataset:
    if limit is None or len(ds) <= limit:
        return ds
    return ds.select(np.sort(rng.choice(len(ds), size=limit, replace=False)))
