"""URLs fit for messages, logs, MLflow tags and committed files: every password in them hidden.

A database or tracking URL can carry its password in two places: ``user:PASSWORD@host`` and a
query parameter (``?password=…``, which psycopg2 and SQLAlchemy accept as well).

Example:
    >>> hide_passwords("postgresql+psycopg2://kim:s3cret@db:5432/optuna")
    'postgresql+psycopg2://kim:***@db:5432/optuna'
    >>> hide_passwords("postgresql+psycopg2://kim@db/optuna?sslmode=require&password=s3cret")
    'postgresql+psycopg2://kim@db/optuna?sslmode=require&password=***'
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(//[^/:@?#]+:)[^/@?#]+@")
_QUERY = re.compile(r"([?&](?:password|passwd|pwd|sslpassword)=)[^&#]*", re.IGNORECASE)


def hide_passwords(url: str) -> str:
    """``url`` with the password of its user part and of any password query parameter as ``***``."""
    return _QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", url))
