"""Access and ranking metadata of a document (SPEC §2), validated in one place, and the one rule for
how a write may change it (SPEC §2 "How access metadata changes").

Every writer (``campus-search ingest``/sync with folder files, sidecars and front matter; the admin
API's ``PUT`` and ``PATCH``; uploads) resolves what its source *states* against what is *stored* with
:func:`resolve`:

- a field no source states keeps its stored value; ``None`` (YAML ``~`` or an empty value, JSON
  ``null``) clears a field that may be empty (:data:`CLEARABLE`) and is an error for the others;
- a change that loosens access (:func:`loosenings`, from ``security.access``: a restricted visibility
  made public or changed between department and group, another department, more groups, a lower
  clearance) is applied only with an explicit act (``allow_loosening``); without
  one the stored value is kept and the change is reported as held back. Tightening always applies;
- fields an admin pinned through the API are not changed by file writers unless the change tightens;
- a new document whose visibility nobody states gets the configured default
  (``DEFAULT_VISIBILITY``, shipped as ``department``), and the caller reports that it did.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from campus_search.errors import BadRequest, CampusSearchError
from campus_search.security import access
from campus_search.security.access import (
    ACCESS_FIELDS,
    AUDIENCE_FIELDS,
    AUDIENCES,
    CLEARABLE,
    MAX_DOCUMENT_GROUPS,
    MAX_GROUP_LENGTH,
    METADATA_FIELDS,
    VISIBILITIES,
)

__all__ = ["ACCESS_FIELDS", "CLEARABLE", "METADATA_FIELDS", "VISIBILITIES", "AccessMetadata", "Change",
           "Resolution", "check_keys", "check_values", "loosenings", "resolve", "validate"]

# Keys a file may state besides METADATA_FIELDS. Anything else is a mistake (``visibilty``) and fails the file.
DOCUMENT_KEYS = ("title", "id")
FILE_KEYS = METADATA_FIELDS + DOCUMENT_KEYS  # front matter, <file>.meta.yaml sidecars, uploaded files
FOLDER_KEYS = METADATA_FIELDS  # .campus-search.yaml: an id or title there would apply to every file below it
JSONL_KEYS = ("_id", "title", "text", "metadata") + METADATA_FIELDS  # BEIR's own keys plus access metadata


def check_keys(data: Mapping[str, Any], allowed: Collection[str], where: str,
               error: type[CampusSearchError] = BadRequest) -> None:
    """Raise ``error`` naming every key of ``data`` not in ``allowed``, with a "did you mean" hint."""
    unknown = [str(k) for k in data if k not in allowed]
    if not unknown:
        return
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key.lower(), list(allowed), n=1, cutoff=0.6)
        parts.append(f"unknown metadata key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise error(f"{where}: {'; '.join(parts)}; allowed: {', '.join(allowed)}")


def check_values(given: Mapping[str, Any], *, source: str = "metadata") -> None:
    """Validate each stated field on its own (type, range, may it be cleared); combinations, such as
    department visibility without a department, are checked by :func:`resolve` against what is stored."""
    # a base whose every audience field is set, so a visibility is checked on its own
    placeholders: dict[str, Any] = {a.field: ("-",) if a.many else "-" for a in AUDIENCES if a.field}
    base = AccessMetadata(**placeholders)
    for key, value in given.items():
        if key in METADATA_FIELDS:
            base.merged({key: value}, source=source)


@dataclass(frozen=True)
class AccessMetadata:
    """Stored metadata. The field defaults (public, clearance 1, priority 3) are only a base for
    :meth:`merged`; a new document's visibility comes from :func:`resolve`."""

    department: str | None = None
    visibility: str = "public"
    clearance_level: int = 1
    campus: str | None = None
    priority: int = 3
    last_reviewed: dt.datetime | None = None
    groups: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: Iterable[Any]) -> AccessMetadata:
        """From the stored columns in :data:`METADATA_FIELDS` order (``access.columns()``)."""
        values = dict(zip(METADATA_FIELDS, row, strict=True))
        values["groups"] = tuple(values.get("groups") or ())
        return cls(**values)

    def row(self) -> tuple[Any, ...]:
        """The stored columns in :data:`METADATA_FIELDS` order (``access.columns()``)."""
        return tuple(list(v) if isinstance(v, tuple) else v for v in (getattr(self, n) for n in METADATA_FIELDS))

    def merged(self, overrides: Mapping[str, Any], *, source: str = "metadata") -> AccessMetadata:
        """A copy with the fields stated in ``overrides`` applied, validated. ``None`` clears a field in
        :data:`CLEARABLE` and is an error for the others. Keys outside :data:`METADATA_FIELDS` are ignored here
        (callers check them with :func:`check_keys`)."""
        values = {name: getattr(self, name) for name in METADATA_FIELDS}
        for key in METADATA_FIELDS:
            if key not in overrides:
                continue
            if overrides[key] is None and key not in CLEARABLE:
                raise BadRequest(f"{source}: {key} cannot be cleared (null); give a value")
            values[key] = overrides[key]
        return validate(values, source=source)

    def stated(self) -> dict[str, Any]:
        """The fields that have a value, as a mapping a writer can state."""
        return {k: v for k, v in asdict(self).items() if v is not None and v != ()}

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["last_reviewed"] = self.last_reviewed.isoformat() if self.last_reviewed else None
        out["groups"] = list(self.groups)
        return out


