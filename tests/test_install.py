"""`make install` (its stamp follows the install settings; the offline path) and tools/wheelhouse.py
(what `make wheelhouse` downloads). pip itself is replaced by a stand-in that records its arguments."""
import importlib.util
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "tools" / "wheelhouse.py")
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


# --------------------------------------------------------------------------- make install

@pytest.fixture
def venv(tmp_path):
    """A venv whose python only logs what it is asked to do (one line per call)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "calls.log"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/bash\necho "$*" >> {log}\n')
    python.chmod(0o755)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    return venv, log


def make(venv, *args):
    out = subprocess.run(["make", "-C", str(ROOT), "install", f"VENV={venv}", *args], capture_output=True,
                         text=True, check=True)
    return out.stdout


def calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_install_reinstalls_when_the_torch_spec_changes_and_remembers_it(venv):
    venv, log = venv
    make(venv)
    assert calls(log)[0].startswith("-m pip install") and "torch==2.13.0" in calls(log)[0]
    assert '.[all]' in calls(log)[1] or "-e .[all]" in calls(log)[1]
    assert "Nothing to be done" in make(venv) and len(calls(log)) == 2
    make(venv, "TORCH_SPEC=torch==2.11.0", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128")
    assert "torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128" in calls(log)[2]
    assert len(calls(log)) == 4
    # later targets reuse the venv as installed, instead of putting the default torch back
    assert "Nothing to be done" in make(venv) and len(calls(log)) == 4
    assert "TORCH_SPEC ?= torch==2.11.0" in (venv / "install.mk").read_text()
    assert len(list(venv.glob(".installed-*"))) == 1
    make(venv, "EXTRAS=dev")
    assert calls(log)[-1].endswith("-e .[dev]") and "torch==2.11.0" in calls(log)[-2]


def test_install_from_a_wheelhouse_uses_no_index(venv, tmp_path):
    venv, log = venv
    wh = tmp_path / "wh"
    wh.mkdir()
    make(venv, f"WHEELHOUSE={wh}")
    (line,) = calls(log)          # no torch install: the system's torch is used
    assert line.startswith("-m pip install") and "--no-index" in line and f"--find-links {wh}" in line
    assert line.endswith("-e .[run]")
    assert "Nothing to be done" in make(venv)


def test_offline_install_refuses_a_venv_without_the_system_packages(venv, tmp_path):
    venv, log = venv
    (venv / "pyvenv.cfg").write_text("include-system-site-packages = false\n")
    (tmp_path / "wh").mkdir()
    out = subprocess.run(["make", "-C", str(ROOT), "install", f"VENV={venv}", f"WHEELHOUSE={tmp_path / 'wh'}"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "does not see" in out.stdout and not calls(log)


# --------------------------------------------------------------------------- tools/wheelhouse.py

def test_platform_tags_include_older_glibc_tags():
    tags = wheelhouse.platform_tags("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags
    assert wheelhouse.platform_tags("manylinux2014_aarch64")[0] == "manylinux_2_17_aarch64"
    assert "manylinux2010_aarch64" in wheelhouse.platform_tags("manylinux2014_aarch64")
    assert wheelhouse.platform_tags("win_amd64") == ["win_amd64"]
    env = wheelhouse.target_environment("3.12", "manylinux_2_28_aarch64")
    assert (env["python_version"], env["sys_platform"], env["platform_machine"]) == ("3.12", "linux", "aarch64")


def test_project_requirements_expand_the_run_extra():
    reqs, build = wheelhouse.project_requirements(ROOT / "pyproject.toml", ["run"])
    names = {wheelhouse.canonical(r.split(">")[0].split("[")[0].split(";")[0]) for r in reqs}
    assert {"torch", "numpy", "papermill", "nbclient", "nbconvert", "ipykernel", "dask"} <= names
    assert not names & {"jupyterlab", "polars", "sentence-transformers", "pytest"}
    assert build == tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    workbook, _ = wheelhouse.project_requirements(ROOT / "pyproject.toml", ["workbook"])
    assert set(reqs) < set(workbook)   # workbook = run + JupyterLab + Slurm (self-reference expanded)


def test_read_constraints(tmp_path):
    path = tmp_path / "freeze.txt"
    path.write_text("numpy==1.26.4\nJinja2==3.1.4  # comment\ntyping_extensions==4.12.2\n"
                    "torch @ file:///opt/wheels/torch.whl\n-e git+https://x#egg=y\n\n")
    pins, names = wheelhouse.read_constraints(path)
    assert pins == {"numpy": "1.26.4", "jinja2": "3.1.4", "typing-extensions": "4.12.2"}
    assert names == {"numpy", "jinja2", "typing-extensions", "torch"}


def _item(name, version, requires=()):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def test_select_leaves_out_skipped_packages_and_what_only_they_need():
    report = {"install": [
        _item("torch", "2.9", ["jinja2", "nvidia-cublas; platform_system == 'Linux'", "sympy"]),
        _item("Jinja2", "3.1", ["MarkupSafe>=2"]), _item("markupsafe", "3"), _item("sympy", "1.13"),
        _item("nvidia-cublas", "12"),
        _item("nbconvert", "7", ["jinja2>=3", "bleach[css]", "pywin32; sys_platform == 'win32'"]),
        _item("bleach", "6", ["webencodings", "tinycss2; extra == 'css'"]), _item("webencodings", "0.5"),
        _item("tinycss2", "1.4"),
        _item("dask", "2025", ["distributed==2025; extra == 'distributed'", "pandas; extra == 'dataframe'"]),
        _item("distributed", "2025", ["tornado"]), _item("tornado", "6.4"),
    ]}
    roots = ["torch>=2.5", "nbconvert>=7", "dask[distributed]>=2024"]
    env = wheelhouse.target_environment("3.12", "manylinux_2_28_x86_64")
    chosen = wheelhouse.select(report, roots, env, skip_patterns=["torch"])
    assert set(chosen["download"]) == {"nbconvert", "bleach", "webencodings", "tinycss2", "dask", "distributed",
                                       "tornado"}
    assert chosen["present"]["torch"] == "skipped"
    assert chosen["present"]["markupsafe"] == "dependency of torch"   # a machine with torch has jinja2
    assert "nvidia-cublas" in chosen["present"]
    # without a skip list everything resolved is downloaded; a freeze list counts as installed
    assert len(wheelhouse.select(report, roots, env)["download"]) == len(report["install"])
    frozen = wheelhouse.select(report, roots, env, installed_names=["tornado"])
    assert frozen["present"] == {"tornado": "installed on the target"}
    # an extra nobody asked for adds nothing: bleach without [css] does not need tinycss2
    plain = wheelhouse.select(report, ["bleach"], env)
    assert set(plain["download"]) == {"bleach", "webencodings"}


def test_requirements_of_the_target_python_that_the_report_lacks_are_named():
    """pip evaluates markers with the Python running it, so a Python 3.11 resolution for a 3.12 target
    lacks papermill's `aiohttp; python_version == "3.12"`: it is named, without its marker."""
    report = {"install": [_item("papermill", "2.6", ['aiohttp>=3.9; python_version == "3.12"',
                                                     'aiohttp>=3.9; python_version == "3.13"', "tqdm"]),
                          _item("tqdm", "4.66")]}
    env312 = wheelhouse.target_environment("3.12", "manylinux_2_28_x86_64")
    assert wheelhouse.dependency_edges(report, ["papermill"], env312)[2] == ["aiohttp>=3.9"]
    env311 = wheelhouse.target_environment("3.11", "manylinux_2_28_x86_64")
    assert wheelhouse.dependency_edges(report, ["papermill", "colorama; sys_platform == 'win32'"], env311)[2] == []
    assert wheelhouse.dependency_edges(report, ["papermill", "nbclient[dev]>=0.10"], env311)[2] == ["nbclient[dev]>=0.10"]
