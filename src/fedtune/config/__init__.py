"""Typed run configuration: TOML file + ``--set key=value`` overrides, validated before any work.

Every field carries its help text (``fedtune config`` prints them). Errors name the key and what is
allowed; :func:`load_config` raises :class:`ConfigError`, never a raw validation traceback. Each table
lives with its kind (:mod:`.sections`, :mod:`.federation`, :mod:`.paradigms`); choices are validated
against their owners' registries and cross-section rules by their owners (a paradigm checks the settings
it acts on, a backend the paradigms it can run), looked up by name at validation time.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin

import tomli_w
from pydantic import BaseModel, Field, ValidationError, model_validator

from fedtune.config.base import OwnedKeysSection, Section, none_as_text, registered, registry_at
from fedtune.config.federation import CustomDevice, DevicesConfig, FederationConfig, NetworkConfig
from fedtune.config.paradigms import CompressionConfig, KDConfig, PruningConfig, SplitConfig
from fedtune.config.privacy import PrivacyConfig
from fedtune.config.sections import (
    CheckpointConfig,
    DataConfig,
    DeployConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    RuntimeConfig,
    TinyModelConfig,
    TrainConfig,
)
from fedtune.core.errors import ConfigError

__all__ = ["CheckpointConfig", "CompressionConfig", "CustomDevice", "DataConfig", "DeployConfig", "DevicesConfig", "EvalConfig",
           "FederationConfig", "KDConfig", "LoraConfig", "ModelConfig", "NetworkConfig", "PartitionConfig",
           "PrivacyConfig", "PruningConfig", "RunConfig", "RuntimeConfig", "Section", "SplitConfig", "TinyModelConfig", "TrainConfig",
           "build_config", "describe_fields", "load_config", "parse_override", "apply_override"]


class RunConfig(Section):
    paradigm: Annotated[str, registered("fedtune.paradigms:PARADIGMS")] = Field("fedllm", description="'fedllm' (federated LoRA), 'split' (split federated, SplitFed/SplitFT), "
                          "'kd' (KD-FedLLM: clients share top-k logits on a public set), 'centralized' "
                          "(reference, no federation) or 'local' (baseline: each client trains alone, no exchange).")
    seed: int = Field(0, description="Seed of every random choice in the run.")
    name: str = Field("run", description="Run name, used in reports.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    devices: DevicesConfig = Field(default_factory=DevicesConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)


    @model_validator(mode="after")
    def _network_lists(self) -> "RunConfig":
        n, d = self.federation.num_clients, self.network.distances_m
        if len(d) not in (0, 1, n):
            raise ValueError(f"network.distances_m has {len(d)} entries but federation.num_clients = {n}; "
                             "give one distance for all clients or one per client")
        return self

    @model_validator(mode="after")
    def _device_lists(self) -> "RunConfig":
        n, p = self.federation.num_clients, self.devices.profiles
        if len(p) not in (0, 1, n):
            raise ValueError(f"devices.profiles has {len(p)} entries; give one, or one per client ({n})")
        return self

    @model_validator(mode="after")
    def _privacy_paradigms(self) -> "RunConfig":
        p = self.privacy
        for key, on, paradigms in (("client_dp", p.client_level, ("fedllm", "kd")),
                                   ("sample_dp", p.sample_dp, ("fedllm",)),
                                   ("activation_noise", p.activation_noise > 0, ("split",))):
            if on and self.paradigm not in paradigms:
                raise ValueError(f"privacy.{key} applies to paradigm {' and '.join(map(repr, paradigms))}; "
                                 f"paradigm is {self.paradigm!r}")
        return self

    @model_validator(mode="after")
    def _paradigm_rules(self) -> "RunConfig":
        """The paradigm checks the settings it acts on, those only other paradigms act on, and its backend."""
        registry_at("fedtune.paradigms:PARADIGMS").get(self.paradigm).check_config(self)
        return self

    def to_toml(self) -> str:
        return tomli_w.dumps(none_as_text(self.model_dump(mode="json")))


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (path, value); the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The table at ``loc``; a dict-of-tables field (``kd.models``, ``devices.custom``) is walked through its
    entry's name to the entries' table."""
    node: Any = RunConfig
    for part in loc:
        if get_origin(node) is dict:
            node = get_args(node)[1]
            continue
        field = node.model_fields.get(str(part)) if _is_table(node) else None
        if field is None:
            return None
        node = field.annotation
    return node if _is_table(node) else None


def _is_table(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _describe(err: dict[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        valid = ", ".join(section.model_fields) if section else "?"
        where = f"[{'.'.join(map(str, loc[:-1]))}]" if loc[:-1] else "the top level"
        return f"unknown key {key!r}; valid keys in {where}: {valid}"
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if msg.startswith(("unknown key ", f"{key}.")):  # a table's owned keys, explained by the table (OwnedKeysSection)
        return msg
    if err["type"] in ("value_error",) or isinstance(got, dict):
        return f"{key}: {msg}"
    return f"{key}: {msg} (got {got!r})"


def build_config(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (optional), apply ``--set`` overrides, and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                              "a TOML config must be UTF-8") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    for text in overrides:
        apply_override(data, *parse_override(text))
    return build_config(data)


def describe_fields(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for ``fedtune config`` and the README (owned keys with their owner)."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe_fields(ann, key + "."))
        else:
            rows.append((key, repr(field.get_default(call_default_factory=True)), field.description or ""))
    if issubclass(model, OwnedKeysSection):
        for name, (owner, field) in model.owned_fields().items():
            rows.append((f"{prefix}{name}", repr(field.get_default(call_default_factory=True)),
                         f"{field.description or ''} (read by {owner!r})"))
    return rows
