"""Amazon 2014 5-core Beauty / Sports_and_Outdoors / Toys_and_Games: parsing both input formats.

1. the offline mirror  <source_dir>/<dataset>/sequences.txt  (`USER ASIN1 ASIN2 ...`, chronological)
                       <source_dir>/<dataset>/items.jsonl    ({"asin","title","brand","categories","price"})
2. the 2014 release    reviews_<Category>_5.json.gz (JSON lines: reviewerID, asin, unixReviewTime, ...)
                       meta_<Category>.json.gz      (one Python dict literal per line; ast.literal_eval)

Both end in a RawDataset: user ids, per-user chronological ASIN sequences, item metadata, and the
sha256 of every source file. Item indices are assigned in order of first appearance (users in order,
items in time order), the P5 numbering; that is what the mirror's README cross-checks against.
"""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from gbla.common import REPO_ROOT

# dataset name -> category name of the 2014 release
DATASETS = {"beauty": "Beauty", "sports": "Sports_and_Outdoors", "toys": "Toys_and_Games"}
# (users, items, interactions) reported by P5 / TIGER for the 5-core files
PUBLISHED_COUNTS = {"beauty": (22363, 12101, 198502), "sports": (35598, 18357, 296337),
                    "toys": (19412, 11924, 167597)}
META_FIELDS = ("title", "brand", "categories", "price")
REVIEW_FIELDS = ("reviewerID", "asin", "unixReviewTime")


