"""A run's config hash is its name: results on disk are found (and skipped) by it. These hashes of the
existing `sa` and `hybrid` runs of the `full` profile are pinned, so that no change to params/ablations.yaml
or gbla/config.py silently renames (and so re-runs) finished results."""
from gbla import grid as G
from gbla import runs

PARAMS = runs.REPO_ROOT / "params" / "ablations.yaml"

PINNED = {
    ("beauty", "sa"): ["11d782f34597", "7f1003a9e8ec", "8d8a8cea08c5", "29a195f16908", "4b6a7d846e63"],
    ("beauty", "hybrid"): ["36560b0ade3d", "c8c08c63d6fd", "37fa702d384f", "4c59ddf8a98a", "27563249bc4a"],
    ("sports", "sa"): ["001e8b646b7a", "ab69548b03c0", "74c3b3f87c16", "b53ee9124fa9", "0f28330100ea"],
    ("sports", "hybrid"): ["d3de2a329829", "fe0fda46a08a", "56b047b7cf1e", "b6587b061758", "88271140b880"],
    ("toys", "sa"): ["d5072c100373", "05094f9069d4", "6f51502a3a2d", "930a73e0327f", "056da76f83e0"],
    ("toys", "hybrid"): ["eb4c1609dab7", "21f5cdfbf82e", "3c4a983d5e25", "07947d46b0dc", "4eceeb12d11e"],
}


def test_sa_and_hybrid_hashes_of_the_full_profile_are_unchanged():
    configs = G.load_grid(PARAMS, "full").expand(variants=["sa", "hybrid"])
    got = {}
    for c in configs:
        got.setdefault((c.dataset, c.variant), []).append((c.seed, c.config_hash()))
    assert {k: [h for _, h in sorted(v)] for k, v in got.items()} == PINNED
