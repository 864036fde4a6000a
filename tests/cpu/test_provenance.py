"""Where a stored number came from: trt_prune.provenance's commit, dirty flag and the GPU machine's override."""

import subprocess

import pytest

from trt_prune.provenance import git_commit, stamp


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("TRT_PRUNE_COMMIT", raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "r.json").write_text("{}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return tmp_path


def test_commit_is_head_and_dirty_only_for_code(repo):
    head = _git(repo, "rev-parse", "--short", "HEAD")
    assert git_commit(repo) == head
    (repo / "bench" / "results" / "r.json").write_text('{"new": 1}\n')  # a result being written: still clean
    assert git_commit(repo) == head
    (repo / "code.py").write_text("x = 2\n")
    assert git_commit(repo) == head + "+dirty"
    provenance = stamp(repo)
    assert provenance["commit"] == head + "+dirty" and provenance["uncommitted"] is True


def test_named_commit_wins_over_a_stale_git_copy(repo, monkeypatch):
    (repo / "code.py").write_text("x = 3\n")  # the GPU machine's .git can be older than the files sent
    monkeypatch.setenv("TRT_PRUNE_COMMIT", "abc1234")
    assert git_commit(repo) == "abc1234"
    assert stamp(repo)["commit"] == "abc1234" and stamp(repo)["uncommitted"] is False


def test_outside_git_the_commit_is_unknown(tmp_path, monkeypatch):
    monkeypatch.delenv("TRT_PRUNE_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_commit(tmp_path) is None
    assert stamp(tmp_path)["commit"] == "unknown"
