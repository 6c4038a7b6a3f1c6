"""Shared by the audit tests: an app on a fresh database holding two demo documents, and the audit rows
a request left, and a database that refuses audit writes (conftest's ``pytest_plugins`` registers the
fixture)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from conftest import DEMO

from campus_search.app import create_app
from campus_search.cli.main import ingest_paths
from campus_search.ingest.metadata import AccessMetadata


@pytest.fixture
def audited(settings_factory: Callable[..., Any], services_factory: Callable[..., Any]) -> Callable[..., Any]:
    """(client, services) on a fresh database holding two demo documents."""

    def make(**overrides: Any) -> tuple[Any, Any]:
        services = services_factory(settings_factory(**overrides))
        ingest_paths(services, [DEMO / "student-password-reset.md", DEMO / "it-staff-password-management.md"],
                     AccessMetadata(), quiet=True)
        app = create_app(services)
        return app.test_client(), services

    return make


def rows(services: Any, where: str = "TRUE", params: Any = ()) -> list[dict[str, Any]]:
    with psycopg.connect(services.dsn) as conn:
        cur = conn.execute(f"SELECT * FROM audit_log WHERE {where} ORDER BY seq", params)
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, r, strict=True)) for r in cur]


def by_request(services: Any, response: Any) -> dict[str, Any]:
    found = rows(services, "request_id = %s", (response.headers["X-Request-ID"],))
    assert len(found) == 1, found
    return found[0]


def break_audit_writes(services: Any, broken: bool = True) -> None:
    """The database refuses audit inserts (as it would when out of disk or permissions)."""
    with psycopg.connect(services.dsn, autocommit=True) as conn:
        if broken:
            conn.execute("CREATE OR REPLACE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
                         "$$ BEGIN RAISE EXCEPTION 'could not extend file: No space left on device'; END $$")
            conn.execute("CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_log "
                         "FOR EACH ROW EXECUTE FUNCTION refuse_audit()")
        else:
            conn.execute("DROP TRIGGER refuse_audit ON audit_log")
