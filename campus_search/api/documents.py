"""Admin document management (admin role only; every change audited).

- ``GET    /api/admin/documents``        list: ``?limit=&offset=&department=&q=`` (title or id contains q)
- ``GET    /api/admin/documents/<id>``   one document: metadata, pinned fields, chunk count, sections, pages
- ``PUT    /api/admin/documents/<id>``   upsert: JSON ``{"text", "format", "title", "metadata",
  "allow_loosening"}`` or multipart ``file`` (PDF, DOCX, HTML, Markdown, text) + optional ``metadata``
  (a JSON object), ``title`` and ``allow_loosening``
- ``PATCH  /api/admin/documents/<id>``   metadata only ``{"metadata": {...}, "allow_loosening", "unpin"}``
- ``DELETE /api/admin/documents/<id>``   delete the document and its chunks

Upserts go through the same :class:`Ingester` as ``campus-search ingest``: unchanged content is not
re-embedded, changed content re-embeds only new chunks, and the swap is one transaction.

Access metadata follows :func:`campus_search.ingest.metadata.resolve` (SPEC §2): metadata given replaces
only the fields given (``null`` clears campus, last_reviewed, or department while public); for an
existing document the others keep their stored values. A change that loosens access is refused with
409 ``loosening_refused`` unless the request says ``"allow_loosening": true``; an uploaded file's own
front matter can tighten an existing document but never loosen it (held back, reported in
``held_back``), whatever the request says. A new document whose visibility nobody states gets
``DEFAULT_VISIBILITY`` (reported in ``defaults_applied``). ``PATCH`` pins the fields it sets, so a sync
from the document's source file cannot undo them (it may only tighten them) until ``"unpin"`` releases
them. ``PUT`` cannot replace a document that ``campus-search ingest`` owns (409 ``source_conflict``).
Upload size: ``MAX_DOCUMENT_BYTES``; what a document may unpack to: ``MAX_DOCUMENT_UNPACKED_BYTES``,
``MAX_DOCUMENT_CHARS``, ``MAX_DOCUMENT_CHUNKS`` (422 beyond them).

Ids are taken exactly as given in the URL (percent-encoded UTF-8) or refused with a 400 that says why
(:mod:`campus_search.ingest.textrules`): never trimmed, never repaired. Text that cannot be stored (NUL, lone
surrogates) anywhere in a JSON body is a 400, as is JSON nested too deeply to parse.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from flask import Blueprint, g, jsonify, request
from werkzeug.routing import PathConverter

from campus_search.api import extension
from campus_search.api.auditing import request_context
from campus_search.audit.actions import AdminChange, admin_change
from campus_search.errors import BadRequest, CampusSearchError, NotFound, PayloadTooLarge
from campus_search.ingest.catalog import document_detail, list_documents_page
from campus_search.ingest.metadata import METADATA_FIELDS, AccessMetadata, check_keys, check_values, loosenings, resolve
from campus_search.ingest.pipeline import LooseningRefused
from campus_search.ingest.sources import BYTE_PARSERS, parse_bytes
from campus_search.ingest.textrules import MAX_TITLE_CHARS, id_problem, json_text_problem, text_problem
from campus_search.security.auth import require_admin

log = logging.getLogger(__name__)


class DocumentIdConverter(PathConverter):
    """Like ``path`` (ids may contain ``/``), but matching every character, so an id with a newline
    reaches the handler and gets a 400 that says why instead of the router's 404."""

    regex = r"[^/][\s\S]*?"


bp = Blueprint("documents", __name__)


@bp.record_once
def _register_converter(state: Any) -> None:
    state.app.url_map.converters["docid"] = DocumentIdConverter


FORMATS = {"markdown": "inline.md", "text": "inline.txt", "html": "inline.html"}
LIST_PARAMS = {"limit", "offset", "department", "q"}
UPSERT_KEYS = {"text", "format", "title", "metadata", "allow_loosening"}
PATCH_KEYS = {"metadata", "allow_loosening", "unpin"}


class SourceConflict(CampusSearchError):
    status = 409
    code = "source_conflict"


