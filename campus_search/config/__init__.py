"""Settings: every knob declared once, typed, documented and validated at start.

- ``settings.py``: the :class:`Settings` dataclass, one declaration per setting (type, environment names,
  default, help, parser) through ``fields.setting``; :data:`FIELDS` is read back from it.
- ``fields.py``: what a declaration is, and the parsers of environment values.
- ``loading.py``: :func:`load_settings` from the environment and the ``CAMPUS_SEARCH_CONFIG`` file.
- ``validation.py``: every problem at once, as one :class:`~campus_search.errors.ConfigError`.
- ``secret_keys.py``: production refuses weak secrets; development generates them under DATA_DIR.
- ``docs.py``: the reference table of docs/configuration.md (``make docs``).

May import: ``campus_search.errors`` and, for validation, ``campus_search.security`` (roles, proxies).
"""

from campus_search.config.docs import markdown_table
from campus_search.config.fields import Field
from campus_search.config.loading import load_settings
from campus_search.config.secret_keys import MIN_SECRET_LENGTH, PLACEHOLDER_SECRETS
from campus_search.config.settings import FIELDS, Settings, redact_url

__all__ = ["FIELDS", "MIN_SECRET_LENGTH", "PLACEHOLDER_SECRETS", "Field", "Settings", "load_settings",
           "markdown_table", "redact_url"]
