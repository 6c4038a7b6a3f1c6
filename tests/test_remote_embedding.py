"""Remote embedding providers against a small HTTP server of the tests' own (127.0.0.1) that speaks the
Ollama ``/api/embed`` and OpenAI ``/v1/embeddings`` APIs and answers with the real default model's
vectors; plus ingestion and search through it on the real database."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from campus_search.embedding.factory import get_embedder
from campus_search.embedding.remote import RemoteEmbedder
from campus_search.errors import ConfigError, EmbeddingError
from campus_search.ingest.chunking import Block
from campus_search.ingest.metadata import AccessMetadata
from campus_search.ingest.sources import ParsedDocument
from campus_search.retrieval.params import SearchParams
from campus_search.security.roles import superuser
from campus_search.services import Services


class FakeEmbeddingServer:
    """Ollama and OpenAI embedding endpoints backed by the real all-MiniLM-L6-v2.

    Knobs: ``fail_next`` (answer that many requests with ``fail_status``), ``delay`` (seconds to wait
    before answering), ``dimension`` (truncate vectors, to play a different model), ``models`` (known
    model names, others get 404), ``api_key`` (required bearer token)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.requests: list[dict[str, Any]] = []
        self.fail_next = 0
        self.fail_status = 503
        self.retry_after: str | None = None
        self.delay = 0.0
        self.dimension: int | None = None
        self.models = {"all-MiniLM-L6-v2"}
        self.api_key: str | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body,
                                        "auth": self.headers.get("Authorization")})
                if server.delay:
                    time.sleep(server.delay)
                if server.fail_next > 0:
                    server.fail_next -= 1
                    headers = {"Retry-After": server.retry_after} if server.retry_after else {}
                    return self.reply(server.fail_status, {"error": "overloaded"}, headers)
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self.reply(401, {"error": {"message": "invalid api key"}})
                if body.get("model") not in server.models:
                    return self.reply(404, {"error": f"model \"{body.get('model')}\" not found, try pulling it"})
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                vectors = server.model.embed(texts)[:, :server.dimension]
                # Like servers that do not normalise (Ollama for many models): a different length per row,
                # so only the client's own normalisation can make these unit vectors again.
                vectors = vectors * (2.5 + np.arange(len(texts), dtype=np.float32))[:, None]
                if self.path == "/api/embed":
                    return self.reply(200, {"model": body["model"], "embeddings": vectors.tolist()})
                if self.path == "/v1/embeddings":
                    data = [{"object": "embedding", "index": i, "embedding": v.tolist()}
                            for i, v in enumerate(vectors)]
                    data.reverse()  # servers may answer out of order; "index" says which is which
                    return self.reply(200, {"object": "list", "data": data, "model": body["model"],
                                            "usage": {"prompt_tokens": 0, "total_tokens": 0}})
                return self.reply(404, {"error": "no such endpoint"})

            def reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server(embedder: Any) -> Iterator[FakeEmbeddingServer]:
    server = FakeEmbeddingServer(embedder)
    yield server
    server.close()