class DataFormatError(ValueError):
    """Bad input, located: file, 1-based line number (when it applies) and field (when it applies)."""

    def __init__(self, path, message: str, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f", line {line}" if line is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


def check_dataset(name: str) -> str:
    """The 2014 category name of a dataset name; a clear error for unknown names."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def default_source_dir() -> Path:
    """The offline mirror: env GBLA_DATA_DIR, else ../shared/data/amazon relative to the repo root."""
    env = os.environ.get("GBLA_DATA_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data" / "amazon").resolve()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class RawDataset:
    """A dataset after parsing and (for raw reviews) 5-core filtering, before indexing and splitting."""
    name: str
    user_ids: list[str]
    sequences: list[list[str]]          # per user, ASINs in chronological order
    items: dict[str, dict]              # asin -> {"title","brand","categories","price"} (None = absent)
    source_format: str                  # "mirror" | "raw"
    source_files: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def index(self) -> tuple[list[str], list[list[int]]]:
        """Item ASINs in order of first appearance, and the sequences as item indices."""
        item_index: dict[str, int] = {}
        seqs = [[item_index.setdefault(a, len(item_index)) for a in seq] for seq in self.sequences]
        return list(item_index), seqs


# ---------------------------------------------------------------------------------------------
# helpers shared by both formats
# ---------------------------------------------------------------------------------------------

def _open_text(path: Path):
    """Text lines of a plain or gzip file; a missing file is a located error."""
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: Path):
    """(line number, stripped line) for non-blank lines; empty files and broken gzip are located errors."""
    seen = False
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if line:
                    seen = True
                    yield number, line
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataFormatError(path, f"cannot read file ({type(e).__name__}: {e})") from e
    if not seen:
        raise DataFormatError(path, "file is empty")


def _clean_meta(record: dict, path: Path, line: int) -> dict:
    """Keep title/brand/categories/price, checking their types; absent or empty -> None."""
    out = {}
    for key in ("title", "brand"):
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise DataFormatError(path, f"expected a string or null, got {type(value).__name__}", line, key)
        out[key] = value if value else None
    cats = record.get("categories")
    if cats is not None:
        if not (isinstance(cats, list) and all(isinstance(p, list) and all(isinstance(c, str) for c in p)
                                               for p in cats)):
            raise DataFormatError(path, "expected a list of category paths (lists of strings) or null",
                                  line, "categories")
    out["categories"] = cats if cats else None
    price = record.get("price")
    if price is not None and (isinstance(price, bool) or not isinstance(price, (int, float, str))):
        raise DataFormatError(path, f"expected a number or null, got {type(price).__name__}", line, "price")
    out["price"] = price
    return out


def _check_sequence_items(sequences, user_lines, items, seq_path: Path, items_path: Path) -> None:
    for seq, line in zip(sequences, user_lines):
        for asin in seq:
            if asin not in items:
                raise DataFormatError(seq_path, f"item {asin!r} is not in {items_path}", line, "asin")


# ---------------------------------------------------------------------------------------------
# format 1: the offline mirror
# ---------------------------------------------------------------------------------------------

def read_mirror_sequences(path: str | os.PathLike, min_length: int = 3
                          ) -> tuple[list[str], list[list[str]], list[int]]:
    """sequences.txt -> (user ids, ASIN sequences, line numbers). Each user needs >= min_length items."""
    path = Path(path)
    user_ids, sequences, line_numbers, seen = [], [], [], {}
    for number, line in _lines(path):
        user, *asins = line.split()
        if user in seen:
            raise DataFormatError(path, f"user {user!r} also appears on line {seen[user]}", number, "user")
        if len(asins) < min_length:
            raise DataFormatError(path, f"user {user!r} has {len(asins)} items, the leave-one-out split needs "
                                        f"at least {min_length}", number, "items")
        seen[user] = number
        user_ids.append(user)
        sequences.append(asins)
        line_numbers.append(number)
    return user_ids, sequences, line_numbers


def read_mirror_items(path: str | os.PathLike) -> dict[str, dict]:
    """items.jsonl -> {asin: metadata}."""
    path = Path(path)
    items: dict[str, dict] = {}
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"malformed JSON ({e.msg} at column {e.colno})", number) from None
        if not isinstance(record, dict):
            raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}", number)
        asin = record.get("asin")
        if not isinstance(asin, str) or not asin:
            raise DataFormatError(path, "missing or empty (every item needs its ASIN)", number, "asin")
        if asin in items:
            raise DataFormatError(path, f"duplicate item {asin!r}", number, "asin")
        items[asin] = _clean_meta(record, path, number)
    return items


def load_mirror(dataset: str, source_dir: str | os.PathLike | None = None) -> RawDataset:
    check_dataset(dataset)
    folder = Path(source_dir) if source_dir is not None else default_source_dir()
    folder = folder / dataset
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no mirror folder for dataset {dataset!r} (expected sequences.txt "
                                f"and items.jsonl there; set --source-dir or GBLA_DATA_DIR)")
    seq_path, items_path = folder / "sequences.txt", folder / "items.jsonl"
    user_ids, sequences, lines = read_mirror_sequences(seq_path)
    items = read_mirror_items(items_path)
    _check_sequence_items(sequences, lines, items, seq_path, items_path)
    used = {a for s in sequences for a in s}
    return RawDataset(name=dataset, user_ids=user_ids, sequences=sequences,
                      items={a: m for a, m in items.items() if a in used}, source_format="mirror",
                      source_files={p.name: sha256_file(p) for p in (seq_path, items_path)})


# ---------------------------------------------------------------------------------------------
# format 2: the original 2014 release
# ---------------------------------------------------------------------------------------------

def raw_file_names(dataset: str) -> tuple[str, str]:
    category = check_dataset(dataset)
    return f"reviews_{category}_5.json.gz", f"meta_{category}.json.gz"


def read_raw_reviews(path: str | os.PathLike):
    """reviews_<Category>_5.json.gz -> polars DataFrame (user, asin, time, line) in file order."""
    import polars as pl

    path = Path(path)
    users, asins, times, numbers = [], [], [], []
    for number, line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"malformed JSON ({e.msg} at column {e.colno})", number) from None
        if not isinstance(record, dict):
            raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}", number)
        for key in REVIEW_FIELDS:
            if key not in record or record[key] in (None, ""):
                raise DataFormatError(path, "missing", number, key)
        t = record["unixReviewTime"]
        if isinstance(t, bool) or not isinstance(t, int):
            raise DataFormatError(path, f"expected an integer timestamp, got {t!r}", number, "unixReviewTime")
        users.append(str(record["reviewerID"]))
        asins.append(str(record["asin"]))
        times.append(t)
        numbers.append(number)
    return pl.DataFrame({"user": users, "asin": asins, "time": times, "line": numbers},
                        schema={"user": pl.Utf8, "asin": pl.Utf8, "time": pl.Int64, "line": pl.Int64})


_ASIN_RE = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def read_raw_meta(path: str | os.PathLike, wanted: set[str] | None = None) -> dict[str, dict]:
    """meta_<Category>.json.gz (Python dict literals, parsed with ast.literal_eval) -> {asin: metadata}.

    The metadata files cover every item of the category (~10x the 5-core items); with `wanted`, lines
    whose ASIN is visibly not wanted are skipped without being parsed, which is what keeps this fast."""
    path = Path(path)
    items: dict[str, dict] = {}
    for number, line in _lines(path):
        if wanted is not None:
            m = _ASIN_RE.search(line)
            if m and m.group(1) not in wanted:
                continue
        try:
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
            raise DataFormatError(path, f"malformed dict literal ({type(e).__name__}: {e})", number) from None
        if not isinstance(record, dict):
            raise DataFormatError(path, f"expected a dict literal, got {type(record).__name__}", number)
        asin = record.get("asin")
        if not isinstance(asin, str) or not asin:
            raise DataFormatError(path, "missing or empty (every item needs its ASIN)", number, "asin")
        if wanted is not None and asin not in wanted:
            continue
        items[asin] = _clean_meta(record, path, number)
    return items


def five_core(reviews, k: int = 5):
    """Iteratively drop users and items with fewer than k interactions until none is left."""
    import polars as pl

    while True:
        before = reviews.height
        reviews = reviews.filter((pl.len().over("user") >= k) & (pl.len().over("asin") >= k))
        if reviews.height == before:
            return reviews


def chronological_sequences(reviews) -> tuple[list[str], list[list[str]]]:
    """Per-user ASIN sequences ordered by time (ties: file order); users in order of first appearance."""
    import polars as pl

    ordered = reviews.sort(["time", "line"])
    grouped = (ordered.group_by("user", maintain_order=False)
               .agg(pl.col("asin"), pl.col("line").min().alias("first_line"))
               .sort("first_line"))
    return grouped["user"].to_list(), grouped["asin"].to_list()


def load_raw(dataset: str, raw_dir: str | os.PathLike, k_core: int = 5) -> RawDataset:
    reviews_name, meta_name = raw_file_names(dataset)
    raw_dir = Path(raw_dir)
    reviews_path, meta_path = raw_dir / reviews_name, raw_dir / meta_name
    reviews = five_core(read_raw_reviews(reviews_path), k_core)
    if reviews.height == 0:
        raise DataFormatError(reviews_path, f"no interactions left after the {k_core}-core filter")
    user_ids, sequences = chronological_sequences(reviews)
    wanted = set(reviews["asin"].unique().to_list())
    items = read_raw_meta(meta_path, wanted)
    missing = sorted(wanted - items.keys())
    if missing:
        first = reviews.filter(reviews["asin"] == missing[0])["line"].min()
        raise DataFormatError(reviews_path, f"item {missing[0]!r} has no record in {meta_path} "
                                            f"({len(missing)} such items)", int(first), "asin")
    return RawDataset(name=dataset, user_ids=user_ids, sequences=sequences, items=items, source_format="raw",
                      source_files={p.name: sha256_file(p) for p in (reviews_path, meta_path)})


def load_raw_dataset(dataset: str, *, source_dir=None, raw: bool = False, k_core: int = 5) -> RawDataset:
    """One entry point for both formats (raw=True: the 2014 files in source_dir)."""
    check_dataset(dataset)
    if raw:
        if source_dir is None:
            raise ValueError("raw=True needs source_dir: the folder holding the downloaded 2014 files")
        return load_raw(dataset, source_dir, k_core)
    return load_mirror(dataset, source_dir)
