"""Turning plain YAML values into config's typed dataclasses: each value checked against its field's type, each
error naming the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from sisaflow.core.errors import ConfigError


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"params: {key} = {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}"
        )


def check_positive(key: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ConfigError(f"params: {key} = {value!r} is not allowed; it must be {bound}")


def build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in raw.items():
        key = name if where == "params" or where.endswith(".yaml") else f"{where}.{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build(typing.cast(type, hint), {} if value is None else value, key)
        else:
            values[name] = coerce(key, value, hint)
    return cls(**values)


def coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"params: {key} = {value!r} is not allowed; choose one of {', '.join(map(str, args))}"
            )
        return value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"params: {key} = {value!r} is not allowed; it must be a list of strings")
        return list(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params: {key} = {value!r} is not allowed; it must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params: {key} = {value!r} is not allowed; it must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params: {key} = {value!r} is not allowed; it must be a number")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"params: {key} = {value!r} is not allowed; it must be a string")
        return str(value)
    return value
