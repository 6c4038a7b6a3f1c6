"""What one setting is: :class:`Field` (environment names, default, help, parser) and :func:`setting`, which
declares it as an attribute of :class:`~campus_search.config.settings.Settings`; plus the parsers of values
written in the environment. Imports nothing from the rest of the package.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

T = TypeVar("T")


@dataclass(frozen=True)
class Field:
    name: str  # attribute on Settings
    env: tuple[str, ...]  # environment names, first wins
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    secret: bool = False


def setting(env: tuple[str, ...], default: T, help: str, parse: Callable[[str], Any] = str, *,
            secret: bool = False) -> T:
    """Declare one setting as a :class:`Settings` attribute: its default is written here and nowhere else.

    Returns a dataclass field carrying the :class:`Field` (``FIELDS`` is read back from them); typed as
    the default so the annotation on the attribute is checked against it. A dict default is copied for
    every Settings built (a dataclass default must not be a shared mutable)."""
    declared = Field("", env, default, help, parse, secret)
    metadata = {"setting": declared}
    if isinstance(default, dict):
        return cast(T, dataclasses.field(default_factory=lambda: dict(default), metadata=metadata))
    return cast(T, dataclasses.field(default=default, metadata=metadata))


def declared_fields(cls: type) -> tuple[Field, ...]:
    """The :class:`Field` of every attribute of the dataclass ``cls``, in order. Every attribute must be
    declared with :func:`setting`: a plain default would be a second place where defaults live."""
    out: list[Field] = []
    for attribute in dataclasses.fields(cls):
        declared = attribute.metadata.get("setting")
        if not isinstance(declared, Field):
            raise TypeError(f"{cls.__name__}.{attribute.name} is not declared with setting() "
                            "(every setting has one declaration: environment names, default, help, parser)")
        out.append(dataclasses.replace(declared, name=attribute.name))
    return tuple(out)


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {raw!r}")


def parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def parse_json_object(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def parse_visibility(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("public", "department"):
        raise ValueError(f"expected 'public' or 'department', got {raw!r}")
    return value


def parse_mapping(raw: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}."""
    out: dict[str, str] = {}
    for part in parse_list(raw):
        if "=" not in part:
            raise ValueError(f"expected name=value pairs separated by commas, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out
