"""Data versioning with DVC: ``data/`` is one DVC-tracked folder (top-level ``data.dvc``).

The functions shell out to the real ``dvc`` command (the CLI is DVC's stable interface) and read old versions
through ``dvc.api``. A data version is the md5 that ``data.dvc`` records for ``data/``: every downstream run
stores it, so a result always names exactly the data it came from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from clara.errors import ClaraError

DEFAULT_REMOTE_NAME = "local"


class DataVersionError(ClaraError):
    pass


def _dvc_executable() -> list[str]:
    exe = shutil.which("dvc")
    if exe is None:
        candidate = Path(sys.executable).with_name("dvc")
        if candidate.exists():
            exe = str(candidate)
    if exe is None:
        raise DataVersionError("the dvc command is not installed (pip install dvc==3.67.1)")
    return [exe]


def _run(repo: Path, *args: str, tool: str = "dvc") -> str:
    cmd = (_dvc_executable() if tool == "dvc" else ["git"]) + list(args)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise DataVersionError(f"`{' '.join([tool, *args])}` failed in {repo}: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def init(repo: str | Path, remote: str | Path | None = None, remote_name: str = DEFAULT_REMOTE_NAME) -> None:
    """``dvc init`` (if needed) with analytics and update checks off, and a default remote.

    Args:
        remote: a folder (created if missing) or any DVC remote URL (s3://, gs://, …). ``None`` keeps whatever
            remote is configured.
    """
    repo = Path(repo)
    if not (repo / ".dvc").is_dir():
        _run(repo, "init", "-q")
    _run(repo, "config", "core.analytics", "false")
    _run(repo, "config", "core.check_update", "false")
    if remote is not None:
        url = str(remote)
        if "://" not in url:
            Path(url).mkdir(parents=True, exist_ok=True)
        existing = _run(repo, "remote", "list")
        if any(line.split()[0] == remote_name for line in existing.splitlines() if line.strip()):
            _run(repo, "remote", "modify", remote_name, "url", url)
        else:
            _run(repo, "remote", "add", remote_name, url)
        _run(repo, "remote", "default", remote_name)


def data_version(repo: str | Path, target: str = "data") -> str | None:
    """The md5 that ``<target>.dvc`` records (None if the data was never snapshotted)."""
    dvc_file = Path(repo) / f"{target}.dvc"
    if not dvc_file.is_file():
        return None
    try:
        meta = yaml.safe_load(dvc_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DataVersionError(f"{dvc_file}: not valid YAML: {exc}") from None
    outs = meta.get("outs") if isinstance(meta, dict) else None
    if not isinstance(outs, list) or not outs or not isinstance(outs[0], dict) or "md5" not in outs[0]:
        raise DataVersionError(f"{dvc_file} has no md5 for its output (a DVC file holds outs: [{{md5: …}}])")
    return str(outs[0]["md5"])


def snapshot(repo: str | Path, target: str = "data", *, push: bool = True, git_commit: bool = False,
             message: str | None = None) -> str:
    """``dvc add <target>`` (+ ``dvc push``), optionally commit ``<target>.dvc``; return the new data version.

    Idempotent: unchanged data gives the same version and no new commit.
    """
    repo = Path(repo)
    if not (repo / target).exists():
        raise DataVersionError(f"{repo / target} does not exist: nothing to snapshot")
    _run(repo, "add", "-q", target)
    if push:
        _run(repo, "push", "-q", f"{target}.dvc")
    version = data_version(repo, target)
    if git_commit:
        _run(repo, "add", f"{target}.dvc", ".gitignore", tool="git")
        status = _run(repo, "status", "--porcelain", f"{target}.dvc", ".gitignore", tool="git")
        if status.strip():
            _run(repo, "commit", "-q", "-m", message or f"data: {target} version {version}", "--",
                 f"{target}.dvc", ".gitignore", tool="git")
    return version  # type: ignore[return-value]


def read_text(path: str, repo: str | Path, rev: str | None = None) -> str:
    """A tracked file's content at git revision ``rev`` (e.g. the commit a model was trained from)."""
    import dvc.api

    return dvc.api.read(path, repo=str(repo), rev=rev, encoding="utf-8")


def status_clean(repo: str | Path) -> bool:
    """True when the workspace matches the ``.dvc`` files (``dvc status`` has nothing to report)."""
    import json

    return json.loads(_run(Path(repo), "status", "--json") or "{}") == {}