@contextlib.contextmanager
def _audited(services: Any, action: str, target: str, details: Mapping[str, Any]) -> Iterator[AdminChange]:
    """Audit an admin document change through the audit log's ``admin_change`` (campus_search/audit/actions.py):
    the success record is written in the change's own transaction (``change.record_in`` handed to the
    ingester), so the change and its record commit together or not at all; a failure is recorded with
    its error code."""
    with admin_change(services, action, target=target, details=details,
                      context=request_context(services.settings)) as change:
        yield change


def _services() -> Any:
    services = extension.services()
    require_admin(services.settings)
    return services.ensure_open()


def _doc_id(doc_id: str) -> str:
    """The id from the URL, exactly, or a 400 (the grammar is in :mod:`campus_search.ingest.textrules`)."""
    # The router decodes the path with errors="replace", so %ff and %fe would both name U+FFFD: check
    # the bytes the client sent (gunicorn and werkzeug keep the raw URI; other servers: PATH_INFO).
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    path = unquote_to_bytes(raw.split("?", 1)[0]) if raw else request.environ.get("PATH_INFO", "").encode("latin-1")
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("document id is not valid UTF-8 (percent-encode the id's UTF-8 bytes)") from None
    if (problem := id_problem(doc_id)) is not None:
        raise BadRequest(problem)
    return doc_id


