"""Loading: settings from the environment (the seed deployment's names keep working) and, optionally, a
``KEY=VALUE`` file named by ``CAMPUS_SEARCH_CONFIG``; the environment wins. Parsed by each field's parser,
then validated (``validation.py``); development secrets are filled in last (``secret_keys.py``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from campus_search.config.secret_keys import with_local_secrets
from campus_search.config.settings import FIELDS, Settings
from campus_search.config.validation import validate
from campus_search.errors import ConfigError


def _source_checkout() -> Path | None:
    """The git checkout this package runs from (an editable install, ``make install``), or None for an
    installed wheel."""
    root = Path(__file__).resolve().parents[2]
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
    problems += validate(settings)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return with_local_secrets(settings)
