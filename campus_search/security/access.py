"""The access model, declared once (SPEC §2): which attributes a document carries, which a principal
carries, and how they meet. Everything else follows from the two tables below:

- :data:`DOCUMENT_FIELDS`: the metadata every document carries, on its ``documents`` row only (chunks
  and lexical postings reach it by ``document_id``: access by reference, migration 017): names, column
  types, which of them decide access, which may be cleared. The column lists of ingestion (``UPDATE``),
  of retrieval (``SELECT``), of the admin API's document JSON and of the tests' DDL check are
  :func:`columns` of it.
- :data:`AUDIENCES`: one entry per value of ``visibility``. It names the document field that says who
  may see such a document (``department``, ``groups``), the principal's attribute matched against it
  (``departments``, ``groups``), the role field that decides whether a role's holders see it regardless
  (``department_scope``, ``group_scope``: ``none`` / the membership value / ``all``) and whether the
  field is a list (share one value) or a single value (be one of the principal's). From it follow:

  - :func:`visible_sql`, the SQL predicate compiled into every retrieval query, over the chunk's
    document (alias ``d``);
  - :func:`is_visible`, the plain-Python reference; :func:`explain`, the reasons the explain endpoint
    gives;
  - :func:`scope_key`, the cache's permission scope (two principals with equal keys see the same chunks);
  - :func:`loosenings` / :func:`tightens` / :data:`AUDIENCE_FIELDS`: what counts as loosening a stored
    document's access (``ingest.metadata.resolve``).

The rule, as these functions spell it::

    visible(doc, user) = doc.clearance_level <= user.clearance            -- the ceiling, always
                         AND (doc.visibility = 'public'
                              OR (doc.visibility = 'department'
                                  AND (role.department_scope = 'all'
                                       OR (role.department_scope = 'own' AND doc.department IN user.departments)))
                              OR (doc.visibility = 'group'
                                  AND (role.group_scope = 'all'
                                       OR (role.group_scope = 'member' AND doc.groups && user.groups))))

A chunk is visible exactly when its document is.

Adding an attribute: a :class:`DocumentField` (and, if it restricts an audience, an :class:`Audience`
with its role scope and principal attribute), a migration adding the column to ``documents`` (and an
index if the rule filters on it), and the metadata validator.
``tests/test_access_model.py`` checks that the migrations, the dataclasses and this declaration agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DocumentField:
    """One metadata attribute of a document (a column of ``documents``)."""

    name: str
    copy_type: str  # the column's type, as psycopg's binary COPY names it
    access: bool = False  # decides who may see the document (the rest only rank or filter)
    clearable: bool = False  # ``null`` may clear it (``department`` only while no audience needs it)


#: Column order is the order of ``AccessMetadata``'s fields and of every column list built here.
DOCUMENT_FIELDS: tuple[DocumentField, ...] = (
    DocumentField("department", "text", access=True, clearable=True),
    DocumentField("visibility", "text", access=True),
    DocumentField("clearance_level", "int2", access=True),
    DocumentField("campus", "text", clearable=True),
    DocumentField("priority", "int2"),
    DocumentField("last_reviewed", "timestamp", clearable=True),
    DocumentField("groups", "text[]", access=True, clearable=True),
)
METADATA_FIELDS = tuple(f.name for f in DOCUMENT_FIELDS)
ACCESS_FIELDS = tuple(f.name for f in DOCUMENT_FIELDS if f.access)
CLEARABLE = tuple(f.name for f in DOCUMENT_FIELDS if f.clearable)
COPY_TYPES = tuple(f.copy_type for f in DOCUMENT_FIELDS)
LIST_FIELDS = tuple(f.name for f in DOCUMENT_FIELDS if f.copy_type.endswith("[]"))  # a list in metadata files

#: The ceiling: a document field compared with the principal's clearance, whatever the audience.
CEILING_FIELD = "clearance_level"


def columns(alias: str | None = None, names: Sequence[str] = METADATA_FIELDS) -> str:
    """``"c.department, c.visibility, ..."``: the metadata columns in declaration order."""
    return ", ".join(f"{alias}.{n}" if alias else n for n in names)


@dataclass(frozen=True)
class Audience:
    """Who may see a document of one ``visibility`` value (below the clearance ceiling)."""

    visibility: str
    field: str | None = None  # the document field naming the audience; None: everyone
    principal: str | None = None  # the Principal attribute matched against ``field``
    scope: str | None = None  # the Role field: "none", ``member`` or "all"
    member: str = "own"  # the scope value meaning "only when the principal matches"
    many: bool = False  # ``field`` is a list: the principal must share one of its values
    noun: str = ""  # for the explain text

    @property
    def scopes(self) -> tuple[str, str, str]:
        return ("none", self.member, "all")


AUDIENCES: tuple[Audience, ...] = (
    Audience("public"),
    Audience("department", field="department", principal="departments", scope="department_scope",
             member="own", noun="department"),
    Audience("group", field="groups", principal="groups", scope="group_scope", member="member", many=True,
             noun="group"),
)
VISIBILITIES = tuple(a.visibility for a in AUDIENCES)
#: The document fields that, with ``visibility``, decide a document's audience (they change together).
AUDIENCE_FIELDS = ("visibility", *(a.field for a in AUDIENCES if a.field))
#: Role fields deciding what each role sees of restricted audiences, with their allowed values.
ROLE_SCOPES: dict[str, tuple[str, ...]] = {a.scope: a.scopes for a in AUDIENCES if a.scope}
#: Principal attributes the rule reads besides the clearance.
PRINCIPAL_ATTRIBUTES = ("clearance", *(a.principal for a in AUDIENCES if a.principal))

#: Bounds on a principal's group list (a token claim or a proxy header): longer entries are dropped,
#: a longer list is refused whole (the stricter behaviour: no group access), see :func:`clean_groups`.
MAX_PRINCIPAL_GROUPS = 500
MAX_GROUP_LENGTH = 256
#: Bounds on a document's groups (metadata files, flags, the admin API).
MAX_DOCUMENT_GROUPS = 100


def audience(visibility: str) -> Audience:
    for a in AUDIENCES:
        if a.visibility == visibility:
            return a
    raise ValueError(f"unknown visibility {visibility!r}")


def _reach(a: Audience, user: Any) -> str | None:
    """How ``user`` reaches documents of audience ``a``: "all", "member" (by matching) or None."""
    if a.scope is None:
        return "all"
    scope = getattr(user.role, a.scope)
    if scope == "all":
        return "all"
    if scope == a.member and getattr(user, a.principal or ""):
        return "member"
    return None


def _values(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {value}
    return set(value)


def _matches(a: Audience, chunk: Mapping[str, Any], user: Any) -> bool:
    mine = set(getattr(user, a.principal or ""))
    value = chunk.get(a.field or "")
    return bool(_values(value) & mine) if a.many else value in mine


# --- the rule, three forms ----------------------------------------------------------------------------

def visible_sql(user: Any, alias: str = "d") -> tuple[str, dict[str, Any]]:
    """The rule as a SQL predicate over a ``documents`` row (alias ``d``; a chunk is visible when its
    document is). Parameters are named ``vis_*``."""
    params: dict[str, Any] = {"vis_clearance": user.clearance}
    clause = f"{alias}.{CEILING_FIELD} <= %(vis_clearance)s"
    whole: list[str] = []
    parts: list[str] = []
    for a in AUDIENCES:
        reach = _reach(a, user)
        if reach == "all":
            whole.append(a.visibility)
        elif reach == "member":
            name = f"vis_{a.principal}"
            params[name] = sorted(set(getattr(user, a.principal or "")))
            match = (f"{alias}.{a.field} && %({name})s::text[]" if a.many
                     else f"{alias}.{a.field} = ANY(%({name})s)")
            parts.append(f"({alias}.visibility = '{a.visibility}' AND {match})")
    if len(whole) == len(AUDIENCES):
        return clause, params
    if whole:
        parts.insert(0, f"{alias}.visibility = '{whole[0]}'" if len(whole) == 1 else
                     f"{alias}.visibility IN ({', '.join(repr(v) for v in whole)})")
    if not parts:
        parts = ["false"]
    return clause + " AND " + (parts[0] if len(parts) == 1 else f"({' OR '.join(parts)})"), params


def is_visible(chunk: Mapping[str, Any], user: Any) -> bool:
    """The plain-Python reference of :func:`visible_sql` (tests, the explain endpoint)."""
    if int(chunk[CEILING_FIELD]) > user.clearance:
        return False
    for a in AUDIENCES:
        if chunk["visibility"] != a.visibility:
            continue
        reach = _reach(a, user)
        return reach == "all" or (reach == "member" and _matches(a, chunk, user))
    return False


def _shown(values: Iterable[str], limit: int = 20) -> str:
    items = sorted(values)
    return repr(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def explain(chunk: Mapping[str, Any], user: Any) -> list[str]:
    """Human-readable reasons for the decision of :func:`is_visible`."""
    level = int(chunk[CEILING_FIELD])
    reasons = [f"document clearance {level} is above the user's clearance {user.clearance}" if level > user.clearance
               else f"document clearance {level} is within the user's clearance {user.clearance}"]
    a = audience(chunk["visibility"])
    if a.scope is None:
        reasons.append("document is public")
        return reasons
    scope = getattr(user.role, a.scope)
    value = chunk.get(a.field or "")
    shown = _shown(_values(value)) if a.many else repr(value)
    mine = getattr(user, a.principal or "")
    if scope == "all":
        reasons.append(f"role {user.role.name} may see every {a.noun} ({a.scope} all)")
    elif scope != a.member:
        reasons.append(f"document is restricted to {a.noun} {shown} and role {user.role.name} sees no "
                       f"{a.noun}-restricted content ({a.scope} {scope})")
    elif _matches(a, chunk, user):
        shared = _shown(_values(value) & set(mine)) if a.many else repr(value)
        reasons.append(f"document belongs to the user's {a.noun} {shared}")
    else:
        reasons.append(f"document is restricted to {a.noun} {shown}, user's {a.principal} are "
                       f"{_shown(mine) if a.many else list(mine)}")
    return reasons


def scope_key(user: Any) -> str:
    """What determines visibility: two principals with equal keys see exactly the same chunks. Bounded
    in size: a membership list longer than a few entries is represented by its hash."""
    parts = [f"c{user.clearance}"]
    for a in AUDIENCES:
        if a.scope is None:
            continue
        reach = _reach(a, user)
        if reach == "all":
            token = "*"
        elif reach is None:
            token = "-"
        else:
            # JSON, not a joined string: a name may itself contain a separator
            token = json.dumps(sorted(set(getattr(user, a.principal or ""))), ensure_ascii=False)
            if len(token) > 64:
                token = "h" + hashlib.sha256(token.encode()).hexdigest()[:32]
        parts.append(f"{a.field[0] if a.field else a.visibility[0]}:{token}")
    return "|".join(parts)


# --- how a write may change access ---------------------------------------------------------------------

def _narrower_or_same(a: Audience, before: Any, after: Any) -> bool:
    """Whether the audience ``after`` is contained in ``before`` (same visibility)."""
    if a.many:
        return _values(after) <= _values(before)
    return bool(after == before)


def loosening_fields(before: Any, after: Any) -> list[str]:
    """The access fields whose change from ``before`` to ``after`` (objects with the
    :data:`METADATA_FIELDS` as attributes) lets someone see the document who could not before, in this
    order: the audience (``visibility`` when it changes away from a restricted audience, including
    department ↔ group: a different audience; otherwise the audience field when it widens or moves),
    then a lower clearance."""
    out: list[str] = []
    b = audience(before.visibility)
    if b.field is not None:
        if after.visibility != before.visibility:
            out.append("visibility")
        elif not _narrower_or_same(b, getattr(before, b.field), getattr(after, b.field)):
            out.append(b.field)
    if getattr(after, CEILING_FIELD) < getattr(before, CEILING_FIELD):
        out.append(CEILING_FIELD)
    return out


def tightens(before: Any, after: Any, name: str) -> bool:
    """Whether changing field ``name`` from ``before`` to ``after`` only narrows who may see the document
    (a file writer may change a pinned field this way)."""
    if name == CEILING_FIELD:
        return bool(getattr(after, name) > getattr(before, name))
    if name in AUDIENCE_FIELDS:
        if before.visibility == "public":
            return after.visibility != "public"
        a = audience(before.visibility)
        return (after.visibility == before.visibility and a.many and a.field is not None
                and _values(getattr(after, a.field)) < _values(getattr(before, a.field)))
    return False


def clean_groups(raw: Any) -> tuple[tuple[str, ...], str | None]:
    """A principal's groups from a claim or header value: (groups, problem). A string is one group; a list
    keeps its non-empty string entries up to :data:`MAX_GROUP_LENGTH` characters (others are dropped and
    reported); anything else, or more than :data:`MAX_PRINCIPAL_GROUPS` entries, gives no groups at all
    (the stricter behaviour) and says why. ``problem`` is None when the value was clean."""
    if raw is None:
        return (), None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple):
        return (), f"groups claim is a {type(raw).__name__}, not a list of strings: ignored"
    if len(raw) > MAX_PRINCIPAL_GROUPS:
        return (), f"groups claim has {len(raw)} entries, more than {MAX_PRINCIPAL_GROUPS}: ignored"
    kept = sorted({g.strip() for g in raw if isinstance(g, str) and g.strip() and len(g) <= MAX_GROUP_LENGTH})
    dropped = sum(1 for g in raw if not (isinstance(g, str) and g.strip() and len(g) <= MAX_GROUP_LENGTH))
    problem = (f"{dropped} groups claim entr{'y' if dropped == 1 else 'ies'} not a string of 1-"
               f"{MAX_GROUP_LENGTH} characters: dropped") if dropped else None
    return tuple(kept), problem
