"""Roles, principals and the mapping of SSO role values to roles (SPEC §2).

The visibility rule itself is declared in :mod:`campus_search.security.access` (one declaration from which
the SQL predicate, the Python predicate, the explain text and the cache scope follow); ``is_visible``,
``explain_visibility``, ``visible_sql`` and ``Principal.scope_key`` here are that module's, re-exported.

The role table (clearance, rate limits, result cap, department and group scope) is configuration: SPEC
§2's Edinburgh defaults below, overridden or extended per role by ``ROLES_JSON`` (see :func:`build_roles`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from campus_search.security import access
from campus_search.security.access import ROLE_SCOPES, is_visible, visible_sql
from campus_search.security.access import explain as explain_visibility

__all__ = ["ANONYMOUS_ROLE", "CAMPUS_BONUS", "DEFAULT_ROLES", "Principal", "Role", "build_roles",
           "explain_visibility", "is_visible", "map_role", "role_table", "sso_value_for", "superuser",
           "visible_sql"]

@dataclass(frozen=True)
class Role:
    name: str
    clearance: int
    per_minute: int
    per_hour: int
    max_results: int
    #: department-restricted content this role sees: "none" (public only), "own" or "all"
    department_scope: str
    #: group-visible content this role sees: "none", "member" (documents of the principal's own groups)
    #: or "all"; only admins see every group's documents by default (docs/security.md)
    group_scope: str = "member"

    @property
    def cross_departmental(self) -> bool:
        return self.department_scope == "all"


#: SPEC §2 defaults (University of Edinburgh).
DEFAULT_ROLES: dict[str, Role] = {
    "student": Role("student", 2, 30, 500, 20, "none"),
    "staff": Role("staff", 3, 60, 1000, 50, "own"),
    "academic": Role("academic", 4, 100, 2000, 100, "all"),
    "admin": Role("admin", 5, 200, 5000, 200, "all", "all"),
}
ROLE_NAMES = tuple(DEFAULT_ROLES)
ANONYMOUS_ROLE = Role("anonymous", 1, 30, 500, 20, "none", "none")
SCOPES = ROLE_SCOPES["department_scope"]
#: Fields a new role must give (ROLES_JSON); ``group_scope`` may be omitted (then "member").
ROLE_FIELDS = ("clearance", "per_minute", "per_hour", "max_results", "department_scope")
OPTIONAL_ROLE_FIELDS = tuple(scope for scope in ROLE_SCOPES if scope not in ROLE_FIELDS)
_ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def build_roles(overrides: Mapping[str, Any] | None = None) -> dict[str, Role]:
    """The role table: SPEC §2 defaults plus ``anonymous``, with ``overrides`` merged per role.

    ``overrides`` maps a role name to some or all of :data:`ROLE_FIELDS`, e.g.
    ``{"staff": {"max_results": 80}, "visitor": {"clearance": 1, "per_minute": 10, "per_hour": 100,
    "max_results": 10, "department_scope": "none"}}``. A new role must give every field. Raises
    ValueError naming the first problem.
    """
    table = {**DEFAULT_ROLES, "anonymous": ANONYMOUS_ROLE}
    for name, spec in (overrides or {}).items():
        if not isinstance(name, str) or not _ROLE_NAME.match(name):
            raise ValueError(f"role name {name!r} must be lower-case letters, digits, '_' or '-'")
        if not isinstance(spec, Mapping):
            raise ValueError(f"role {name!r}: expected an object of {', '.join(ROLE_FIELDS)}")
        unknown = sorted(set(spec) - set(ROLE_FIELDS) - set(OPTIONAL_ROLE_FIELDS))
        if unknown:
            raise ValueError(f"role {name!r}: unknown fields {unknown}; allowed "
                             f"{list(ROLE_FIELDS + OPTIONAL_ROLE_FIELDS)}")
        if name not in table and not set(ROLE_FIELDS) <= set(spec):
            raise ValueError(f"new role {name!r} must give every field: {', '.join(ROLE_FIELDS)}")
        for key in ("clearance", "per_minute", "per_hour", "max_results"):
            value = spec.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"role {name!r}: {key} must be a positive integer")
        if not 1 <= int(spec.get("clearance", 1)) <= 5:
            raise ValueError(f"role {name!r}: clearance must be 1-5")
        for scope, allowed in ROLE_SCOPES.items():
            if scope in spec and spec[scope] not in allowed:
                raise ValueError(f"role {name!r}: {scope} must be one of {list(allowed)}")
        base = table.get(name) or Role(name, 1, 1, 1, 1, "none")
        table[name] = replace(base, **dict(spec))
    return table


@functools.lru_cache(maxsize=16)
def _cached_table(key: str) -> Mapping[str, Role]:
    return MappingProxyType(build_roles(json.loads(key)))


def role_table(overrides: Mapping[str, Any] | None = None) -> Mapping[str, Role]:
    """:func:`build_roles`, memoised and read-only (called on every request)."""
    return _cached_table(json.dumps(dict(overrides or {}), sort_keys=True))

#: Campus bonus added to combined_score when the user's campus matches the document's.
CAMPUS_BONUS: dict[str, float] = {
    "Central Campus": 0.1,
    "King's Buildings": 0.1,
    "Easter Bush": 0.05,
    "Western General": 0.05,
}


@dataclass(frozen=True)
class Principal:
    """Who is asking: always derived from a verified token (or anonymous), never from the request body."""

    user_id: str
    role: Role
    departments: tuple[str, ...] = ()
    campus: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: the user's groups (GROUPS_CLAIM or PROXY_GROUPS_HEADER), cleaned by ``access.clean_groups``
    groups: tuple[str, ...] = ()
    #: what was wrong with the groups claim, if anything (logged and audited; the claim was narrowed)
    groups_problem: str | None = field(default=None, compare=False, hash=False)

    @property
    def clearance(self) -> int:
        return self.role.clearance

    @property
    def is_admin(self) -> bool:
        return self.role.name == "admin"

    @property
    def anonymous(self) -> bool:
        return self.role.name == "anonymous"

    @property
    def primary_department(self) -> str | None:
        return self.departments[0] if self.departments else None

    def scope_key(self) -> str:
        """What determines visibility: two principals with equal keys see exactly the same chunks
        (:func:`campus_search.security.access.scope_key`)."""
        return access.scope_key(self)


def superuser(user_id: str = "system") -> Principal:
    """A principal that may see everything (evaluation, health checks)."""
    return Principal(user_id=user_id, role=DEFAULT_ROLES["admin"])


def map_role(sso_role: Any, mapping: Mapping[str, str], roles: Mapping[str, Role] = DEFAULT_ROLES) -> Role:
    """SSO role claim -> Role, through ``mapping`` (ROLE_MAPPING) only. A value that is not a key of the
    mapping gets the least-privileged role (student), even when it happens to equal a role's name: an
    identity provider that sends ``admin`` for some unrelated group must not make its members admins.
    Malformed values get student too; ``anonymous`` is never reachable from a claim."""
    if isinstance(sso_role, list | tuple):
        # Several roles: the most privileged one that is known wins.
        candidates = [map_role(r, mapping, roles) for r in sso_role[:50]]
        return max(candidates, key=lambda r: r.clearance, default=roles["student"])
    if not isinstance(sso_role, str):
        return roles["student"]
    name = mapping.get(sso_role)
    if name is None or name == "anonymous":
        return roles["student"]
    return roles.get(name, roles["student"])


def sso_value_for(role: str, mapping: Mapping[str, str]) -> str | None:
    """The SSO role value a locally minted token must carry to be given ``role``: ``role`` itself when
    it is a key of ``mapping``, else the first key that maps to it; None when no key does (the server
    would then treat the token as a student)."""
    if role in mapping:
        return role
    return next((sso for sso, name in mapping.items() if name == role), None)
