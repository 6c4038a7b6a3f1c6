"""Roles, principals and the visibility rule (SPEC §2).

The rule, in one place, in two forms that must agree (tests check them against each other):
``visible_sql`` is compiled into every retrieval query; ``is_visible`` is the plain-Python reference.

    visible(chunk, user) = chunk.clearance_level <= user.clearance
                           AND (chunk.visibility = 'public'
                                OR user.role.department_scope = 'all'
                                OR (user.role.department_scope = 'own'
                                    AND chunk.department IN user.departments))

Students (scope ``none``) see public content only, whatever department their token names.

The role table (clearance, rate limits, result cap, department scope) is configuration: SPEC §2's
Edinburgh defaults below, overridden or extended per role by ``ROLES_JSON`` (see :func:`build_roles`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Role:
    name: str
    clearance: int
    per_minute: int
    per_hour: int
    max_results: int
    #: department-restricted content this role sees: "none" (public only), "own" or "all"
    department_scope: str

    @property
    def cross_departmental(self) -> bool:
        return self.department_scope == "all"


#: SPEC §2 defaults (University of Edinburgh).
DEFAULT_ROLES: dict[str, Role] = {
    "student": Role("student", 2, 30, 500, 20, "none"),
    "staff": Role("staff", 3, 60, 1000, 50, "own"),
    "academic": Role("academic", 4, 100, 2000, 100, "all"),
    "admin": Role("admin", 5, 200, 5000, 200, "all"),
}
ROLE_NAMES = tuple(DEFAULT_ROLES)
ANONYMOUS_ROLE = Role("anonymous", 1, 30, 500, 20, "none")
SCOPES = ("none", "own", "all")
ROLE_FIELDS = ("clearance", "per_minute", "per_hour", "max_results", "department_scope")
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
        unknown = sorted(set(spec) - set(ROLE_FIELDS))
        if unknown:
            raise ValueError(f"role {name!r}: unknown fields {unknown}; allowed {list(ROLE_FIELDS)}")
        if name not in table and set(spec) != set(ROLE_FIELDS):
            raise ValueError(f"new role {name!r} must give every field: {', '.join(ROLE_FIELDS)}")
        for key in ("clearance", "per_minute", "per_hour", "max_results"):
            value = spec.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"role {name!r}: {key} must be a positive integer")
        if not 1 <= int(spec.get("clearance", 1)) <= 5:
            raise ValueError(f"role {name!r}: clearance must be 1-5")
        if "department_scope" in spec and spec["department_scope"] not in SCOPES:
            raise ValueError(f"role {name!r}: department_scope must be one of {list(SCOPES)}")
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
        """What determines visibility: two principals with equal keys see exactly the same chunks."""
        scope = self.role.department_scope
        # JSON, not a joined string: a department name may itself contain the separator
        depts = {"all": "*", "none": "-"}.get(scope) or json.dumps(sorted(set(self.departments)),
                                                                   ensure_ascii=False)
        return f"c{self.clearance}|d:{depts}"


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


def is_visible(chunk: Mapping[str, Any], user: Principal) -> bool:
    """Reference implementation of the visibility rule (used by tests and the admin explain endpoint)."""
    if int(chunk["clearance_level"]) > user.clearance:
        return False
    if chunk["visibility"] == "public" or user.role.department_scope == "all":
        return True
    return user.role.department_scope == "own" and chunk.get("department") in user.departments


def explain_visibility(chunk: Mapping[str, Any], user: Principal) -> list[str]:
    """Human-readable reasons for the decision of :func:`is_visible`."""
    reasons = []
    level = int(chunk["clearance_level"])
    if level > user.clearance:
        reasons.append(f"document clearance {level} is above the user's clearance {user.clearance}")
    else:
        reasons.append(f"document clearance {level} is within the user's clearance {user.clearance}")
    if chunk["visibility"] == "public":
        reasons.append("document is public")
    elif user.role.cross_departmental:
        reasons.append(f"role {user.role.name} may see every department")
    elif user.role.department_scope == "none":
        reasons.append(f"document is restricted to department {chunk.get('department')!r} and role "
                       f"{user.role.name} sees public content only")
    elif chunk.get("department") in user.departments:
        reasons.append(f"document belongs to the user's department {chunk.get('department')!r}")
    else:
        reasons.append(
            f"document is restricted to department {chunk.get('department')!r}, "
            f"user's departments are {list(user.departments)}")
    return reasons


def visible_sql(user: Principal, alias: str = "c") -> tuple[str, dict[str, Any]]:
    """The visibility rule as a SQL predicate over the chunk table (denormalised access columns)."""
    params: dict[str, Any] = {"vis_clearance": user.clearance}
    clause = f"{alias}.clearance_level <= %(vis_clearance)s"
    scope = user.role.department_scope
    if scope == "none" or (scope == "own" and not user.departments):
        clause += f" AND {alias}.visibility = 'public'"
    elif scope == "own":
        params["vis_departments"] = list(user.departments)
        clause += f" AND ({alias}.visibility = 'public' OR {alias}.department = ANY(%(vis_departments)s))"
    return clause, params
