"""Parsers for both input formats (mirror, 2014 raw), 5-core filter, chronological order, bad input,
and the published counts on the real mirror."""
import gzip
import json
from pathlib import Path

import pytest

from gbla import common
from gbla.data import amazon
from gbla.data.amazon import DataFormatError
from gbla.data.processed import leave_one_out_split

# ---------------------------------------------------------------------------------------------
# small files written by the tests
# ---------------------------------------------------------------------------------------------


def write_mirror(root: Path, dataset="beauty", sequences=None, items=None) -> Path:
    folder = root / dataset
    folder.mkdir(parents=True, exist_ok=True)
    sequences = sequences if sequences is not None else ["u1 A B C D", "u2 C A E", "u3 E D B A"]
    items = items if items is not None else [
        {"asin": a, "title": f"Thing {a} &amp; more", "brand": "Acme" if a != "E" else None,
         "categories": [["Beauty", "Makeup"]], "price": None} for a in "ABCDE"]
    (folder / "sequences.txt").write_text("\n".join(sequences) + ("\n" if sequences else ""))
    (folder / "items.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in items))
    return folder


def write_gz_lines(path: Path, lines) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return path


def review(user, asin, time, **extra):
    return json.dumps({"reviewerID": user, "asin": asin, "unixReviewTime": time, "overall": 5.0, **extra})


def meta_line(asin, **fields):
    return repr({"asin": asin, **fields})           # Python dict literal, like the 2014 files


def core_reviews():
    """12 users x 7 items from a pool of 10 (every item >= 5 reviews), plus noise the 5-core must drop:
    user 'short' (2 reviews); item 'RARE' (2 reviews) whose removal leaves user 'edge' with 4."""
    lines = []
    for u in range(12):
        for j in range(7):
            lines.append(review(f"U{u:02d}", f"I{(u + j) % 10}", 1000 + 10 * j + u))
    lines += [review("short", "I0", 5), review("short", "I1", 6)]
    lines += [review("edge", a, 50 + k) for k, a in enumerate(["I0", "I1", "I2", "RARE", "I3"])]
    lines += [review("U00", "RARE", 2000)]
    return lines


def write_raw(root: Path, dataset="beauty", reviews=None, metas=None) -> Path:
    reviews_name, meta_name = amazon.raw_file_names(dataset)
    root.mkdir(parents=True, exist_ok=True)
    write_gz_lines(root / reviews_name, reviews if reviews is not None else core_reviews())
    if metas is None:
        metas = [meta_line(f"I{i}", title=f"Item {i}", categories=[["Beauty"]], price=1.5 + i) for i in range(10)]
        metas += [meta_line("RARE", title="rare"), meta_line("NOT_IN_CORE", title="x")]
    write_gz_lines(root / meta_name, metas)
    return root


# ---------------------------------------------------------------------------------------------
# format 1: mirror
# ---------------------------------------------------------------------------------------------


def test_mirror_parse_and_index(tmp_path):
    write_mirror(tmp_path)
    data = amazon.load_mirror("beauty", tmp_path)
    assert data.user_ids == ["u1", "u2", "u3"]
    assert data.sequences == [list("ABCD"), list("CAE"), list("EDBA")]
    asins, seqs = data.index()
    assert asins == list("ABCDE")                                     # order of first appearance
    assert seqs == [[0, 1, 2, 3], [2, 0, 4], [4, 3, 1, 0]]
    assert data.items["A"]["title"] == "Thing A &amp; more"          # kept raw; unescaped in the text
    assert data.items["E"]["brand"] is None
    assert set(data.source_files) == {"sequences.txt", "items.jsonl"}
    assert all(len(h) == 64 for h in data.source_files.values())


def test_mirror_drops_unused_items(tmp_path):
    items = [{"asin": a, "title": a} for a in "ABCDEZ"]
    write_mirror(tmp_path, items=items)
    assert set(amazon.load_mirror("beauty", tmp_path).items) == set("ABCDE")


def test_default_source_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GBLA_DATA_DIR", raising=False)
    assert amazon.default_source_dir() == (common.REPO_ROOT.parent / "shared" / "data" / "amazon").resolve()
    monkeypatch.setenv("GBLA_DATA_DIR", str(tmp_path))
    assert amazon.default_source_dir() == tmp_path


@pytest.mark.parametrize("items, line, field, message", [
    (['{"asin": "A", "title": "ok"}', '{"asin": "B", "title": broken}'], 2, None, "malformed JSON"),
    (['{"asin": "A"}', '{"title": "no asin"}'], 2, "asin", "missing"),
    (['{"asin": "A"}', '["not", "an", "object"]'], 2, None, "expected a JSON object"),
    (['{"asin": "A", "title": 7}'], 1, "title", "expected a string"),
    (['{"asin": "A", "categories": "Beauty"}'], 1, "categories", "category paths"),
    (['{"asin": "A"}', '{"asin": "A"}'], 2, "asin", "duplicate item"),
])
def test_mirror_bad_items(tmp_path, items, line, field, message):
    write_mirror(tmp_path, sequences=["u1 A A A"], items=items)
    with pytest.raises(DataFormatError, match=message) as err:
        amazon.load_mirror("beauty", tmp_path)
    assert err.value.path.endswith("items.jsonl") and err.value.line == line and err.value.field == field
    assert f"line {line}" in str(err.value) and "items.jsonl" in str(err.value)


def test_mirror_unknown_item_in_sequences(tmp_path):
    write_mirror(tmp_path, sequences=["u1 A B C", "u2 A B NOPE C"])
    with pytest.raises(DataFormatError, match="item 'NOPE' is not in") as err:
        amazon.load_mirror("beauty", tmp_path)
    assert err.value.path.endswith("sequences.txt") and err.value.line == 2 and err.value.field == "asin"


@pytest.mark.parametrize("sequences, line, field, message", [
    (["u1 A B C", "u1 C D E"], 2, "user", "also appears on line 1"),
    (["u1 A B C", "u2 A B"], 2, "items", "has 2 items"),
])
def test_mirror_bad_sequences(tmp_path, sequences, line, field, message):
    write_mirror(tmp_path, sequences=sequences)
    with pytest.raises(DataFormatError, match=message) as err:
        amazon.load_mirror("beauty", tmp_path)
    assert err.value.line == line and err.value.field == field


@pytest.mark.parametrize("which", ["sequences.txt", "items.jsonl"])
def test_mirror_empty_files(tmp_path, which):
    folder = write_mirror(tmp_path)
    (folder / which).write_text("\n  \n")
    with pytest.raises(DataFormatError, match="file is empty") as err:
        amazon.load_mirror("beauty", tmp_path)
    assert err.value.path.endswith(which)


def test_missing_folder_and_unknown_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="no mirror folder for dataset 'toys'"):
        amazon.load_mirror("toys", tmp_path)
    for call in (lambda: amazon.load_mirror("beuty", tmp_path), lambda: amazon.raw_file_names("movies"),
                 lambda: amazon.load_raw_dataset("Beauty")):
        with pytest.raises(ValueError, match="unknown dataset .* known datasets: beauty, sports, toys"):
            call()


