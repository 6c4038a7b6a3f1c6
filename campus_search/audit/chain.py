"""The audit log's record and its chain: what a record holds (:class:`AuditRecord`), the canonical
payload its HMAC covers, and the keys derived from ``AUDIT_HMAC_KEY`` (:class:`ChainKeys`: one for the
chain, one for query hashes, and a non-secret key id). No database and no threads here: the writer is
``records``, the check ``verify``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from campus_search.retrieval.querytext import normalise_query

GENESIS = "0" * 64
TEXT_LIMIT = 2000  # per free-text field: a record stays small whatever a client sends
#: The stored columns of a record, in the order its payload lists them (``prev_hash`` and ``hash`` follow).
RECORD_COLUMNS = ("seq", "recorded_at", "kind", "action", "request_id", "user_id", "role", "department",
                  "query_hmac", "query_text", "filters", "target", "details", "result_count", "response_time_ms",
                  "client_ip", "user_agent", "status", "success", "key_id")


def _derive(key: str, purpose: str) -> bytes:
    return hmac.new(key.encode(), f"campus-search/audit/{purpose}".encode(), hashlib.sha256).digest()


def clean_text(value: Any, limit: int = TEXT_LIMIT) -> str | None:
    """Text as PostgreSQL will store it (no NUL, no lone surrogates), bounded, so what is hashed is
    exactly what is stored."""
    if value is None:
        return None
    text = str(value).replace("\x00", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")[:limit]


def canonical_json(value: Any) -> str | None:
    if value is None:
        return None
    return clean_text(json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str),
                      TEXT_LIMIT * 4)


@dataclass
class AuditRecord:
    """One audit record. ``seq``, ``prev_hash`` and ``hash`` are set when it is appended."""

    kind: str
    action: str
    success: bool
    recorded_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    request_id: str | None = None
    user_id: str | None = None
    role: str | None = None
    department: str | None = None
    query_hmac: str | None = None
    query_text: str | None = None
    filters: str | None = None
    target: str | None = None
    details: str | None = None
    result_count: int | None = None
    response_time_ms: float | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    status: int | None = None
    key_id: str = ""
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def payload(self) -> str:
        """Canonical JSON of every field but the two hashes (the bytes the chain HMAC covers)."""
        values = [getattr(self, name) for name in RECORD_COLUMNS]
        values[1] = self.recorded_at.astimezone(dt.UTC).isoformat(timespec="microseconds")
        return json.dumps(values, ensure_ascii=False, separators=(",", ":"))

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["recorded_at"] = self.recorded_at.astimezone(dt.UTC).isoformat(timespec="microseconds")
        return out


def key_id(key: str) -> str:
    """A short, non-secret fingerprint of an AUDIT_HMAC_KEY (tells 'other key' from 'tampered')."""
    return _derive(key, "key-id").hex()[:16]


class ChainKeys:
    """The keys one ``AUDIT_HMAC_KEY`` yields, and the two hashes made with them."""

    def __init__(self, key: str) -> None:
        self._chain_key = _derive(key, "chain")
        self._query_key = _derive(key, "query")
        self.key_id = key_id(key)

    def query_hash(self, query: str) -> str:
        """The keyed hash of a query, over its one normalised form (querytext.py)."""
        return hmac.new(self._query_key, normalise_query(query).encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()

    def chain_hash(self, prev_hash: str, record: AuditRecord) -> str:
        """``HMAC-SHA256(chain_key, prev_hash + "\\n" + payload)``: the record's link in the chain."""
        return hmac.new(self._chain_key, f"{prev_hash}\n{record.payload()}".encode(), hashlib.sha256).hexdigest()
