"""Remote embedding servers: Ollama (``POST {url}/api/embed``) and any OpenAI-compatible server
(``POST {url}/v1/embeddings``: OpenAI, text-embeddings-inference, vLLM, Infinity, LiteLLM ...).

- Texts go in batches of ``EMBEDDING_BATCH_SIZE``; each call has the ``EMBEDDING_TIMEOUT``.
- A call that fails transiently (connection refused or reset, timeout, 429, 500/502/503/504) is retried
  ``EMBEDDING_RETRIES`` times with exponential backoff (0.5 s, 1 s, 2 s ... capped at 8 s, with jitter);
  a ``Retry-After`` header is honoured (capped at 30 s). Other errors (400, 401, 404 ...) are not retried.
- The vector dimension is learnt from the server once (one probe text) and checked on every answer;
  the database refuses to start if the index was built with another dimension (``db.migrate``).
- Vectors are L2-normalised here, whatever the server does, so cosine similarity is a dot product.
- Token counts for chunk sizing use the bundled all-MiniLM-L6-v2 WordPiece tokenizer (no download):
  exact for that model, a close estimate for other BERT-family models served remotely.

Failures raise :class:`EmbeddingError` (HTTP 503) with a message that names the server and the
problem, never the HTTP library's exception text or the server's body.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import requests

from campus_search.config import Settings
from campus_search.embedding.base import count_tokens
from campus_search.errors import ConfigError, EmbeddingError

log = logging.getLogger(__name__)

RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_BACKOFF = 8.0
MAX_RETRY_AFTER = 30.0
PROBE_TEXT = "dimension probe"
PATHS = {"ollama": "/api/embed", "openai": "/v1/embeddings"}


class RemoteEmbedder:
    """An :class:`~campus_search.embedding.base.Embedder` backed by an HTTP embedding server."""

    def __init__(self, provider: str, url: str, model: str, *, timeout: float = 30.0, batch_size: int = 32,
                 retries: int = 3, backoff: float = 0.5, api_key: str | None = None) -> None:
        if provider not in PATHS:
            raise ConfigError(f"unknown embedding provider {provider!r}; use one of {sorted(PATHS)}")
        self.provider = provider
        self.endpoint = url.rstrip("/") + PATHS[provider]
        self.model_name = model
        self.timeout = timeout
        self.batch_size = max(1, batch_size)
        self.retries = max(0, retries)
        self.backoff = backoff
        self.api_key = api_key
        self._dimension: int | None = None
        self._local = threading.local()  # one requests.Session per thread (and per process: see _session)

    # --- Embedder protocol ---------------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        """The server's vector size, learnt from one probe call the first time it is needed."""
        if self._dimension is None:
            self._dimension = int(self._call([PROBE_TEXT]).shape[1])
            log.info("embedding server %s: model %s, %d dimensions", self.endpoint, self.model_name,
                     self._dimension)
        return self._dimension

    @dimension.setter
    def dimension(self, value: int) -> None:  # the Embedder protocol declares a plain attribute
        self._dimension = int(value)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text, in batches of ``batch_size``."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        parts = [self._call(list(texts[i:i + self.batch_size])) for i in range(0, len(texts), self.batch_size)]
        out = np.vstack(parts)
        if self._dimension is None:
            self._dimension = out.shape[1]
        elif out.shape[1] != self._dimension:
            raise EmbeddingError(f"embedding server {self.endpoint} returned {out.shape[1]}-dimensional vectors "
                                 f"for model {self.model_name!r}, expected {self._dimension}")
        return out

    def embed_query(self, texts: Sequence[str]) -> np.ndarray:
        """Queries are embedded by the server like documents."""
        return self.embed(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return count_tokens(texts)  # the one counting rule (embedding.base.count_tokens), as for the local model

    # --- HTTP ----------------------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        # Sessions hold sockets: never reuse one across fork (gunicorn --preload) or share between threads.
        session = getattr(self._local, "session", None)
        if session is None or self._local.pid != os.getpid():
            session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
            self._local.session, self._local.pid = session, os.getpid()
        return session

    def _payload(self, texts: list[str]) -> dict[str, Any]:
        if self.provider == "ollama":
            return {"model": self.model_name, "input": texts, "truncate": True}
        return {"model": self.model_name, "input": texts, "encoding_format": "float"}

    def _call(self, texts: list[str]) -> np.ndarray:
        attempt = 0
        while True:
            wait: float | None = None
            try:
                response = self._session().post(self.endpoint, json=self._payload(texts), timeout=self.timeout)
            except requests.Timeout:
                problem = f"embedding server {self.endpoint} did not answer within {self.timeout:g}s"
            except requests.ConnectionError:
                problem = f"embedding server {self.endpoint} is unreachable (connection failed)"
            except requests.RequestException:
                problem = f"request to embedding server {self.endpoint} failed"
            else:
                if response.status_code == 200:
                    return self._parse(response, len(texts))
                problem = self._status_problem(response)
                if response.status_code not in RETRY_STATUS:
                    raise EmbeddingError(problem)
                wait = _retry_after(response.headers.get("Retry-After"))
            if attempt >= self.retries:
                raise EmbeddingError(problem + (f" (after {attempt + 1} attempts)" if attempt else ""))
            delay = wait if wait is not None else min(MAX_BACKOFF, self.backoff * 2 ** attempt)
            delay *= 1 + random.uniform(-0.2, 0.2) if wait is None else 1  # spread simultaneous retries
            log.warning("%s; retrying in %.2fs (%d/%d)", problem, delay, attempt + 1, self.retries)
            time.sleep(max(0.0, delay))
            attempt += 1

    def _status_problem(self, response: requests.Response) -> str:
        status = response.status_code
        # Never the body: servers echo the input texts (queries) in their errors, and logs carry no query text.
        log.info("embedding server %s answered %d (%d bytes of %s)", self.endpoint, status, len(response.content),
                 response.headers.get("Content-Type", "unknown type"))
        hint = {401: " (check EMBEDDING_API_KEY)", 403: " (check EMBEDDING_API_KEY)",
                404: f" (is model {self.model_name!r} pulled/served, and EMBEDDING_URL the server's base URL?)",
                413: " (lower EMBEDDING_BATCH_SIZE)"}.get(status, "")
        return f"embedding server {self.endpoint} answered HTTP {status}{hint}"

    def _parse(self, response: requests.Response, expected: int) -> np.ndarray:
        try:
            body = response.json()
            if self.provider == "ollama":
                rows = body["embeddings"]
            else:
                data = sorted(body["data"], key=lambda d: int(d.get("index", 0)))
                rows = [d["embedding"] for d in data]
            matrix = np.asarray(rows, dtype=np.float32)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EmbeddingError(f"embedding server {self.endpoint} sent a response that is not "
                                 f"{'an Ollama /api/embed' if self.provider == 'ollama' else 'an OpenAI embeddings'}"
                                 " answer") from None
        if matrix.ndim != 2 or matrix.shape[0] != expected or matrix.shape[1] == 0:
            raise EmbeddingError(f"embedding server {self.endpoint} returned {matrix.shape[0] if matrix.ndim else 0} "
                                 f"vectors for {expected} texts")
        if not np.isfinite(matrix).all():
            raise EmbeddingError(f"embedding server {self.endpoint} returned non-finite numbers")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.clip(norms, 1e-12, None)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(value)))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def build_remote_embedder(settings: Settings) -> RemoteEmbedder:
    """The embedder for ``EMBEDDING_PROVIDER=ollama|openai`` at ``EMBEDDING_URL``."""
    if not settings.embedding_url:
        raise ConfigError(f"EMBEDDING_PROVIDER={settings.embedding_provider} needs EMBEDDING_URL")
    return RemoteEmbedder(settings.embedding_provider, settings.embedding_url, settings.embedding_model,
                          timeout=settings.embedding_timeout, batch_size=settings.embedding_batch_size,
                          retries=settings.embedding_retries, api_key=settings.embedding_api_key)