# ---------------------------------------------------------------------------------------------
# format 2: the 2014 raw files
# ---------------------------------------------------------------------------------------------


def test_raw_file_names():
    assert amazon.raw_file_names("sports") == ("reviews_Sports_and_Outdoors_5.json.gz",
                                                "meta_Sports_and_Outdoors.json.gz")
    assert amazon.raw_file_names("toys") == ("reviews_Toys_and_Games_5.json.gz", "meta_Toys_and_Games.json.gz")


def test_five_core_is_iterative(tmp_path):
    reviews = amazon.read_raw_reviews(write_gz_lines(tmp_path / "r.json.gz", core_reviews()))
    core = amazon.five_core(reviews, 5)
    users, items = set(core["user"].to_list()), set(core["asin"].to_list())
    assert users == {f"U{u:02d}" for u in range(12)}                  # 'short' and (after RARE goes) 'edge' dropped
    assert items == {f"I{i}" for i in range(10)}
    assert core.height == 12 * 7
    # one pass is not enough: after dropping RARE and 'short', 'edge' has only 4 reviews left
    one_pass = reviews.filter((reviews["user"] != "short") & (reviews["asin"] != "RARE"))
    assert one_pass.filter(one_pass["user"] == "edge").height == 4


def test_raw_chronological_with_stable_ties(tmp_path):
    lines = [review("a", "X3", 30), review("b", "X1", 5), review("a", "X1", 10), review("a", "X2", 10),
             review("a", "X0", 1)]
    df = amazon.read_raw_reviews(write_gz_lines(tmp_path / "r.json.gz", lines))
    users, seqs = amazon.chronological_sequences(df)
    assert users == ["a", "b"]                                        # order of first appearance in the file
    assert seqs == [["X0", "X1", "X2", "X3"], ["X1"]]                 # X1 before X2: same time, file order


def test_load_raw_end_to_end(tmp_path):
    write_raw(tmp_path)
    data = amazon.load_raw("beauty", tmp_path)
    assert data.source_format == "raw" and len(data.user_ids) == 12
    assert sum(map(len, data.sequences)) == 84
    assert set(data.items) == {f"I{i}" for i in range(10)}            # meta of other items not kept
    assert data.items["I3"] == {"title": "Item 3", "brand": None, "categories": [["Beauty"]], "price": 4.5}
    assert data.sequences[0] == [f"I{j}" for j in range(7)]           # U00 in time order; RARE was filtered
    assert set(data.source_files) == set(amazon.raw_file_names("beauty"))
    train, valid, test = leave_one_out_split(data.index()[1])
    assert len(train) == 84 - 3 * 12 and len(test) == 12


