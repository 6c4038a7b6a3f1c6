"""Secrets: what production refuses (missing, short or placeholder keys) and the development secrets
generated once under ``DATA_DIR/secrets``, so the server and ``campus-search token`` agree without set-up.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from campus_search.config.settings import Settings

PLACEHOLDER_SECRETS = {
    "",
    "change-in-production",
    "changeme",
    "secret",
    "secure_jwt_key_64_characters_minimum_length_required",
}
MIN_SECRET_LENGTH = 32


def _weak(value: str | None) -> bool:
    return not value or value in PLACEHOLDER_SECRETS or len(value) < MIN_SECRET_LENGTH


def production_secret_problems(s: Settings) -> list[str]:
    """Why production must not start with these secrets (empty in development: secrets are generated)."""
    if not s.production:
        return []
    problems: list[str] = []
    if any(a.startswith("HS") for a in s.jwt_algorithms) and _weak(s.jwt_secret_key):
        problems.append(
            f"JWT_SECRET_KEY must be set to a random secret of at least {MIN_SECRET_LENGTH} characters "
            "in production (not a placeholder)")
    if _weak(s.audit_hmac_key):
        problems.append(f"AUDIT_HMAC_KEY must be set to a random secret of at least {MIN_SECRET_LENGTH} "
                        "characters in production")
    if s.db_password is not None and s.db_password in PLACEHOLDER_SECRETS | {"postgres"}:
        problems.append("POSTGRES_PASSWORD is a default value; set a real one in production")
    return problems


def local_secret(data_dir: str, name: str) -> str:
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


def with_local_secrets(s: Settings) -> Settings:
    """Development: missing JWT and audit keys filled from DATA_DIR/secrets. Production: unchanged (it was
    refused already if they are missing)."""
    if s.production:
        return s
    changes: dict[str, str] = {}
    if not s.jwt_secret_key:
        changes["jwt_secret_key"] = local_secret(s.data_dir, "jwt_secret_key")
    if not s.audit_hmac_key:
        changes["audit_hmac_key"] = local_secret(s.data_dir, "audit_hmac_key")
    return s.replace(**changes) if changes else s
