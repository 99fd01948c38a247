"""Engine and migrations. Migrations are plain ordered SQL files in ``migrations/``, applied once each, in a
transaction, under an advisory lock (so two processes starting together do not race)."""

from __future__ import annotations

import contextlib
import hashlib
from importlib import resources
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.exc import OperationalError

from clara.store.builds import StoreUnavailable
from clara.store.server import database_url

MIGRATION_LOCK = 7_300_001  # arbitrary, fixed advisory-lock key for schema changes


def migrations() -> list[tuple[str, str]]:
    folder = resources.files("clara.store") / "migrations"
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


def migrate(engine: Engine) -> list[str]:
    """Apply pending migrations; return the names applied now."""
    applied_now = []
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
        conn.execute(text("CREATE TABLE IF NOT EXISTS schema_migrations ("
                          "name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"))
        done = {r[0] for r in conn.execute(text("SELECT name FROM schema_migrations"))}
        for name, sql in migrations():
            if name in done:
                continue
            conn.exec_driver_sql(sql)
            conn.execute(text("INSERT INTO schema_migrations (name) VALUES (:n)"), {"n": name})
            applied_now.append(name)
    return applied_now


def connect(url: str | None = None, *, run_migrations: bool = True) -> Engine:
    """An engine on ``url`` (or ``$CLARA_DATABASE_URL``, or the embedded server), migrated, with pgvector's
    types registered on every connection (needed for binary COPY of vectors)."""
    from pgvector.psycopg import register_vector

    url = database_url(url)
    if run_migrations:
        plain = create_engine(url)
        try:
            with reachable(plain):
                migrate(plain)
        finally:
            plain.dispose()
    engine = create_engine(url, pool_pre_ping=True)

    @event.listens_for(engine, "connect")
    def _register(dbapi_conn, _record):  # noqa: ANN001
        register_vector(dbapi_conn)

    return engine


@contextlib.contextmanager
def reachable(engine: Engine) -> Iterator[None]:
    """Run store calls in this block; a database that does not answer (through SQLAlchemy or a raw psycopg
    connection, as the loader's COPY uses) becomes ``StoreUnavailable`` naming the server and how to bring it
    back. The engine's pool pings connections before use, so once the server is up the next call just works."""
    import psycopg
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except (DBAPIError, psycopg.OperationalError) as exc:
        if isinstance(exc, DBAPIError) and not (isinstance(exc, OperationalError) or exc.connection_invalidated):
            raise
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise StoreUnavailable(
            f"cannot reach the database at {engine.url.render_as_string(hide_password=True)}: it did not answer "
            f"({first}); start it (python -m clara_infra.services up) or check $CLARA_DATABASE_URL, then try again"
        ) from exc


@contextlib.contextmanager
def advisory_lock(engine: Engine, name: str) -> Iterator[None]:
    """Hold a session-level Postgres advisory lock named ``name`` while the block runs: every process sharing
    this server that asks for the same name waits. The server drops it if the holder dies, so a killed holder
    never blocks the next one."""
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def ensure_database(url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``url``, created if it does not exist yet."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")  # CREATE DATABASE refuses to run in a transaction
    try:
        with engine.connect() as conn:
            if conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is None:
                conn.execute(text(f'CREATE DATABASE "{name}"'))  # a constant of ours, never user input
    finally:
        engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)
