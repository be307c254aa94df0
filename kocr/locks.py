"""Cross-process locks for decisions several workers or pipelines may take at once.

Example:
    >>> with database_lock("sqlite:////tmp/x.db", "promote:ko-ocr-recognizer"):   # doctest: +SKIP
    ...     decide()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from typing import Iterator

import sqlalchemy


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if absent); released when the holder dies."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def advisory_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock keyed by ``name``; the server releases it if the holder dies."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def database_lock(url: str, name: str) -> contextlib.AbstractContextManager[None] | None:
    """The lock that fits a database URL: advisory for PostgreSQL, a file beside a SQLite file, else None."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return advisory_lock(url, name)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return file_lock(f"{parsed.database}.{hashlib.sha256(name.encode()).hexdigest()[:8]}.lock")
    return None
