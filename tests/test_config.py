"""Settings: one declaration per setting, seed names, validation, generated development secrets, docs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from campus_search.config import FIELDS, Settings, load_settings, markdown_table
from campus_search.config.fields import declared_fields, setting
from campus_search.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_declared_once_with_matching_default() -> None:
    declared = {f.name: f for f in FIELDS}
    assert len(declared) == len(FIELDS), "a setting is declared twice"
    assert list(declared) == [f.name for f in dataclasses.fields(Settings)]
    built = Settings()
    for name, field in declared.items():
        assert getattr(built, name) == field.default, f"{name}: declared {field.default!r}, Settings has " \
            f"{getattr(built, name)!r}"
        assert field.help.strip(), f"{name} has no help text"
        assert field.env and all(n.isupper() for n in field.env), f"{name}: environment names {field.env}"
    assert built.role_mapping is not Settings().role_mapping, "a dict default must not be shared"


def test_a_setting_with_a_second_default_is_refused() -> None:
    """Settings attributes carry their one declaration (fields.setting); an attribute with a plain default
    would be a second place where a default lives, and declared_fields refuses it (Settings is checked so
    when the module is imported)."""
    @dataclasses.dataclass(frozen=True)
    class Twice:
        port: int = setting(("PORT",), 5100, "Port.", int)
        workers: int = 2

    with pytest.raises(TypeError, match="Twice.workers is not declared with setting"):
        declared_fields(Twice)
    assert [f.name for f in declared_fields(Settings)] == [f.name for f in FIELDS]


def test_configuration_doc_is_current() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert markdown_table() in doc, "regenerate: campus-search config --markdown (see docs/configuration.md)"


def test_seed_variable_names_still_work(tmp_path: Path) -> None:
    s = load_settings({"DB_HOST": "db.internal", "DB_PORT": "6543", "DB_NAME": "vectors", "DB_USER": "app",
                       "POSTGRES_PASSWORD": "p@ss word", "DB_POOL_MIN_SIZE": "5", "DB_POOL_MAX_SIZE": "20",
                       "REDIS_HOST": "cache", "JWT_SECRET_KEY": "s" * 40, "RATE_LIMIT_PER_MINUTE": "45",
                       "CACHE_TTL_SEARCH": "600", "MAX_RESULTS_PER_QUERY": "50", "EMBEDDING_TIMEOUT": "12",
                       "DATA_DIR": str(tmp_path)})
    assert s.dsn() == "postgresql://app:p%40ss%20word@db.internal:6543/vectors"
    assert not s.embedded_database
    assert s.redis_dsn() == "redis://cache:6379/0"
    assert (s.db_pool_min_size, s.db_pool_max_size, s.rate_limit_per_minute) == (5, 20, 45)
    assert (s.cache_ttl_search, s.max_results_per_query, s.embedding_timeout) == (600, 50, 12.0)
    assert "p@ss" not in str(s.public_summary())


def test_database_url_wins_and_embedded_is_default(tmp_path: Path) -> None:
    s = load_settings({"DATABASE_URL": "postgresql://u@h/d", "DB_HOST": "ignored", "DATA_DIR": str(tmp_path)})
    assert s.dsn() == "postgresql://u@h/d"
    assert load_settings({"DATA_DIR": str(tmp_path)}).embedded_database


@pytest.mark.parametrize("env,fragment", [
    ({"PORT": "eighty"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"DB_POOL_MIN_SIZE": "30", "DB_POOL_MAX_SIZE": "10"}, "DB_POOL_MIN_SIZE"),
    ({"ALLOW_ANONYMOUS": "perhaps"}, "ALLOW_ANONYMOUS"),
    ({"SEARCH_FUSION": "magic"}, "SEARCH_FUSION"),
    ({"FUSION_ALPHA": "1.5"}, "FUSION_ALPHA"),
    ({"DENSE_EXACT_FRACTION": "1.5"}, "DENSE_EXACT_FRACTION"),
    ({"DENSE_EXACT_FRACTION": "-0.1"}, "DENSE_EXACT_FRACTION"),
    ({"JWT_ALGORITHMS": "none"}, "JWT_ALGORITHMS"),
    ({"JWT_ALGORITHMS": "HS256,RS256", "OIDC_JWKS_URL": "http://127.0.0.1/jwks"}, "mix"),
    ({"EMBEDDING_PROVIDER": "ollama"}, "EMBEDDING_URL"),
])
def test_invalid_values_are_reported_clearly(tmp_path: Path, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({**env, "DATA_DIR": str(tmp_path)})
    assert fragment in err.value.message


def test_development_secrets_generated_once_and_shared(tmp_path: Path) -> None:
    first = load_settings({"DATA_DIR": str(tmp_path)})
    second = load_settings({"DATA_DIR": str(tmp_path)})
    assert first.jwt_secret_key and len(first.jwt_secret_key) >= 32
    assert first.jwt_secret_key == second.jwt_secret_key
    assert first.audit_hmac_key == second.audit_hmac_key != first.jwt_secret_key
    assert (tmp_path / "secrets" / "jwt_secret_key").stat().st_mode & 0o077 == 0


def test_config_file_and_environment_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "campus.env"
    cfg.write_text("# comment\nPORT=6000\nDEFAULT_MAX_RESULTS = 7\n")
    s = load_settings({"CAMPUS_SEARCH_CONFIG": str(cfg), "PORT": "6001", "DATA_DIR": str(tmp_path)})
    assert (s.port, s.default_max_results) == (6001, 7)
    with pytest.raises(ConfigError):
        load_settings({"CAMPUS_SEARCH_CONFIG": str(tmp_path / "missing.env"), "DATA_DIR": str(tmp_path)})


@pytest.mark.parametrize("written, meant", [
    ('"a secret with spaces"', "a secret with spaces"),   # one surrounding pair is removed
    ("'single-quoted'", "single-quoted"),
    ('Zx9"trailing-quote-kept-' + "k" * 30 + '"', 'Zx9"trailing-quote-kept-' + "k" * 30 + '"'),
    ('"leading-quote-only-' + "k" * 30, '"leading-quote-only-' + "k" * 30),
    ("k" * 32 + "'", "k" * 32 + "'"),                      # ends in a quote: kept
    ("'" + "k" * 32 + '"', "'" + "k" * 32 + '"'),          # quotes that do not match: kept
    ('""' + "k" * 32 + '""', '"' + "k" * 32 + '"'),        # only the outer pair goes
])
def test_config_file_keeps_quote_characters_that_are_part_of_a_secret(tmp_path: Path, written: str,
                                                                      meant: str) -> None:
    cfg = tmp_path / "campus.env"
    cfg.write_text(f"JWT_SECRET_KEY={written}\n", encoding="utf-8")
    s = load_settings({"CAMPUS_SEARCH_CONFIG": str(cfg), "DATA_DIR": str(tmp_path)})
    assert s.jwt_secret_key == meant


def test_cli_reports_configuration_errors_without_traceback(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "campus_search.cli.main", "config"], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path), "PORT": "eighty"}, timeout=60)
    assert r.returncode == 2
    assert "PORT" in r.stderr and "Traceback" not in r.stderr
