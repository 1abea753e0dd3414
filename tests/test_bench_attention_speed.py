"""The short-attention benchmark's smoke mode: it runs every implementation and pass on tiny shapes
(the kernels through the Triton interpreter on the CPU) and writes its JSON and markdown."""
import json
import os

if not os.environ.get("TRITON_INTERPRET") and not os.environ.get("GBLA_TEST_CUDA"):
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

pytest.importorskip("triton", reason="triton is not importable on this machine")

from gbla.bench import attention_speed  # noqa: E402


def test_smoke_writes_its_files(tmp_path):
    cases = ["encoder-L13", "cross-5x13"]  # a packed qkv and a packed kv
    argv = ["--smoke", "--cases", *cases, "--bwd-warps", "2", "--q-blocks", "16", "--out", str(tmp_path)]
    assert attention_speed.main(argv) == 0
    result = json.loads((tmp_path / "attention_speed.json").read_text())
    meta, rows = result["meta"], result["rows"]
    assert meta["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    from gbla.ops.attention.triton import DEFAULT_BWD_SCHEME

    assert meta["default_bwd_scheme"] == DEFAULT_BWD_SCHEME and meta["command"].startswith("python -m gbla.bench.attention_speed")
    assert {"commit", "date", "torch", "triton"} <= set(meta)
    impls = [i.name for i in attention_speed.implementations([2], [16])]
    assert impls == ["torch", "triton-per_row-unpacked", "triton-per_row-packed", "triton-rows-unpacked",
                     "triton-rows-packed", "triton-per_row-packed-w2", "triton-qtile16-packed"]
    assert [(r["case"], r["pass"], r["impl"]) for r in rows] == [
        (c, p, i) for c in cases for p in ("fwd", "fwd+bwd") for i in impls]
    assert all(r.get("error") is None and r["median_ms"] > 0 for r in rows), [r.get("error") for r in rows]
    md = (tmp_path / "attention_speed.md").read_text()
    assert f"({meta['device']})" in md.splitlines()[0]
    if meta["device"] == "cpu":
        assert "say nothing about GPU speed" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(rows) and len({line.count("|") for line in table}) == 1
