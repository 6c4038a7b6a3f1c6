"""Validation: every problem with a :class:`Settings` at once, so the service refuses to start with one
clear list (ranges, choices, combinations that contradict each other, roles, proxies, secrets).
"""

from __future__ import annotations

from campus_search.config.secret_keys import production_secret_problems
from campus_search.config.settings import Settings


def validate(s: Settings) -> list[str]:
    """Every problem with these values (empty when they are valid)."""
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
    if s.bm25_cut_df < 0 or s.bm25_whole_chunks < 0 or s.bm25_depth < 1 or s.bm25_scan < 1:
        problems.append(f"BM25_CUT_DF and BM25_WHOLE_CHUNKS must be >= 0, BM25_DEPTH and BM25_SCAN >= 1 "
                        f"(got {s.bm25_cut_df}, {s.bm25_whole_chunks}, {s.bm25_depth}, {s.bm25_scan})")
    if not 0.0 <= s.dense_exact_fraction <= 1.0:
        problems.append(f"DENSE_EXACT_FRACTION must be between 0 and 1 (got {s.dense_exact_fraction})")
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
    if s.embedding_query_int8 not in ("auto", "true", "false"):
        problems.append("EMBEDDING_QUERY_INT8 must be auto, true or false")
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
    problems += production_secret_problems(s)
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
