"""The backend-parity benchmark: settings parse (bad ones fail before any training), a run on the
synthetic smoke profile writes its JSON and markdown, and the check flags a setting that trains a
different model."""
import json

import pytest

from gbla.bench import backend_parity


def test_parse_setting():
    assert backend_parity.parse_setting("torch") == ("torch", {})
    # keys without a namespace are the short attention's (settings written before the conv had any)
    assert backend_parity.parse_setting("auto:bwd_scheme=rows,q_block=32") == (
        "auto", {"attention": {"bwd_scheme": "rows", "q_block": 32}})
    assert backend_parity.parse_setting("auto:conv.bwd_rows=8,attention.q_block=32") == (
        "auto", {"conv": {"bwd_rows": 8}, "attention": {"q_block": 32}})
    with pytest.raises(ValueError, match="backend must be"):
        backend_parity.parse_setting("cuda")
    with pytest.raises(ValueError, match="setting 'auto:quad'.*expected"):
        backend_parity.parse_setting("auto:quad")
    with pytest.raises(ValueError, match="unknown namespace 'norm'"):
        backend_parity.parse_setting("auto:norm.block=8")


def row(setting, losses, recalls):
    hist = lambda d: [{"epoch": e + 1, "train_loss": l + d, "valid_recall@10": r + d}  # noqa: E731
                      for e, (l, r) in enumerate(zip(losses, recalls))]
    return {"setting": setting, "wall_s": 1.0, "seeds": {"0": {"history": hist(0.0)}, "1": {"history": hist(0.002)}}}


def test_check_flags_a_setting_that_trains_worse():
    ref = row("torch", [3.5, 2.8, 2.5], [0.020, 0.035, 0.040])
    same = row("auto", [3.5, 2.8, 2.51], [0.021, 0.034, 0.039])
    worse = row("auto:x=1", [3.5, 3.0, 2.9], [0.015, 0.020, 0.022])
    checks = backend_parity.check([ref, same, worse], tolerance=0.10, loss_tolerance=0.02)
    assert [(c["setting"], c["epoch"], c["ok"]) for c in checks] == [("auto", 3, True), ("auto:x=1", 3, False)]
    assert checks[1]["valid_recall@10_rel"] == pytest.approx(0.023 / 0.041 - 1)


def test_smoke_run_writes_its_files(tmp_path):
    # the torch backend under both settings (the kernels through the interpreter take minutes per
    # epoch): the same seeds train the same model, so the check passes exactly
    argv = ["--profile-name", "smoke", "--dataset", "synthetic", "--variant", "sa", "--seeds", "0", "1",
            "--epochs", "2", "--settings", "torch", "torch:bwd_scheme=rows", "--device", "cpu",
            "--out", str(tmp_path)]
    assert backend_parity.main(argv) == 0
    result = json.loads((tmp_path / "backend_parity.json").read_text())
    assert result["meta"]["command"] == "python -m gbla.bench.backend_parity " + " ".join(argv)
    assert {"commit", "date", "device", "data_fingerprint", "config_hashes"} <= set(result["meta"])
    assert [r["setting"] for r in result["rows"]] == ["torch", "torch:bwd_scheme=rows"]
    assert all(len(s["history"]) == 2 for r in result["rows"] for s in r["seeds"].values())
    assert result["checks"][0]["ok"] and result["checks"][0]["valid_recall@10_rel"] == 0
    md = (tmp_path / "backend_parity.md").read_text()
    assert md.startswith("# Training on each kernel setting, side by side (cpu)") and "| 2 |" in md


def test_one_setting_is_a_usage_error():
    with pytest.raises(SystemExit):
        backend_parity.main(["--settings", "torch"])