def _json_object(message: str) -> dict[str, Any]:
    """The JSON body as an object whose text can be stored, or a 400."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest(message)
    if (problem := json_text_problem(body)) is not None:
        raise BadRequest(f"request body {problem}")
    return body


def _metadata(raw: Any) -> dict[str, Any]:
    """A metadata object (JSON, or a multipart field holding JSON) validated, or a 400."""
    if isinstance(raw, str):  # multipart form field
        try:
            raw = json.loads(raw)
        except ValueError:
            raise BadRequest("metadata must be a JSON object") from None
        if (problem := json_text_problem(raw)) is not None:
            raise BadRequest(f"metadata {problem}")
    if not isinstance(raw, dict):
        raise BadRequest("metadata must be a JSON object")
    check_keys(raw, METADATA_FIELDS, "metadata")
    check_values(raw, source="metadata")  # validate now: a 400 that names the field
    return raw


def _flag(raw: Any, name: str) -> bool:
    if raw is None:
        return False
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):  # multipart form field
        return raw.strip().lower() == "true"
    raise BadRequest(f"{name} must be true or false")


def _stored(services: Any, doc_id: str) -> dict[str, Any] | None:
    with services.db.connection(read=False) as conn:
        return document_detail(conn, doc_id)


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} must be between {lo} and {hi}")
    return value


@bp.get("/api/admin/documents")
def list_documents() -> Any:
    services = _services()
    unknown = sorted(set(request.args) - LIST_PARAMS)
    if unknown:
        raise BadRequest(f"unknown query parameters {unknown}; allowed: {sorted(LIST_PARAMS)}")
    limit = _int_arg("limit", 50, 1, 500)
    offset = _int_arg("offset", 0, 0, 10**9)
    with services.db.connection(read=False) as conn:
        total, documents = list_documents_page(conn, department=request.args.get("department") or None,
                                               text=request.args.get("q") or None, limit=limit, offset=offset)
    return jsonify({"documents": documents, "total": total, "limit": limit, "offset": offset,
                    "request_id": g.request_id})


@bp.get("/api/admin/documents/<docid:doc_id>")
def get_document(doc_id: str) -> Any:
    services = _services()
    doc = _stored(services, _doc_id(doc_id))
    if doc is None:
        raise NotFound(f"no document {doc_id!r}")
    return jsonify({**doc, "request_id": g.request_id})


def _upload_limit(services: Any) -> int:
    limit = services.settings.max_document_bytes
    request.max_content_length = limit  # documents are larger than search requests
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"document larger than MAX_DOCUMENT_BYTES ({limit} bytes)")
    return limit


def _parse_upload(services: Any, doc_id: str) -> tuple[Any, dict[str, Any], bool]:
    """(ParsedDocument, metadata given, allow_loosening) from a JSON or multipart body."""
    if request.mimetype == "multipart/form-data":
        names = [*request.form, *request.files]
        if any(not name for name in names):
            raise BadRequest("every multipart part needs a name (file, metadata, title, allow_loosening)")
        fields = ("file", "metadata", "title", "allow_loosening")
        extra = sorted({*request.form, *request.files} - set(fields))
        if extra:
            raise BadRequest(f"unknown form fields {extra}; allowed: {', '.join(fields)}")
        if any(len(request.form.getlist(n)) + len(request.files.getlist(n)) > 1 for n in fields):
            raise BadRequest(f"each of {', '.join(fields)} may be given once")
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise BadRequest("multipart upload needs a 'file' field with a filename")
        meta = _metadata(request.form["metadata"]) if "metadata" in request.form else {}
        allow = _flag(request.form.get("allow_loosening"), "allow_loosening")
        data, filename, title = upload.read(), upload.filename, request.form.get("title")
    else:
        body = _json_object("send a JSON object {\"text\", \"format\", \"title\", \"metadata\"} or a multipart "
                            "'file' upload")
        unknown = sorted(set(body) - UPSERT_KEYS)
        if unknown:
            raise BadRequest(f"unknown fields {unknown}; allowed: {sorted(UPSERT_KEYS)}")
        text, fmt, title = body.get("text"), body.get("format", "markdown"), body.get("title")
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("text must be a non-empty string")
        if not isinstance(fmt, str) or fmt not in FORMATS:  # {"format": {}} is not a format (nor a 500)
            raise BadRequest(f"format must be one of {sorted(FORMATS)}")
        meta = _metadata(body["metadata"]) if "metadata" in body else {}
        allow = _flag(body.get("allow_loosening"), "allow_loosening")
        data, filename = text.encode("utf-8"), FORMATS[fmt]
    if title is not None and (not isinstance(title, str) or not title.strip() or len(title) > MAX_TITLE_CHARS):
        raise BadRequest(f"title must be a non-empty string of at most {MAX_TITLE_CHARS} characters")
    if title is not None and (problem := text_problem(title)) is not None:
        raise BadRequest(f"title {problem}")
    suffix = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if suffix not in BYTE_PARSERS:
        raise BadRequest(f"unsupported file type {suffix or '(none)'}; supported: {', '.join(sorted(BYTE_PARSERS))}")
    doc = parse_bytes(data, filename, external_id=doc_id, metadata={}, source=f"api:{filename}",
                      limits=services.ingester.limits)
    if title:
        doc.title = title.strip()
    return doc, meta, allow


def _loosening_refused(changes: list[Any]) -> LooseningRefused:
    return LooseningRefused("this change loosens access (" + "; ".join(str(c) for c in changes)
                            + "); send \"allow_loosening\": true to confirm",
                            details={"loosened": [c.as_json() for c in changes]})


def _upsert_status(report: Any) -> str:
    return ("added" if report.added else "updated" if report.updated else
            "metadata_updated" if report.metadata_updated else "unchanged")


@bp.put("/api/admin/documents/<docid:doc_id>")
def upsert_document(doc_id: str) -> Any:
    services = _services()
    doc_id = _doc_id(doc_id)
    _upload_limit(services)
    doc, given, allow = _parse_upload(services, doc_id)
    existing = _stored(services, doc_id)
    if existing and not str(existing["source"] or "api:").startswith("api:"):
        raise SourceConflict(f"document {doc_id!r} is kept in sync from {existing['source']} by campus-search "
                             f"ingest: change that file, or PATCH its metadata")
    front = {k: v for k, v in doc.metadata.items() if k in METADATA_FIELDS}
    outcome: dict[str, Any] = {"loosened": [], "held_back": [], "defaults_applied": {}}
    if existing is None:
        # a new document: its front matter counts as stated, below the request's own metadata
        res = resolve(None, {**front, **given}, default_visibility=services.settings.default_visibility)
        meta, outcome["defaults_applied"] = res.meta, res.defaults
    else:
        before = AccessMetadata().merged(existing["metadata"])
        # the file's own front matter may tighten, never loosen; only the request may, when it says so
        from_file = resolve(before, front)
        meta = resolve(from_file.meta, given, allow_loosening=True).meta
        loosened = loosenings(before, meta)
        if loosened and not allow:
            raise _loosening_refused(loosened)
        outcome.update(loosened=[c.as_json() for c in loosened],
                       held_back=[c.as_json() for c in from_file.held_back])
    doc.metadata = meta.as_json()
    details = {"source": doc.source, **({"before": existing["metadata"], "after": meta.as_json()} if existing
                                        else {}), **{k: v for k, v in outcome.items() if v}}
    with _audited(services, "document.upsert", doc_id, details) as change:

        def audit(conn: Any, done: Any) -> None:
            change.record_in(conn, status=_upsert_status(done), chunks_embedded=done.chunks_embedded)

        report = services.ingester.ingest([doc], allow_loosening=allow, respect_pins=False, audit=audit)
        if report.failed:
            from campus_search.errors import IngestError

            raise IngestError(report.errors[0].replace(doc.source or "", doc_id, 1) if report.errors else
                              "document could not be ingested")
        status = _upsert_status(report)
    stored = _stored(services, doc_id) or {}
    body = {"document_id": doc_id, "status": status, "chunk_count": stored.get("chunk_count"),
            "chunks_embedded": report.chunks_embedded, "metadata": stored.get("metadata"), **outcome,
            "request_id": g.request_id}
    return jsonify(body), 201 if status == "added" else 200


@bp.patch("/api/admin/documents/<docid:doc_id>")
def update_metadata(doc_id: str) -> Any:
    services = _services()
    doc_id = _doc_id(doc_id)
    body = _json_object("send {\"metadata\": {...}} (the fields to change), optionally \"allow_loosening\": "
                        "true and \"unpin\": [fields]")
    if not set(body) & {"metadata", "unpin"} or set(body) - PATCH_KEYS:
        raise BadRequest("send {\"metadata\": {...}} (the fields to change), optionally \"allow_loosening\": true "
                         "and \"unpin\": [fields]")
    given = _metadata(body["metadata"]) if "metadata" in body else {}
    allow = _flag(body.get("allow_loosening"), "allow_loosening")
    unpin = body.get("unpin") or []
    if not isinstance(unpin, list) or not all(isinstance(f, str) for f in unpin):
        raise BadRequest("unpin must be a list of metadata field names")
    check_keys({f: None for f in unpin}, METADATA_FIELDS, "unpin")
    if set(unpin) & set(given):
        raise BadRequest(f"fields both set and unpinned: {sorted(set(unpin) & set(given))}")
    details: dict[str, Any] = {"changed": sorted(given), "allow_loosening": allow, "unpin": sorted(unpin)}
    with _audited(services, "document.metadata", doc_id, details) as change:

        def audit(conn: Any, done: Any) -> None:
            change.record_in(conn, before=done.before.as_json(), after=done.after.as_json(), pinned=done.pinned,
                             loosened=[c.as_json() for c in done.loosened])

        update = services.ingester.update_metadata(doc_id, given, allow_loosening=allow, unpin=unpin, audit=audit)
        if update is None:
            raise NotFound(f"no document {doc_id!r}")
    return jsonify({"document_id": doc_id, "status": "metadata_updated", "metadata": update.after.as_json(),
                    "loosened": [c.as_json() for c in update.loosened], "pinned": update.pinned,
                    "request_id": g.request_id})


@bp.delete("/api/admin/documents/<docid:doc_id>")
def delete_document(doc_id: str) -> Any:
    services = _services()
    doc_id = _doc_id(doc_id)
    with _audited(services, "document.delete", doc_id, {}) as change:
        if services.ingester.delete([doc_id], audit=lambda conn, _: change.record_in(conn)) == 0:
            raise NotFound(f"no document {doc_id!r}")
    return jsonify({"document_id": doc_id, "deleted": True, "request_id": g.request_id})
