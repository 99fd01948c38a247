"""`clara store start|stop|builds`: the embedded PostgreSQL + pgvector and its builds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clara.cli.common import DbOpt, store_app


@store_app.command("start")
def store_start(datadir: Optional[Path] = typer.Option(None, help="Data folder (default ~/.cache/clara/pgdata).")
                ) -> None:
    """Start the embedded PostgreSQL + pgvector and leave it running; prints its URL."""
    from clara.store.db import connect
    from clara.store.server import embedded_server, sqlalchemy_url

    url = sqlalchemy_url(embedded_server(datadir, keep_running=True).get_uri())
    connect(url).dispose()  # migrate now, so the first user finds the schema
    typer.echo(url)


@store_app.command("stop")
def store_stop(datadir: Optional[Path] = typer.Option(None, help="Data folder (default ~/.cache/clara/pgdata).")
               ) -> None:
    """Stop the embedded server (data is kept)."""
    from clara.store.server import stop_embedded

    typer.echo("stopped" if stop_embedded(datadir) else "not running")


@store_app.command("builds")
def store_builds(database_url: Optional[str] = DbOpt) -> None:
    """List index builds with their status."""
    from clara.store.builds import list_builds
    from clara.store.db import connect

    for b in list_builds(connect(database_url)):
        typer.echo(f"{b.id:>5}  {b.status:<9} rate {b.compression_rate:<4} docs {b.n_docs:<8} "
                   f"{b.ann_kind:<7} {b.corpus_version}  {b.model_uri}")
