"""The stored documents, read back: one document's detail and a page of the listing (the admin API),
and what explain needs of a document (its row, and how many of its chunks a user sees under the very
predicate retrieval runs). Ingestion writes these tables; this module only reads them."""

from __future__ import annotations

from typing import Any

from campus_search.ingest.metadata import AccessMetadata
from campus_search.security.access import METADATA_FIELDS, columns
from campus_search.security.roles import Principal, visible_sql

_META = columns("d")
_N = 3 + len(METADATA_FIELDS)  # a document row: external_id, title, source, the metadata, ...


def document_detail(conn: Any, external_id: str) -> dict[str, Any] | None:
    """One document as the admin API shows it: its metadata, chunk count, section titles, last page and
    pinned fields (None: no such document)."""
    row = conn.execute(
        f"SELECT d.external_id, d.title, d.source, {_META}, d.created_at, d.updated_at, "
        "(SELECT count(*) FROM chunks c WHERE c.document_id = d.id), "
        "(SELECT array_agg(DISTINCT c.section_title) FILTER (WHERE c.section_title IS NOT NULL) "
        " FROM chunks c WHERE c.document_id = d.id), "
        "(SELECT max(c.page_number) FROM chunks c WHERE c.document_id = d.id), d.pinned "
        "FROM documents d WHERE d.external_id = %s", (external_id,)).fetchone()
    if row is None:
        return None
    n = _N + 3
    out = row_json(row[:n])
    out["sections"] = sorted(row[n] or [])
    out["last_page"] = row[n + 1]
    out["pinned"] = sorted(row[n + 2] or [])
    return out


def row_json(row: tuple[Any, ...]) -> dict[str, Any]:
    """A document row (external_id, title, source, the metadata fields, created_at, updated_at, chunk
    count) as the admin API shows it."""
    meta = AccessMetadata.from_row(row[3:_N])
    created, updated, count = row[_N:_N + 3]
    return {"document_id": row[0], "title": row[1], "source": row[2], "metadata": meta.as_json(),
            "created_at": created.isoformat(), "updated_at": updated.isoformat(), "chunk_count": count}


def list_documents_page(conn: Any, *, department: str | None, text: str | None, limit: int,
                        offset: int) -> tuple[int, list[dict[str, Any]]]:
    """(total, one page of documents in id order), of ``department`` only and matching ``text`` in the
    title or id (case-insensitive) when given."""
    where, params = ["true"], {}
    if department:
        where.append("d.department = %(department)s")
        params["department"] = department
    if text:
        where.append("(strpos(lower(d.title), lower(%(q)s)) > 0 OR strpos(lower(d.external_id), lower(%(q)s)) > 0)")
        params["q"] = text
    sql_where = " AND ".join(where)
    total = conn.execute(f"SELECT count(*) FROM documents d WHERE {sql_where}", params).fetchone()[0]
    rows = conn.execute(
        f"SELECT d.external_id, d.title, d.source, {_META}, d.created_at, d.updated_at, "
        "(SELECT count(*) FROM chunks c WHERE c.document_id = d.id) "
        f"FROM documents d WHERE {sql_where} ORDER BY d.external_id LIMIT %(limit)s OFFSET %(offset)s",
        {**params, "limit": limit, "offset": offset}).fetchall()
    return total, [row_json(r) for r in rows]


def find_document(conn: Any, external_id: str) -> tuple[int, str, str, AccessMetadata] | None:
    """(id, external_id, title, metadata) of a document, or None."""
    row = conn.execute(f"SELECT id, external_id, title, {_META} FROM documents d WHERE external_id = %s",
                       (external_id,)).fetchone()
    return None if row is None else (row[0], row[1], row[2], AccessMetadata.from_row(row[3:]))


def visible_chunk_counts(conn: Any, user: Principal, document_pk: int) -> tuple[int, int]:
    """(chunks of the document, those ``user`` may see by the SQL predicate retrieval runs)."""
    predicate, params = visible_sql(user, "d")
    total, allowed = conn.execute(
        f"SELECT count(*), count(*) FILTER (WHERE {predicate}) "
        "FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.document_id = %(doc)s",
        {**params, "doc": document_pk}).fetchone()
    return int(total), int(allowed)