@pytest.mark.parametrize("bad, line, field, message", [
    ('{"reviewerID": "U99", "asin": "I1", ', 3, None, "malformed JSON"),
    (json.dumps({"reviewerID": "U99", "asin": "I1"}), 3, "unixReviewTime", "missing"),
    (json.dumps({"asin": "I1", "unixReviewTime": 5}), 3, "reviewerID", "missing"),
    (json.dumps({"reviewerID": "U99", "asin": "I1", "unixReviewTime": "yesterday"}), 3, "unixReviewTime",
     "integer timestamp"),
])
def test_raw_bad_reviews(tmp_path, bad, line, field, message):
    lines = core_reviews()
    lines.insert(2, bad)
    write_raw(tmp_path, reviews=lines)
    with pytest.raises(DataFormatError, match=message) as err:
        amazon.load_raw("beauty", tmp_path)
    assert err.value.path.endswith("reviews_Beauty_5.json.gz") and err.value.line == line and err.value.field == field


@pytest.mark.parametrize("bad, field, message", [
    ("{'asin': 'I4', 'title': 'unterminated}", None, "malformed dict literal"),
    ("{'title': 'no asin here'}", "asin", "missing"),
    ("__import__('os').system('echo pwned')", None, "malformed dict literal"),   # never evaluated
    ("{'asin': 'I4', 'price': [1, 2]}", "price", "expected a number"),
])
def test_raw_bad_meta(tmp_path, bad, field, message):
    metas = [meta_line(f"I{i}", title=f"Item {i}") for i in range(10) if i != 4]
    metas.insert(3, bad)
    write_raw(tmp_path, metas=metas)
    with pytest.raises(DataFormatError, match=message) as err:
        amazon.load_raw("beauty", tmp_path)
    assert err.value.path.endswith("meta_Beauty.json.gz") and err.value.line == 4 and err.value.field == field


def test_raw_item_without_meta(tmp_path):
    write_raw(tmp_path, metas=[meta_line(f"I{i}", title="t") for i in range(10) if i != 7])
    with pytest.raises(DataFormatError, match="item 'I7' has no record in") as err:
        amazon.load_raw("beauty", tmp_path)
    assert err.value.path.endswith("reviews_Beauty_5.json.gz") and err.value.field == "asin"
    first_i7 = next(n for n, l in enumerate(core_reviews(), 1) if '"I7"' in l)
    assert err.value.line == first_i7


def test_raw_empty_corrupt_and_missing_files(tmp_path):
    write_raw(tmp_path, reviews=[])
    with pytest.raises(DataFormatError, match="reviews_Beauty_5.json.gz: file is empty"):
        amazon.load_raw("beauty", tmp_path)
    (tmp_path / "reviews_Beauty_5.json.gz").write_bytes(b"this is not gzip")
    with pytest.raises(DataFormatError, match="reviews_Beauty_5.json.gz: cannot read file"):
        amazon.load_raw("beauty", tmp_path)
    with pytest.raises(DataFormatError, match="reviews_Toys_and_Games_5.json.gz: file not found"):
        amazon.load_raw("toys", tmp_path)


def test_raw_everything_filtered_out(tmp_path):
    write_raw(tmp_path, reviews=[review("a", "X", 1), review("b", "X", 2)])
    with pytest.raises(DataFormatError, match="no interactions left after the 5-core filter"):
        amazon.load_raw("beauty", tmp_path)


# ---------------------------------------------------------------------------------------------
# the real mirror
# ---------------------------------------------------------------------------------------------

MIRROR = amazon.default_source_dir()


@pytest.mark.mirror
@pytest.mark.skipif(not (MIRROR / "beauty" / "sequences.txt").is_file(),
                    reason=f"offline Amazon mirror not found at {MIRROR} (set GBLA_DATA_DIR to use another path)")
@pytest.mark.parametrize("dataset", list(amazon.DATASETS))
def test_mirror_published_counts(dataset):
    data = amazon.load_mirror(dataset)
    asins, seqs = data.index()
    users, items, interactions = amazon.PUBLISHED_COUNTS[dataset]
    assert (len(seqs), len(asins), sum(map(len, seqs))) == (users, items, interactions)
    assert len(set(data.user_ids)) == users and set(data.items) == set(asins)
    train, valid, test = leave_one_out_split(seqs)
    assert len(test) == len(valid) == users and len(train) == interactions - 3 * users
