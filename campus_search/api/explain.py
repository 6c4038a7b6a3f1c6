"""``GET /api/admin/explain`` — can this user see this document, and why? (admin only)

``?document_id=ID&role=ROLE[&sub=ID][&department=D ...][&group=G ...][&campus=C]`` describes a user the way a token
would (``role`` is an SSO role value, which goes through ROLE_MAPPING like a token's claim, or a role's
own name, which an admin may give directly here although a token's claim cannot). The
answer gives the decision of the plain-Python rule with its reasons, and the count of the document's
chunks that the SQL predicate used by retrieval lets through -- the two must agree. Every call is
audited: asking what someone may see is itself an admin action.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from campus_search.api import extension
from campus_search.api.auditing import request_context
from campus_search.audit.actions import admin_action
from campus_search.errors import BadRequest, NotFound
from campus_search.ingest.catalog import find_document, visible_chunk_counts
from campus_search.security.access import ACCESS_FIELDS, MAX_GROUP_LENGTH, MAX_PRINCIPAL_GROUPS
from campus_search.security.auth import require_admin
from campus_search.security.roles import Principal, explain_visibility, is_visible, map_role, role_table

bp = Blueprint("explain", __name__)

PARAMS = {"document_id", "role", "sub", "department", "group", "campus"}


def _role(claim: str, settings: Any) -> tuple[Any, str]:
    roles = role_table(settings.roles_json)
    if claim == "anonymous":
        return roles["anonymous"], "anonymous (no token)"
    if claim in settings.role_mapping:
        role = map_role(claim, settings.role_mapping, roles)
        return role, f"SSO role {claim!r} maps to {role.name} (ROLE_MAPPING)"
    if claim in roles:  # the admin names a role directly (a token's claim never does: see map_role)
        return roles[claim], f"role {claim!r}"
    role = map_role(claim, settings.role_mapping, roles)
    return role, f"SSO role {claim!r} is not in ROLE_MAPPING: least-privileged role {role.name}"


@bp.get("/api/admin/explain")
def explain() -> Any:
    services = extension.services()
    settings = services.settings
    require_admin(settings)
    # Every call is audited, refused ones too (a 400 or a 404 with its error code).
    target = request.args.get("document_id", "").strip()[:1000] or None
    with admin_action(services, "explain", target=target, context=request_context(settings)) as details:
        answer = _explain(services, settings, details)
    return jsonify(answer)


def _explain(services: Any, settings: Any, details: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(request.args) - PARAMS)
    if unknown:
        raise BadRequest(f"unknown parameters: {', '.join(unknown)}", details={"allowed": sorted(PARAMS)})
    document_id = request.args.get("document_id", "").strip()
    claim = request.args.get("role", "").strip()
    if not document_id or not claim:
        raise BadRequest("document_id and role are required")
    departments = tuple(d.strip() for d in request.args.getlist("department") if d.strip())
    groups = tuple(sorted({g.strip() for g in request.args.getlist("group") if g.strip()}))
    if (len(document_id) > 1000 or len(claim) > 200 or len(departments) > 50 or len(groups) > MAX_PRINCIPAL_GROUPS
            or any(len(g) > MAX_GROUP_LENGTH for g in groups)):
        raise BadRequest("parameter too long")
    role, how = _role(claim, settings)
    user = Principal(user_id=request.args.get("sub", "").strip()[:256] or "(hypothetical user)", role=role,
                     departments=departments, campus=request.args.get("campus") or None, groups=groups)
    details.update(sub=user.user_id, role=role.name)
    services.ensure_open()
    with services.db.connection(read=True) as conn:
        doc = find_document(conn, document_id)
        if doc is None:
            raise NotFound("no document with that id")
        total, allowed = visible_chunk_counts(conn, user, doc[0])
    meta = {name: value for name, value in doc[3].as_json().items() if name in ACCESS_FIELDS + ("campus",)}
    visible = is_visible(meta, user)
    details["visible"] = visible
    return {
        "document": {"document_id": doc[1], "document_title": doc[2], **meta},
        "user": {"user_id": user.user_id, "role": role.name, "role_claim": claim, "role_resolution": how,
                 "clearance": role.clearance, "department_scope": role.department_scope,
                 "group_scope": role.group_scope, "departments": list(departments), "groups": list(user.groups),
                 "campus": user.campus},
        "visible": visible,
        "reasons": explain_visibility(meta, user),
        "chunks": {"total": total, "visible": allowed},
        # The SQL predicate (what retrieval runs) and the Python rule must agree on every chunk.
        "consistent": allowed == (total if visible else 0),
    }
