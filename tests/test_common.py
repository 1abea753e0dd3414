"""gbla/common.py: provenance, atomic writes, JSON, metric formulas and markdown tables shared by the package."""
import json
import os
import re
import shutil
import subprocess
import threading

import numpy as np
import pandas as pd
import pytest

from gbla import common


def _git(repo, *args) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs the git command")
def test_git_commit_names_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("GBLA_COMMIT", raising=False)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "tracked.txt").write_text("one\n")
    (repo / "data" / "code.txt").write_text("one\n")
    _git(repo, "add", "tracked.txt", "data/code.txt")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", head)
    assert common.git_commit(repo) == head
    (repo / "untracked.txt").write_text("new file\n")   # untracked files do not make a checkout dirty
    assert common.git_commit(repo) == head
    (repo / "outputs").mkdir()
    (repo / "outputs" / "result.json").write_text("{}\n")
    _git(repo, "add", "outputs/result.json")
    _git(repo, "commit", "-q", "-m", "a result")
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "outputs" / "result.json").write_text('{"rerun": 1}\n')   # results rewritten: not code
    assert common.git_commit(repo) == head
    (repo / "tracked.txt").write_text("two\n")
    assert common.git_commit(repo) == head + "-dirty"
    assert common.git_commit(repo, paths=["data"]) == head     # dirty only outside the paths asked about
    (repo / "data" / "code.txt").write_text("two\n")
    assert common.git_commit(repo, paths=["data"]) == head + "-dirty"
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    assert common.git_commit(outside) == "unknown"
    monkeypatch.setenv("GBLA_COMMIT", "abc123")                 # a copied tree names its commit: it wins
    assert common.git_commit(repo) == "abc123" and common.git_commit(outside) == "abc123"


def test_atomic_write_replaces_whole_files(tmp_path):
    path = tmp_path / "a" / "x.json"
    common.atomic_write_json(path, {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(2), "d": tmp_path})
    assert json.loads(path.read_text()) == {"a": 3, "b": 0.5, "c": [0, 1], "d": str(tmp_path)}
    common.atomic_write_text(path, "new")
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["x.json"]
    with pytest.raises(TypeError, match="not JSON serialisable"):
        common.atomic_write_json(path, {"a": object()})
    assert path.read_text() == "new" and [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_atomic_path_names_a_temporary_per_writer(tmp_path):
    """Two writers of one file never share a temporary name (a fixed name lets one rename the other's
    half-written file); a failed write leaves the old file and no temporary behind."""
    path = tmp_path / "x.txt"
    names, barrier = [], threading.Barrier(2)

    def write(text):
        with common.atomic_path(path) as tmp:
            names.append(tmp.name)
            tmp.write_text(text)
            barrier.wait()

    threads = [threading.Thread(target=write, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 2 and path.read_text() in ("a", "b")
    with pytest.raises(RuntimeError):
        with common.atomic_path(path, suffix=".npy") as tmp:
            assert tmp.name.endswith(".npy")
            tmp.write_text("half")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_metric_formulas():
    rank = np.array([0, 1, 3, 5, 6, 10], dtype=np.int8)
    assert common.hits_at(rank, 5).tolist() == [False, True, True, True, False, False]
    expected = [0, 1, 1 / np.log2(4), 1 / np.log2(6), 0, 0]
    np.testing.assert_array_equal(common.ndcg_at(rank, 5), expected)
    assert common.METRIC_NAMES == ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def test_markdown_tables():
    assert common.markdown_table(["a", "b"], [[1, 0.5], ["x", 2.25]], ".1f") == (
        "| a | b |\n|---|---|\n| 1 | 0.5 |\n| x | 2.2 |")
    frame = pd.DataFrame({"v": [1.0, 2.5]}, index=pd.Index(["p", "q"], name="k"))
    assert common.frame_markdown(frame, ".2f") == "| k | v |\n|---|---|\n| p | 1.00 |\n| q | 2.50 |"


def test_shown_path_is_relative_inside_the_repository_and_absolute_outside(tmp_path):
    from gbla.common import REPO_ROOT, shown_path
    assert shown_path("outputs/runs") == "outputs/runs"
    assert shown_path(REPO_ROOT / "params" / "ablations.yaml") == "params/ablations.yaml"
    assert shown_path(tmp_path / "runs") == str((tmp_path / "runs").resolve())
    assert shown_path(None) is None and shown_path("") is None
