"""Reading the audit log back: the search figures of the admin statistics and the latest records
(``campus-search audit show``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def search_summary(conn: Any, days: int) -> dict[str, Any] | None:
    """Searches and zero-result searches by department over the last ``days`` (None: no audit log yet)."""
    if conn.execute("SELECT to_regclass('audit_log')").fetchone()[0] is None:
        return None
    window = {"days": days}
    total, zero = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE result_count = 0) FROM audit_log "
        "WHERE kind = 'search' AND success AND recorded_at > now() - make_interval(days => %(days)s)",
        window).fetchone()
    rows = conn.execute(
        "SELECT coalesce(department, 'none'), count(*) FROM audit_log WHERE kind = 'search' AND success "
        "AND result_count = 0 AND recorded_at > now() - make_interval(days => %(days)s) "
        "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 100", window).fetchall()
    return {"days": days, "searches": int(total), "zero_result_searches": int(zero),
            "zero_results_by_department": {dept: int(n) for dept, n in rows}}


def latest_records(conn: Any, last: int, user: str | None = None) -> Iterator[dict[str, Any]]:
    """The ``last`` records (of ``user`` only, when given), oldest first, as column -> value."""
    where, params = ("WHERE user_id = %s", [user]) if user else ("", [])
    cur = conn.execute(f"SELECT * FROM (SELECT * FROM audit_log {where} ORDER BY seq DESC LIMIT %s) r "
                       "ORDER BY seq", [*params, last])
    names = [c.name for c in cur.description or ()]
    for row in cur:
        yield dict(zip(names, row, strict=True))
