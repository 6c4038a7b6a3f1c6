"""What errors tell whom (issue 11): a 503's root cause reaches the log; a 500's message (which may name
files) does not reach the client; an embedding server's answer body (which may echo query text) never
reaches the log; a refused body user is logged with who and what."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from campus_search.app import create_app
from campus_search.embedding import factory
from campus_search.embedding import local as embedding
from campus_search.embedding.remote import RemoteEmbedder
from campus_search.errors import EmbeddingError
from campus_search.ingest.chunking import Block
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import ParsedDocument
from campus_search.services import Services

SECRET_QUERY = "counselling appointment for anxiety"


def test_a_503_logs_its_root_cause(settings_factory: Any, services_factory: Any, token: Any,
                                   caplog: pytest.LogCaptureFixture) -> None:
    services = services_factory(settings_factory(db_statement_timeout_ms=300, cache_enabled=False))
    services.ingester.ingest([ParsedDocument(external_id="d", title="Exams", blocks=[Block("Exam timetables.")],
                                             source="d")], AccessMetadata())
    client = create_app(services).test_client()
    with psycopg.connect(services.dsn) as holder:  # the search's statement cannot finish: it times out
        holder.execute("LOCK TABLE chunks IN ACCESS EXCLUSIVE MODE")
        with caplog.at_level(logging.WARNING):
            r = client.post("/api/search", json={"query": "exam timetable"},
                            headers={"Authorization": token("student")})
        holder.rollback()
    assert r.status_code == 503 and r.get_json()["error"]["message"] == "database unavailable"
    assert "statement timeout" not in r.get_data(as_text=True)
    by = {rec.name: rec.getMessage() for rec in caplog.records}
    assert "canceling statement due to statement timeout" in by["campus_search.api.errors"], by
    assert "QueryCanceled" in by["campus_search.api.errors"]
    assert "canceling statement due to statement timeout" in by["campus_search.storage.db"], by


def test_a_500_names_no_file_to_the_client(settings_factory: Any, token: Any, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    # The model file fails its checksum when the worker loads it: a ConfigError naming the file's path.
    monkeypatch.setattr(embedding, "ONNX_SHA256", "0" * 64)
    factory.forget_embedders()
    settings = settings_factory()
    services = Services(settings)
    try:
        client = create_app(services).test_client()
        with caplog.at_level(logging.ERROR):
            r = client.post("/api/search", json={"query": "exams"}, headers={"Authorization": token("student")})
    finally:
        services.close()  # nothing to close: ensure_open closed the pools it had opened when the model failed
        factory.forget_embedders()
    assert r.status_code == 500
    body = r.get_data(as_text=True)
    assert r.get_json()["error"]["code"] == "configuration_error"
    assert "model.onnx" not in body and "/" not in r.get_json()["error"]["message"], body
    assert any("model.onnx" in rec.getMessage() and "checksum" in rec.getMessage() for rec in caplog.records)


@pytest.fixture
def echoing_server() -> Iterator[str]:
    """An embedding server that refuses every request with a body echoing the texts it was sent."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = json.dumps({"error": f"input too long: {sent['input']}"}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_embedding_server_answers_never_reach_the_log(echoing_server: str, provider: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    remote = RemoteEmbedder(provider, echoing_server, "all-MiniLM-L6-v2", retries=0)
    remote.dimension = 384
    with caplog.at_level(logging.DEBUG), pytest.raises(EmbeddingError) as info:
        remote.embed([SECRET_QUERY])
    assert "HTTP 400" in info.value.message and SECRET_QUERY not in info.value.message
    assert caplog.records, "the refusal is logged"
    assert not [rec for rec in caplog.records if "anxiety" in rec.getMessage()], caplog.text


def test_a_refused_body_user_is_logged_with_both_identities(demo_app: Any, token: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    client = demo_app.test_client()
    with caplog.at_level(logging.WARNING, logger="campus_search.api.search"):
        r = client.post("/api/search", json={"query": "exams", "user": {"user_id": "someone-else"}},
                        headers={"Authorization": token("student", sub="s-42")})
    assert r.status_code == 403
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "campus_search.api.search"]
    assert len(logged) == 1 and "someone-else" in logged[0] and "s-42" in logged[0], logged
