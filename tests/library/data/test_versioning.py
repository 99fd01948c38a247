"""The DVC round trip on a temporary git repository, with the real dvc command."""

import subprocess

import pytest

from clara.data import versioning


def git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "ci@example.invalid")
    git(repo, "config", "user.name", "ci")
    versioning.init(repo, remote=tmp_path / "remote")
    git(repo, "add", ".dvc")
    git(repo, "commit", "-q", "-m", "dvc init")
    return repo


def test_snapshot_change_snapshot_and_read_the_old_version(repo, tmp_path):
    config = (repo / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "remote = local" in config
    assert versioning.data_version(repo) is None
    (repo / "data" / "corpus").mkdir(parents=True)
    (repo / "data" / "corpus" / "c.jsonl").write_text('{"id": "a", "text": "first"}\n')
    v1 = versioning.snapshot(repo, git_commit=True)
    rev1 = git(repo, "rev-parse", "HEAD")
    assert v1 == versioning.data_version(repo) and v1.endswith(".dir")
    assert versioning.status_clean(repo)
    assert versioning.snapshot(repo, git_commit=True) == v1  # unchanged data: same version, no new commit
    assert git(repo, "rev-parse", "HEAD") == rev1

    (repo / "data" / "corpus" / "c.jsonl").write_text('{"id": "a", "text": "second"}\n')
    assert not versioning.status_clean(repo)
    v2 = versioning.snapshot(repo, git_commit=True)
    assert v2 != v1 and versioning.status_clean(repo)
    assert "/data" in (repo / ".gitignore").read_text()

    old = versioning.read_text("data/corpus/c.jsonl", repo, rev=rev1)
    assert '"first"' in old
    assert '"second"' in versioning.read_text("data/corpus/c.jsonl", repo)
    # The remote holds both versions: a fresh clone can fetch the old one without this workspace's cache.
    assert any((tmp_path / "remote").rglob("*"))


def test_snapshot_without_data_is_an_error(repo):
    with pytest.raises(versioning.DataVersionError, match="nothing to snapshot"):
        versioning.snapshot(repo)
