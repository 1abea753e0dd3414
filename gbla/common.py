"""Helpers every layer of the package shares: where the repository is, which commit made a result,
files written whole or not at all, one JSON encoding, the metric names and formulas, markdown tables.

Imports only the standard library and numpy, so any module (data, training, grid, report, benchmarks)
can use it without pulling in the rest of the package.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

# the metrics every run reports (evaluation keeps the target's rank in the top 10)
METRIC_NAMES = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")


def repo_path(path) -> Path | None:
    """Absolute paths as given; relative paths are relative to the repository root (so a notebook
    opened from notebooks/ and papermill started from the root read the same files). None or "": None."""
    if path is None or str(path) == "":
        return None
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def shown_path(path) -> str | None:
    """A path as results show it: relative to the repository root when inside it (the same on every
    checkout), else absolute. None or "": None."""
    path = repo_path(path)
    if path is None:
        return None
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT.resolve()) if path.is_relative_to(REPO_ROOT.resolve()) else path)


# ---------------------------------------------------------------------------------------------
# provenance

# results are not code: committed outputs rewritten by a rerun (a group's notebook, a report) do not
# make the checkout that produces them "dirty"
RESULTS_PATHSPEC = (".", ":(exclude)outputs")


def git_commit(repo: str | os.PathLike = REPO_ROOT, *, paths: Sequence[str] = RESULTS_PATHSPEC) -> str:
    """The checked-out commit, with "-dirty" appended when tracked files have uncommitted changes:
    by default any outside outputs/, else only those under `paths` (e.g. a data build is dirty only
    if the data code is).

    $GBLA_COMMIT, when set, wins: whoever copies the tree to another machine (where .git may be
    missing or stale) sets it to the commit copied. "unknown" without either.
    """
    if os.environ.get("GBLA_COMMIT"):
        return os.environ["GBLA_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *(paths or ["."])],
                               cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------
# atomic writes

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path next to `path` to write to; when the block ends without error it replaces
    `path` (a rename: readers see the old file or the new one, never half), else it is removed.
    The name is unique per writer, so two processes writing the same file never share a temporary.
    `suffix` is for writers that append their own (np.save adds ".npy" to a name without it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def json_default(x: Any):
    """JSON for the non-JSON values results carry: numpy scalars and arrays, paths."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def to_json(obj: Any, *, indent: int = 2, sort_keys: bool = False) -> str:
    return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=json_default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, to_json(obj, indent=indent, sort_keys=sort_keys))


# ---------------------------------------------------------------------------------------------
# metrics

def hits_at(rank, k: int) -> np.ndarray:
    """rank: the target's rank in the top-10 list (1..10; 0 = not retrieved). True where 0 < rank <= k."""
    rank = np.asarray(rank)
    return (rank >= 1) & (rank <= k)


def ndcg_at(rank, k: int) -> np.ndarray:
    """Per-user NDCG@k = 1 / log2(rank + 1) for a hit at rank <= k, else 0 (one relevant item, so the
    ideal DCG is 1)."""
    rank = np.asarray(rank)
    return np.where(hits_at(rank, k), 1.0 / np.log2(np.maximum(rank, 1) + 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# markdown

def markdown_table(header: Sequence, rows: Sequence[Sequence], floatfmt: str = "") -> str:
    """A GitHub markdown table; float cells are formatted with `floatfmt` (e.g. ".3f"), others with str()."""
    def cell(v):
        return f"{v:{floatfmt}}" if floatfmt and isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def frame_markdown(df, floatfmt: str = ".3f") -> str:
    """A pandas DataFrame as a markdown table, index included (pandas' to_markdown needs tabulate)."""
    df = df.reset_index()
    return markdown_table(list(df.columns), list(df.itertuples(index=False)), floatfmt)


def read_json(path: Path) -> dict:
    """A JSON file's content; a file that is not valid JSON raises a ValueError that names it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
