"""Download the original 2014 Amazon files (McAuley et al., UCSD / SNAP) for users with internet:

    python -m gbla.data.download --dataset beauty --out outputs/raw
    python -m gbla.data.build --dataset beauty --raw --source-dir outputs/raw

Each file is streamed to a temporary name with a progress bar and renamed when complete; its sha256
is recorded in <out>/checksums.json. Files already present with the recorded checksum are skipped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import urllib.request
import uuid
from pathlib import Path

from gbla.data.amazon import DATASETS, check_dataset, raw_file_names, sha256_file
from gbla.common import REPO_ROOT, atomic_write_json

BASE_URL = "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
DEFAULT_OUT = REPO_ROOT / "outputs" / "raw"
CHECKSUMS = "checksums.json"


def download_file(url: str, dest: str | Path, *, progress: bool = True, chunk: int = 1 << 20,
                  timeout: float = 60) -> str:
    """Stream url to dest atomically (temporary name, then rename); returns the sha256 of the content."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=dest.name, disable=not progress) as bar:
                while block := response.read(chunk):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
        if total and tmp.stat().st_size != int(total):
            raise OSError(f"{url}: got {tmp.stat().st_size} bytes, the server announced {total}")
        tmp.replace(dest)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(f"download of {url} failed: {e}") from e
        raise
    return h.hexdigest()


def _read_checksums(out: Path) -> dict:
    path = out / CHECKSUMS
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_checksums(out: Path, sums: dict) -> None:
    atomic_write_json(out / CHECKSUMS, sums, sort_keys=True)


def download_dataset(dataset: str, out: str | Path = DEFAULT_OUT, *, base_url: str = BASE_URL,
                     force: bool = False, progress: bool = True, log=print) -> dict[str, str]:
    """Fetch reviews_<Category>_5.json.gz and meta_<Category>.json.gz into `out`; {file name: sha256}."""
    check_dataset(dataset)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sums = _read_checksums(out)
    got = {}
    for name in raw_file_names(dataset):
        dest = out / name
        if not force and dest.is_file() and sums.get(name) == sha256_file(dest):
            log(f"{dest}: present, checksum matches; skipping")
            got[name] = sums[name]
            continue
        url = base_url.rstrip("/") + "/" + name
        log(f"downloading {url}")
        got[name] = download_file(url, dest, progress=progress)
        sums[name] = got[name]
        _write_checksums(out, sums)
        log(f"{dest}: sha256 {got[name]}")
    return got


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gbla.data.download", description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help=f"download {', '.join(DATASETS)}")
    which.add_argument("--dataset", action="append", metavar="NAME")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="target folder (default outputs/raw)")
    p.add_argument("--base-url", default=BASE_URL, help="where the files live (default: the SNAP mirror)")
    p.add_argument("--force", action="store_true", help="download again even when present")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    names = list(DATASETS) if args.all else args.dataset
    for name in names:
        check_dataset(name)
    for name in names:
        download_dataset(name, args.out, base_url=args.base_url, force=args.force, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