PROVIDERS = ["ollama", "openai"]
TEXTS = ["How do I reset my university password?", "Library opening hours in term time",
         "Reporting a chemical spill in the laboratory", "Booking a study room", "Eduroam wifi setup"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vectors_match_the_local_model_and_batches_are_bounded(provider: str, fake_server: FakeEmbeddingServer,
                                                               embedder: Any) -> None:
    remote = RemoteEmbedder(provider, fake_server.url + "/", "all-MiniLM-L6-v2", batch_size=2, timeout=10)
    vectors = remote.embed(TEXTS)
    assert vectors.shape == (5, 384) and vectors.dtype == np.float32
    assert np.allclose(vectors, embedder.embed(TEXTS), atol=1e-5)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert [len(r["body"]["input"]) for r in fake_server.requests] == [2, 2, 1]
    assert {r["path"] for r in fake_server.requests} == {"/api/embed" if provider == "ollama" else "/v1/embeddings"}
    assert remote.dimension == 384 and len(fake_server.requests) == 3  # learnt from the answers, no probe
    assert remote.count_tokens(["password reset"]) == embedder.count_tokens(["password reset"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_transient_failures_are_retried(provider: str, fake_server: FakeEmbeddingServer) -> None:
    remote = RemoteEmbedder(provider, fake_server.url, "all-MiniLM-L6-v2", retries=3, backoff=0.01)
    fake_server.fail_next = 2
    assert remote.embed(["text"]).shape == (1, 384)
    assert len(fake_server.requests) == 3

    fake_server.requests.clear()
    fake_server.fail_next, fake_server.fail_status, fake_server.retry_after = 1, 429, "0"
    assert remote.embed(["text"]).shape == (1, 384)
    assert len(fake_server.requests) == 2


def test_retries_give_up_with_a_clear_error(fake_server: FakeEmbeddingServer) -> None:
    remote = RemoteEmbedder("ollama", fake_server.url, "all-MiniLM-L6-v2", retries=2, backoff=0.01)
    fake_server.fail_next = 10
    with pytest.raises(EmbeddingError) as info:
        remote.embed(["text"])
    assert info.value.message == f"embedding server {fake_server.url}/api/embed answered HTTP 503 (after 3 attempts)"
    assert info.value.status == 503 and len(fake_server.requests) == 3


def test_client_errors_are_not_retried_and_say_what_to_check(fake_server: FakeEmbeddingServer) -> None:
    missing = RemoteEmbedder("ollama", fake_server.url, "nomic-embed-text", retries=3, backoff=0.01)
    with pytest.raises(EmbeddingError, match=r"HTTP 404 \(is model 'nomic-embed-text' pulled/served") as error:
        missing.embed(["text"])
    assert len(fake_server.requests) == 1
    assert "not found, try pulling" not in str(error.value)  # the server's body is only logged

    fake_server.api_key = "sk-right"
    wrong = RemoteEmbedder("openai", fake_server.url, "all-MiniLM-L6-v2", api_key="sk-wrong")
    with pytest.raises(EmbeddingError, match="HTTP 401 .check EMBEDDING_API_KEY"):
        wrong.embed(["text"])
    right = RemoteEmbedder("openai", fake_server.url, "all-MiniLM-L6-v2", api_key="sk-right")
    assert right.embed(["text"]).shape == (1, 384)
    assert fake_server.requests[-1]["auth"] == "Bearer sk-right"


def test_timeout_is_enforced(fake_server: FakeEmbeddingServer) -> None:
    fake_server.delay = 2.0
    remote = RemoteEmbedder("openai", fake_server.url, "all-MiniLM-L6-v2", timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(EmbeddingError, match=r"did not answer within 0.2s \(after 2 attempts\)"):
        remote.embed(["text"])


def test_unreachable_server(fake_server: FakeEmbeddingServer) -> None:
    url = fake_server.url
    fake_server.close()
    remote = RemoteEmbedder("ollama", url, "all-MiniLM-L6-v2", retries=1, backoff=0.01)
    with pytest.raises(EmbeddingError, match="unreachable"):
        remote.embed(["text"])


def test_malformed_answers_are_errors(fake_server: FakeEmbeddingServer) -> None:
    remote = RemoteEmbedder("openai", fake_server.url + "/api/embed-is-not-openai", "all-MiniLM-L6-v2")
    with pytest.raises(EmbeddingError, match="HTTP 404"):
        remote.embed(["x"])
    ollama_at_openai = RemoteEmbedder("ollama", fake_server.url, "all-MiniLM-L6-v2")
    ollama_at_openai.endpoint = fake_server.url + "/v1/embeddings"  # wrong API behind the URL
    with pytest.raises(EmbeddingError, match="not an Ollama /api/embed answer"):
        ollama_at_openai.embed(["x"])


def test_dimension_change_between_calls_is_refused(fake_server: FakeEmbeddingServer) -> None:
    remote = RemoteEmbedder("ollama", fake_server.url, "all-MiniLM-L6-v2")
    assert remote.dimension == 384
    fake_server.dimension = 256  # the server now runs another model under the same name
    with pytest.raises(EmbeddingError, match="returned 256-dimensional vectors .* expected 384"):
        remote.embed(["x"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ingest_and_search_through_a_remote_server(provider: str, fake_server: FakeEmbeddingServer,
                                                   settings_factory: Any, tmp_path: Path) -> None:
    settings = settings_factory(embedding_provider=provider, embedding_url=fake_server.url, embedding_batch_size=8,
                                embedding_timeout=10.0)
    embedder = get_embedder(settings)
    assert isinstance(embedder, RemoteEmbedder) and embedder.batch_size == 8
    services = Services(settings, embedder=embedder).ensure_open()
    try:
        docs = [ParsedDocument(f"doc{i}", title, [Block(text, "Overview")]) for i, (title, text) in enumerate([
            ("Password reset", "Reset a forgotten EASE password online with your recovery email."),
            ("Library hours", "The Main Library opens at eight and closes at midnight during term."),
            ("Spill procedure", "Contain a chemical spill with the kit and tell the lab manager."),
        ])]
        report = services.ingester.ingest(docs, AccessMetadata())
        assert (report.added, report.chunks_embedded) == (3, 3)
        assert all(len(r["body"]["input"]) <= 8 for r in fake_server.requests)
        hits = services.searcher.search(superuser(), SearchParams("when does the library close", max_results=3))
        assert hits[0].document_id == "doc1"
    finally:
        services.close()


def test_index_built_with_another_dimension_refuses_to_start(fake_server: FakeEmbeddingServer,
                                                             settings_factory: Any, embedder: Any) -> None:
    settings = settings_factory(embedding_provider="ollama", embedding_url=fake_server.url)
    Services(settings, embedder=embedder)  # index created for the local 384-dimensional model
    fake_server.dimension = 256  # a smaller model (the fake truncates the real vectors)
    remote = RemoteEmbedder("ollama", fake_server.url, "nomic-embed-text")
    fake_server.models.add("nomic-embed-text")
    with pytest.raises(ConfigError) as info:
        Services(settings, embedder=remote)
    assert "index holds 384-dimensional vectors" in info.value.message
    assert "'nomic-embed-text' (256 dimensions)" in info.value.message


def test_same_dimension_other_model_refuses_to_start(fake_server: FakeEmbeddingServer, settings_factory: Any,
                                                     embedder: Any) -> None:
    """Vectors of two models are not comparable even at equal dimension: refuse, do not mix them."""
    settings = settings_factory(embedding_provider="ollama", embedding_url=fake_server.url)
    Services(settings, embedder=embedder)  # all-MiniLM-L6-v2, 384 dimensions
    fake_server.models.add("other-384-model")
    remote = RemoteEmbedder("ollama", fake_server.url, "other-384-model")
    with pytest.raises(ConfigError) as info:
        Services(settings, embedder=remote)
    assert "from model 'all-MiniLM-L6-v2'" in info.value.message and "'other-384-model'" in info.value.message
