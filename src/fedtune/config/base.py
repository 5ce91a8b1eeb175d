"""The base of every config table, and choices validated against the registries that own them."""

from __future__ import annotations

import importlib
import typing
from typing import Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo


def registry_at(path: str):
    """Import ``module:NAME`` lazily (validation time), so config has no import-time dependencies."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def choice_in(registry_path: str, value: str, extra: tuple[str, ...] = ()) -> str:
    """``value`` if the registry (or ``extra``, e.g. 'none') has it, else an error listing the valid choices."""
    registry = registry_at(registry_path)
    if value not in registry and value not in extra:
        raise ValueError(f"unknown {registry.kind} {value!r}; valid choices: {', '.join([*extra, *registry.names()])}")
    return value


def registered(registry_path: str, *extra: str) -> AfterValidator:
    """Field metadata: the value must name an entry of the registry at ``registry_path`` (``module:NAME``), or be one
    of ``extra`` (e.g. 'none'): ``field: Annotated[str, registered("fedtune.x:THINGS")] = Field(...)``."""
    return AfterValidator(lambda value: choice_in(registry_path, value, extra))


NONE = "none"


def _admits_none(field: FieldInfo) -> bool:
    return field.annotation is None or type(None) in typing.get_args(field.annotation)


class Section(BaseModel):
    """A config table: unknown keys are errors, assignments are validated, every float is finite (no inf/nan).

    TOML has no null: a key that may be unset (``None``) takes the string ``"none"`` for it, in a file or in
    ``--set key=none`` (``to_toml`` writes it so, and reads back the same configuration)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _none(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: None if v == NONE and k in fields and _admits_none(fields[k]) else v for k, v in data.items()}


def none_as_text(value: Any) -> Any:
    """A dumped configuration with ``None`` written as ``"none"`` (for TOML)."""
    if isinstance(value, dict):
        return {k: none_as_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [none_as_text(v) for v in value]
    return NONE if value is None else value


class OwnedKeysSection(Section):
    """A table some of whose keys belong to registered implementations: every entry of the registry at ``owners``
    (``"module:NAME"``) declares the keys it reads in a ``Settings`` table of its own (e.g. each threshold
    controller's settings in ``[compression]``). Those keys are validated by their owner's table, and every owner's
    defaults are filled in, so the table dumps, prints and fingerprints completely. Keys are unique across owners."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    owners: ClassVar[str] = ""
    table: ClassVar[str] = ""

    @classmethod
    def owned_settings(cls) -> dict[str, type[Section]]:
        """Each owner's ``Settings`` table, by owner name."""
        registry = registry_at(cls.owners)
        return {name: registry.get(name).Settings for name in registry.names()}

    @classmethod
    def owned_fields(cls) -> dict[str, tuple[str, FieldInfo]]:
        """Every owned key: (its owner, its field)."""
        out: dict[str, tuple[str, FieldInfo]] = {}
        for owner, settings in cls.owned_settings().items():
            for key, field in settings.model_fields.items():
                if key in out or key in cls.model_fields:
                    raise TypeError(f"[{cls.table}] key {key!r} is declared twice ({out.get(key, ('the table',))[0]} "
                                    f"and {owner})")
                out[key] = (owner, field)
        return out

    @model_validator(mode="after")
    def _owned_keys(self) -> "OwnedKeysSection":
        given = dict(self.__pydantic_extra__ or {})
        owned = self.owned_fields()
        unknown = sorted(set(given) - set(owned))
        if unknown:
            valid = ", ".join([*type(self).model_fields, *owned])
            raise ValueError(f"unknown key '{self.table}.{unknown[0]}'; valid keys in [{self.table}]: {valid}")
        values: dict[str, Any] = {}
        for settings in self.owned_settings().values():
            mine = {k: v for k, v in given.items() if k in settings.model_fields}
            try:
                values.update(settings.model_validate(mine).model_dump())
            except ValidationError as exc:
                raise ValueError("; ".join(self._explain(e) for e in exc.errors())) from None
        self.__pydantic_extra__ = values
        return self

    def _explain(self, err: dict) -> str:
        msg = err["msg"].removeprefix("Value error, ")
        if not err["loc"]:
            return msg
        return f"{self.table}.{'.'.join(map(str, err['loc']))}: {msg} (got {err.get('input')!r})"

    def settings_of(self, owner: str) -> Section:
        """The settings table of ``owner`` (its keys' values in this table)."""
        settings = self.owned_settings()[owner]
        return settings.model_validate({k: self.__pydantic_extra__[k] for k in settings.model_fields})