# The declaration (security.access) and this dataclass name the same fields in the same order.
assert tuple(f.name for f in dataclasses.fields(AccessMetadata)) == METADATA_FIELDS


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


def _groups(value: Any, source: str) -> tuple[str, ...]:
    """A document's groups: a list of group ids (a single string is one group), stored sorted, unique."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(g, str) for g in value):
        raise BadRequest(f"{source}: groups must be a list of group ids (strings)")
    groups = sorted({g.strip() for g in value if g.strip()})
    if any(len(g) > MAX_GROUP_LENGTH for g in groups):
        raise BadRequest(f"{source}: a group id is longer than {MAX_GROUP_LENGTH} characters")
    if len(groups) > MAX_DOCUMENT_GROUPS:
        raise BadRequest(f"{source}: more than {MAX_DOCUMENT_GROUPS} groups")
    return tuple(groups)


def validate(values: Mapping[str, Any], *, source: str = "metadata") -> AccessMetadata:
    visibility = values.get("visibility", "public")
    if visibility not in VISIBILITIES:
        raise BadRequest(f"{source}: visibility must be one of {', '.join(map(repr, VISIBILITIES))}, "
                         f"got {visibility!r}")
    department = _text(values.get("department"), "department", source)
    groups = _groups(values.get("groups"), source)
    checked = {"department": department, "groups": groups}
    for a in AUDIENCES:  # a restricted audience needs its field: department visibility a department, ...
        if a.field and visibility == a.visibility and not checked[a.field]:
            raise BadRequest(f"{source}: visibility {a.visibility!r} needs {'a ' if not a.many else ''}{a.field}")
    return AccessMetadata(
        groups=groups,
        department=department,
        visibility=visibility,
        clearance_level=_int(values.get("clearance_level", 1), "clearance_level", 1, 5, source),
        campus=_text(values.get("campus"), "campus", source),
        priority=_int(values.get("priority", 3), "priority", 1, 5, source),
        last_reviewed=parse_datetime(values.get("last_reviewed"), source=source),
    )


# --- how a write may change access -----------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One field's change: ``before`` is the stored value, ``after`` what the write asked for."""

    field: str
    before: Any
    after: Any

    def __post_init__(self) -> None:  # groups are tuples in AccessMetadata; shown (and JSON) as lists
        for name in ("before", "after"):
            if isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, list(getattr(self, name)))

    def as_json(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return v.isoformat() if isinstance(v, dt.datetime) else v
        return {"field": self.field, "before": plain(self.before), "after": plain(self.after)}

    def __str__(self) -> str:
        return f"{self.field} {self.before!r} -> {self.after!r}"


def loosenings(before: AccessMetadata, after: AccessMetadata) -> list[Change]:
    """The changes from ``before`` to ``after`` that let someone see the document who could not
    before (:func:`campus_search.security.access.loosening_fields`: a restricted visibility made public
    or changed to another restricted one, a department-visible document handed to another department,
    groups added to a group-visible document, a lower clearance). Empty when ``after`` is at least as
    strict. The one definition of "loosening" every writer uses."""
    return [Change(name, getattr(before, name), getattr(after, name))
            for name in access.loosening_fields(before, after)]


def _tightens(before: AccessMetadata, after: AccessMetadata, name: str) -> bool:
    return access.tightens(before, after, name)


def _keep(stored: AccessMetadata, candidate: AccessMetadata, names: Iterable[str]) -> AccessMetadata:
    """``candidate`` with the fields ``names`` reset to ``stored``'s (visibility, department and groups
    go together: they decide the audience as a whole, :data:`~campus_search.security.access.AUDIENCE_FIELDS`)."""
    keep = set(names)
    if keep & set(AUDIENCE_FIELDS):
        keep |= set(AUDIENCE_FIELDS)
    return replace(candidate, **{name: getattr(stored, name) for name in keep})


@dataclass
class Resolution:
    """What a write does to one document's metadata (see :func:`resolve`)."""

    meta: AccessMetadata
    before: AccessMetadata | None = None
    loosened: list[Change] = field(default_factory=list)  # applied, by an explicit act
    held_back: list[Change] = field(default_factory=list)  # loosening refused: stored value kept
    pinned: list[Change] = field(default_factory=list)  # pinned by an admin: stored value kept
    defaults: dict[str, Any] = field(default_factory=dict)  # new document: defaults applied


def resolve(stored: AccessMetadata | None, given: Mapping[str, Any], *, allow_loosening: bool = False,
            pinned: Collection[str] = (), default_visibility: str = "department",
            source: str = "metadata") -> Resolution:
    """The metadata a write produces from what its sources state (``given``) and what is ``stored``.

    - New document (``stored`` is None): ``given`` over the field defaults; visibility, when nobody
      states it, is ``default_visibility`` (recorded in ``defaults``). ``department`` visibility needs a
      department: without one the write is refused with a message that says what to state.
    - Existing document: fields in ``given`` replace (``None`` clears), the rest keep their stored
      values. Fields in ``pinned`` keep their stored value unless the change tightens access. A
      loosening (:func:`loosenings`) applies only with ``allow_loosening``; otherwise the stored access
      is kept and the refused changes are returned in ``held_back``.

    Raises :class:`BadRequest` for invalid values."""
    if stored is None:
        values = dict(given)
        defaults: dict[str, Any] = {}
        if values.get("visibility") is None:
            values["visibility"] = defaults["visibility"] = default_visibility
            if default_visibility == "department" and not _text(values.get("department"), "department", source):
                raise BadRequest(
                    f"{source}: no visibility stated and no department: a new document gets the default "
                    f"visibility 'department' (DEFAULT_VISIBILITY), which needs a department; state "
                    f"visibility (e.g. --visibility public) or a department")
        return Resolution(AccessMetadata().merged(values, source=source), defaults=defaults)
    candidate = stored.merged(given, source=source)
    kept = [Change(name, getattr(stored, name), getattr(candidate, name)) for name in METADATA_FIELDS
            if name in pinned and getattr(candidate, name) != getattr(stored, name)
            and not _tightens(stored, candidate, name)]
    if kept:
        candidate = _keep(stored, candidate, (c.field for c in kept))
    loose = loosenings(stored, candidate)
    if loose and not allow_loosening:
        return Resolution(_keep(stored, candidate, (c.field for c in loose)), stored, held_back=loose, pinned=kept)
    return Resolution(candidate, stored, loosened=loose, pinned=kept)
