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
import re
from pathlib import Path
from typing import Iterator

import sqlalchemy

from kocr.atomic import locked_file
from kocr.redact import hide_passwords


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, remove: bool = False, wait: bool = True) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if absent); released when the holder dies.

    With ``remove``, the file is unlinked while still held, before the lock is released. A process
    that was waiting on the file so unlinked finds, once it holds it, that ``path`` is no longer that
    file, and locks the one now at ``path`` instead (creating it): an unlinked file never serves as a
    second lock beside a new one, so removing the file is safe while others use it. Without ``wait``,
    a lock another process holds raises ``BlockingIOError`` at once."""
    how = fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB
    with locked_file(path, lambda handle: fcntl.flock(handle, how)) as handle:
        try:
            yield
        finally:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


class LockError(RuntimeError):
    """A lock database that cannot be reached or used; names the URL without its password."""


CONNECT_TIMEOUT_S = 10  # libpq's connect_timeout where a PostgreSQL URL sets none (libpq's own default: wait for ever)


def connect_args(url: str | sqlalchemy.engine.URL) -> dict[str, int]:
    """``connect_args`` for ``create_engine`` on ``url``: for PostgreSQL, libpq's ``connect_timeout`` of
    :data:`CONNECT_TIMEOUT_S` seconds unless the URL's query sets ``connect_timeout`` itself (which
    wins: ``?connect_timeout=60``), so that a host dropping packets or a port that accepts but never
    answers fails in seconds (was: some two minutes per try, or for ever); nothing for other databases,
    nor where libpq's ``PGCONNECT_TIMEOUT`` is set (which a ``connect_timeout`` given here would override).
    SQLAlchemy passes these to psycopg2 over the URL's own query options."""
    parsed = sqlalchemy.engine.make_url(url)
    if (parsed.get_backend_name() not in ("postgresql", "postgres") or "connect_timeout" in parsed.query
            or os.environ.get("PGCONNECT_TIMEOUT")):
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_S}


def _psycopg2(url: sqlalchemy.engine.URL) -> sqlalchemy.engine.URL:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; the project installs psycopg2."""
    return url.set(drivername="postgresql+psycopg2") if url.drivername in ("postgresql", "postgres") else url


@contextlib.contextmanager
def advisory_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock keyed by ``name``; the server releases it if the holder dies.

    Raises LockError (one line, password hidden) when the database cannot be reached or refuses."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    parsed = _psycopg2(sqlalchemy.engine.make_url(url))
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool, connect_args=connect_args(parsed))
    try:
        try:
            conn = engine.connect()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
            detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            shown = hide_passwords(parsed.render_as_string(hide_password=False))
            raise LockError(f"lock database {shown}: {hide_passwords(detail)}") from None
        with conn:
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def _sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL, else None (other databases, SQLite in memory)."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        return parsed.database
    return None


def _lock_file(url: str, name: str) -> str | None:
    """The file :func:`database_lock` locks for a SQLite file database, else None."""
    database = _sqlite_file(url)
    return f"{database}.{hashlib.sha256(name.encode()).hexdigest()[:8]}.lock" if database else None


def database_lock(url: str, name: str) -> contextlib.AbstractContextManager[None] | None:
    """The lock that fits a database URL: advisory for PostgreSQL, a file beside a SQLite file, else None."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() in ("postgresql", "postgres"):  # postgres:// is the same server
        return advisory_lock(url, name)
    path = _lock_file(url, name)
    return file_lock(path) if path else None


def discard_database_lock(url: str, name: str) -> None:
    """Remove the file of :func:`database_lock` ``(url, name)`` beside a SQLite database, if it is there,
    once this process holds it: for a lock named after something that ends (a tune study), whose
    file would otherwise stay beside the database for good. A process still using the lock makes the
    file anew (:func:`file_lock`); nothing to do for other databases."""
    path = _lock_file(url, name)
    if path and os.path.exists(path):
        with contextlib.suppress(FileNotFoundError), file_lock(path, remove=True):
            pass


def discard_unheld_lock_files(url: str) -> None:
    """Remove the files of :func:`database_lock` beside a SQLite database that no process holds: a
    SIGKILLed holder's lock went with it, but its file stays, for good where the lock is named after
    something that ended (a tune study). Each is removed while this process holds it, as
    :func:`file_lock` with ``remove`` does, so removing one in use is safe; a held one is left, and so is
    any this process cannot remove. Nothing to do for other databases."""
    if (file := _sqlite_file(url)) is None:
        return
    database = Path(file)
    pattern = re.compile(re.escape(database.name) + r"\.[0-9a-f]{8}\.lock")
    with contextlib.suppress(OSError):
        locks = sorted(path for path in database.parent.iterdir() if pattern.fullmatch(path.name))
        for lock in locks:
            with contextlib.suppress(OSError), file_lock(lock, remove=True, wait=False):  # held: BlockingIOError
                pass
