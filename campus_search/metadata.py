"""Access and ranking metadata of a document (SPEC §2), validated in one place."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import BadRequest

FIELDS = ("department", "visibility", "clearance_level", "campus", "priority", "last_reviewed")
VISIBILITIES = ("public", "department")


@dataclass(frozen=True)
class AccessMetadata:
    """Defaults: public, clearance 1, priority 3 (documents without access metadata are public)."""

    department: str | None = None
    visibility: str = "public"
    clearance_level: int = 1
    campus: str | None = None
    priority: int = 3
    last_reviewed: dt.datetime | None = None

    def merged(self, overrides: Mapping[str, Any], *, source: str = "metadata") -> AccessMetadata:
        """A copy with ``overrides`` applied (validated). Unknown keys are ignored by the caller's choice."""
        values = asdict(self)
        for key in FIELDS:
            if key in overrides and overrides[key] is not None:
                values[key] = overrides[key]
        return validate(values, source=source)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["last_reviewed"] = self.last_reviewed.isoformat() if self.last_reviewed else None
        return out


def _int(value: Any, name: str, lo: int, hi: int, source: str) -> int:
    if isinstance(value, bool):
        raise BadRequest(f"{source}: {name} must be an integer {lo}-{hi}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{source}: {name} must be an integer {lo}-{hi}, got {value!r}") from None
    if str(number) != str(value).strip() and not isinstance(value, int):
        raise BadRequest(f"{source}: {name} must be an integer {lo}-{hi}, got {value!r}")
    if not lo <= number <= hi:
        raise BadRequest(f"{source}: {name} must be between {lo} and {hi}, got {number}")
    return number


def parse_datetime(value: Any, name: str = "last_reviewed", source: str = "metadata") -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, dt.date):
        parsed = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{source}: {name} must be an ISO 8601 date, got {value!r}") from None
    else:
        raise BadRequest(f"{source}: {name} must be an ISO 8601 date")
    if parsed.tzinfo is not None:  # stored as UTC wall time
        try:
            parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
        except OverflowError:  # e.g. 0001-01-01 with a positive offset
            raise BadRequest(f"{source}: {name} is out of range") from None
    return parsed


def _text(value: Any, name: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise BadRequest(f"{source}: {name} must be a string")
    text = str(value).strip()
    if len(text) > 200:
        raise BadRequest(f"{source}: {name} is too long")
    return text or None


def validate(values: Mapping[str, Any], *, source: str = "metadata") -> AccessMetadata:
    visibility = values.get("visibility", "public")
    if visibility not in VISIBILITIES:
        raise BadRequest(f"{source}: visibility must be 'public' or 'department', got {visibility!r}")
    department = _text(values.get("department"), "department", source)
    if visibility == "department" and not department:
        raise BadRequest(f"{source}: visibility 'department' needs a department")
    return AccessMetadata(
        department=department,
        visibility=visibility,
        clearance_level=_int(values.get("clearance_level", 1), "clearance_level", 1, 5, source),
        campus=_text(values.get("campus"), "campus", source),
        priority=_int(values.get("priority", 3), "priority", 1, 5, source),
        last_reviewed=parse_datetime(values.get("last_reviewed"), source=source),
    )
