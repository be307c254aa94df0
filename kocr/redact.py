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
# a database URL (any scheme but http/https), read as SQLAlchemy reads it: the password runs to the first @,
# and may hold / ? # (make_url("postgresql+psycopg2://kim:s3c/ret@db/optuna").password is "s3c/ret", and
# psycopg2 connects with it); was: such a password was left in the clear, in MLflow params and tags too.
# The user part, as SQLAlchemy's, runs to the first : or / and may be empty or hold @ (Azure Database for
# PostgreSQL's "kim@myserver"; make_url("postgresql://kim@myserver:s3cret@h/db").password is "s3cret")
_DB_USERINFO = re.compile(r"(\b(?!https?://)[a-z][\w+.-]*://[^/:\s]*:)[^@\s]+@", re.IGNORECASE)
_QUERY = re.compile(r"([?&](?:password|passwd|pwd|sslpassword)=)[^&#]*", re.IGNORECASE)


def hide_passwords(url: str) -> str:
    """``url`` with the password of its user part and of any password query parameter as ``***``.

    >>> hide_passwords("postgresql+psycopg2://kim:s3c/ret@db/optuna")
    'postgresql+psycopg2://kim:***@db/optuna'
    >>> hide_passwords("postgresql+psycopg2://kim@myserver:s3cret@db/optuna")
    'postgresql+psycopg2://kim@myserver:***@db/optuna'
    """
    return _QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", _DB_USERINFO.sub(r"\1***@", url)))
