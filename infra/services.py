"""Start, check and stop the local services the pipeline talks to, idempotently.

    python -m clara_infra.services up       # Postgres (embedded), MLflow server, Prefect server, served deployment
    python -m clara_infra.services status
    python -m clara_infra.services env      # shell exports for MLFLOW_TRACKING_URI, PREFECT_API_URL, …
    python -m clara_infra.services down

Everything lives under one state folder (``$CLARA_STATE_DIR``, default ``.clara/`` in the project): ``logs/``
(one log per service), ``pids/``, ``mlflow/`` (artifact store) and ``prefect/`` (PREFECT_HOME). MLflow's backend store
is a database ``mlflow`` on the same Postgres as the compressed corpus (``$CLARA_MLFLOW_BACKEND=sqlite`` for a
file, or any SQLAlchemy URL).
Ports come from ``$CLARA_MLFLOW_PORT`` (5000) and ``$CLARA_PREFECT_PORT`` (4200); everything binds to 127.0.0.1.
A service that already answers its health check is left alone, so ``up`` can be run any number of times.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
PROJECT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Layout:
    state: Path
    mlflow_port: int
    prefect_port: int

    @classmethod
    def from_env(cls) -> "Layout":
        state = Path(os.environ.get("CLARA_STATE_DIR") or PROJECT / ".clara").resolve()
        return cls(state, int(os.environ.get("CLARA_MLFLOW_PORT", "5000")),
                   int(os.environ.get("CLARA_PREFECT_PORT", "4200")))

    @property
    def logs(self) -> Path:
        return self.state / "logs"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    def env(self) -> dict[str, str]:
        """What a client of these services needs in its environment."""
        return {
            "CLARA_STATE_DIR": str(self.state),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_HOME": str(self.state / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
        }


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception:  # refused, timed out, 5xx: not healthy (yet)
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A zombie (exited child not yet reaped) still answers kill(0).
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return True


def _pid(layout: Layout, name: str) -> int | None:
    f = layout.state / "pids" / f"{name}.pid"
    try:
        pid = int(f.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _spawn(layout: Layout, name: str, cmd: list[str], secret_env: dict[str, str] | None = None) -> int:
    """Start ``cmd`` in its own session (so stopping it stops its children), logging to logs/<name>.log.

    ``secret_env``: settings that hold credentials (a database URL with its password) go to the process through its
    environment, never on its command line, which every user of the machine can read (``ps``); logs are 0600."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    (layout.state / "pids").mkdir(parents=True, exist_ok=True)
    path = layout.logs / f"{name}.log"
    log = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    os.chmod(path, 0o600)  # a log made by an earlier version may be world-readable
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **layout.env(), **(secret_env or {})}, cwd=PROJECT,
                            start_new_session=True)
    (layout.state / "pids" / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _wait(name: str, check, pid: int | None, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not _alive(pid):
            break
        time.sleep(0.5)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{name} did not become healthy within {timeout:.0f} s; last lines of {log}:\n{tail}")


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


# ------------------------------------------------------------------------------------------- services

def postgres_up(layout: Layout) -> str:
    """The embedded PostgreSQL + pgvector (or ``$CLARA_DATABASE_URL``), migrated; returns its URL."""
    from clara.store.db import connect
    from clara.store.server import ENV_URL, embedded_server, sqlalchemy_url

    url = os.environ.get(ENV_URL) or sqlalchemy_url(embedded_server(keep_running=True).get_uri())
    connect(url).dispose()  # connects and migrates: the health check
    return url


def mlflow_healthy(layout: Layout) -> bool:
    return _http_ok(f"{layout.mlflow_uri}/health")


def mlflow_backend(layout: Layout, postgres_url: str | None) -> str:
    """MLflow's backend store, from ``$CLARA_MLFLOW_BACKEND``: ``postgres`` (the default: a database ``mlflow`` on
    the Postgres server the store already runs), ``sqlite`` (a file under the state folder) or any SQLAlchemy URL."""
    choice = os.environ.get("CLARA_MLFLOW_BACKEND", "postgres")
    if choice == "sqlite" or (choice == "postgres" and postgres_url is None):
        return f"sqlite:///{layout.state / 'mlflow' / 'mlflow.db'}"
    if choice != "postgres":
        return choice
    from clara.store.db import ensure_database

    return ensure_database(postgres_url, "mlflow")


def mlflow_up(layout: Layout, backend: str | None = None, timeout: float = 180) -> str:
    """The MLflow server on ``backend`` (default: ``mlflow_backend`` with no Postgres, i.e. SQLite)."""
    if mlflow_healthy(layout):
        return "running"
    home = layout.state / "mlflow"
    (home / "artifacts").mkdir(parents=True, exist_ok=True)
    backend = backend or mlflow_backend(layout, None)
    # One worker (~750 MB RSS): four cost ~1.5 GB on a laptop for no gain with one pipeline.
    # the backend URL may carry a password: mlflow server reads it from MLFLOW_BACKEND_STORE_URI
    pid = _spawn(layout, "mlflow", [
        _bin("mlflow"), "server",
        "--artifacts-destination", str(home / "artifacts"), "--host", HOST, "--port", str(layout.mlflow_port),
        "--workers", "1"], secret_env={"MLFLOW_BACKEND_STORE_URI": backend})
    _wait("MLflow", lambda: mlflow_healthy(layout), pid, timeout, layout.logs / "mlflow.log")
    return "started"


def prefect_healthy(layout: Layout) -> bool:
    return _http_ok(f"{layout.prefect_api}/health")


def prefect_up(layout: Layout, timeout: float = 120) -> str:
    if prefect_healthy(layout):
        return "running"
    pid = _spawn(layout, "prefect", [_bin("prefect"), "server", "start", "--host", HOST,
                                     "--port", str(layout.prefect_port)])
    _wait("Prefect server", lambda: prefect_healthy(layout), pid, timeout, layout.logs / "prefect.log")
    return "started"


def deployment_registered(layout: Layout) -> bool:
    return _http_ok(f"{layout.prefect_api}/deployments/name/clara/full-pipeline")


def runs_in_flight(layout: Layout) -> int:
    """Flow runs the Prefect server has pending or running (-1 if it cannot be asked)."""
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING"]}}}}).encode()
    req = urllib.request.Request(f"{layout.prefect_api}/flow_runs/count", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(json.load(r))
    except Exception:  # the server does not answer: unknown
        return -1


def serve_up(layout: Layout, timeout: float = 120) -> str:
    """The process serving deployment ``clara/full-pipeline`` (runs pick-up from it).

    The serving process keeps the flow code it started with (Prefect hands each run the flow object it loaded,
    not the file as it is now), so after an edit of the project's sources (``clara_flows.source_digest``) it is
    restarted, unless a flow run is in flight: that one would be killed, so the old process is kept and the reply
    says so."""
    from clara_flows import source_digest

    code = source_digest(PROJECT)
    code_file = layout.state / "pids" / "serve.code"
    pid = _pid(layout, "serve")
    if pid is not None and deployment_registered(layout):
        served = code_file.read_text().strip() if code_file.exists() else ""
        if served == code:
            return "running"
        if runs_in_flight(layout) != 0:
            return "running older code (flow runs in flight; run `up` again once they finish)"
    if pid is not None:
        _stop(layout, "serve")
    started = time.time()
    pid = _spawn(layout, "serve", [sys.executable, "-m", "clara_flows.serve"])
    code_file.write_text(code)
    log = layout.logs / "serve.log"
    # Registered (again) by this process: its log says so once the deployment is up.
    _wait("deployment clara/full-pipeline",
          lambda: deployment_registered(layout) and "full-pipeline" in log.read_text(errors="replace")[-4000:]
          and time.time() - started > 1, pid, timeout, log)
    return "started"


def _stop(layout: Layout, name: str, grace: float = 15) -> str:
    pid = _pid(layout, name)
    pid_file = layout.state / "pids" / f"{name}.pid"
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return "not running"
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return "stopped"


# ------------------------------------------------------------------------------------------------ CLI

def up(layout: Layout, serve: bool = True) -> dict[str, str]:
    from sqlalchemy import make_url

    pg = postgres_up(layout)
    out = {"postgres": make_url(pg).render_as_string(hide_password=True),  # never print a password
           "mlflow": mlflow_up(layout, mlflow_backend(layout, pg)), "prefect": prefect_up(layout)}
    if serve:
        out["serve"] = serve_up(layout)
    return out


def down(layout: Layout) -> dict[str, str]:
    from clara.store.server import stop_embedded

    out = {name: _stop(layout, name) for name in ("serve", "prefect", "mlflow")}
    out["postgres"] = "stopped" if os.environ.get("CLARA_DATABASE_URL") is None and stop_embedded() else "not ours"
    return out


def status(layout: Layout) -> dict[str, str]:
    return {"mlflow": f"{'up' if mlflow_healthy(layout) else 'down'} {layout.mlflow_uri}",
            "prefect": f"{'up' if prefect_healthy(layout) else 'down'} {layout.prefect_api.removesuffix('/api')}",
            "deployment clara/full-pipeline": ("served" if _pid(layout, "serve") and deployment_registered(layout)
                                               else "not served"),
            "logs": str(layout.logs)}


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")  # platformdirs, in containers
    parser = argparse.ArgumentParser(prog="python -m clara_infra.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--no-serve", action="store_true", help="up: do not start the served deployment")
    args = parser.parse_args(argv)
    layout = Layout.from_env()
    if args.command == "env":
        for k, v in layout.env().items():
            print(f"export {k}={v}")
        return 0
    if args.command == "up":
        result = up(layout, serve=not args.no_serve)
    elif args.command == "down":
        result = down(layout)
    else:
        result = status(layout)
    for k, v in result.items():
        print(f"{k:<32} {v}")
    if args.command == "up":
        print(f"{'MLflow UI':<32} {layout.mlflow_uri}\n{'Prefect UI':<32} {layout.prefect_api.removesuffix('/api')}"
              f"\n{'logs':<32} {layout.logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
