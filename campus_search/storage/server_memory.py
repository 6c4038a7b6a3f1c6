"""How a PostgreSQL server runs its shared memory (mostly ``shared_buffers``): in huge pages or not, and
how large it is -- read from the server (:func:`server_memory`) for ``GET /api/admin/stats`` and the
benchmarks, and said out loud when a large pool runs without huge pages (:func:`huge_pages_hint`, logged
by the process that starts the embedded cluster). docs/operations.md, "Huge pages"."""

from __future__ import annotations

from typing import Any


def server_memory(conn: Any) -> tuple[str | None, int | None, int | None]:
    """(``huge_pages_status``: on/off/unknown, the server's shared memory in MB, and in huge pages) of the
    server ``conn`` is connected to; None for what it does not report (before PostgreSQL 17/15). Read from
    ``pg_settings`` in the settings' own units (MB, pages): ``SHOW`` would print 4096 MB as ``4GB``."""
    row = conn.execute("SELECT max(setting) FILTER (WHERE name = 'huge_pages_status'), "
                       "max(setting) FILTER (WHERE name = 'shared_memory_size' AND unit = 'MB'), "
                       "max(setting) FILTER (WHERE name = 'shared_memory_size_in_huge_pages') "
                       "FROM pg_settings WHERE name IN ('huge_pages_status', 'shared_memory_size', "
                       "'shared_memory_size_in_huge_pages')").fetchone()
    status, size, pages = row if row else (None, None, None)

    def number(text: str | None) -> int | None:
        return int(text) if text is not None and text.isdigit() else None

    return status, number(size), number(pages)


#: Below this much shared memory, huge pages are not worth a word (the TLB covers a small buffer pool).
HUGE_PAGES_WORTH_MB = 1024


def huge_pages_hint(status: str | None, size_mb: int | None, pages: int | None) -> str | None:
    """What to tell the operator when PostgreSQL runs its shared memory (mostly ``shared_buffers``) in
    4 kB pages although it is large: every buffer it touches then costs TLB misses. With huge pages the
    same searches took ~10 % less PostgreSQL CPU on the benchmark machine (docs/operations.md,
    "Huge pages"). None when there is nothing to say."""
    if status != "off" or size_mb is None or size_mb < HUGE_PAGES_WORTH_MB:
        return None
    reserve = f"vm.nr_hugepages={pages}" if pages else "vm.nr_hugepages"
    return (f"PostgreSQL runs without huge pages ({size_mb} MB of shared memory in 4 kB pages); with them it took "
            f"~10 % less CPU per search on the benchmark machine: as root, `sysctl -w {reserve}` before it starts "
            f"(docs/operations.md, \"Huge pages\")")
