"""Download the wheels an offline machine needs to run the grid (`make wheelhouse`).

    python tools/wheelhouse.py --dest wheelhouse --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --skip "torch numpy pandas" [--constraints target-freeze.txt] [--extras run]

1. Resolve this project's requirements (its dependencies plus the chosen extras of pyproject.toml) for
   the target interpreter and platform: `pip install --dry-run --ignore-installed --report`, binary wheels
   only, nothing installed.
2. Leave out what the target already has: every resolved package matching a --skip name (fnmatch
   patterns, e.g. "nvidia-*") or listed in the --constraints file, *and everything those depend on* (a
   machine with torch installed has torch's dependencies too). A constraints file (the target's
   `pip list --format=freeze`) also pins the resolution to the target's versions, so the wheels fit
   exactly what is installed there; a skip list alone assumes the target's versions are recent enough.
3. `pip download --no-deps` each remaining pin for the target, plus the build backend of
   pyproject.toml (an editable install builds this project offline).

The folder then holds the wheels, requirements.txt (the pins) and wheelhouse.json (target, what was
left out and why, sizes). On the target:
    pip install --no-index --find-links <dest> -e ".[run]"
Only the standard library and pip are used (pip >= 22.2, for --report), so this runs with any Python.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from packaging.markers import Marker, default_environment
    from packaging.requirements import Requirement
except ImportError:  # pragma: no cover - pip always carries a copy
    from pip._vendor.packaging.markers import Marker, default_environment
    from pip._vendor.packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # pragma: no cover - Python < 3.11
    from pip._vendor import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "wheelhouse.json"


def canonical(name: str) -> str:
    """PEP 503 normalised project name: 'Jinja2' and 'jinja2', 'typing_extensions' and 'typing-extensions'."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------------------- the target

def platform_tags(platform: str) -> list[str]:
    """--platform values for one target tag. pip matches a --platform tag exactly, so a
    manylinux_2_X machine gets every older glibc tag too (manylinux_2_X ... manylinux_2_17, the legacy
    manylinux2014 / manylinux2010 / manylinux1 aliases): many wheels are tagged only with an old one."""
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    legacy = re.fullmatch(r"manylinux(2014|2010|1)_(\w+)", platform)
    if legacy:
        glibc = {"2014": 17, "2010": 12, "1": 5}[legacy.group(1)]
        m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", f"manylinux_2_{glibc}_{legacy.group(2)}")
    if not m or int(m.group(1)) != 2:
        return [platform]
    minor, arch = int(m.group(2)), m.group(3)
    tags = [f"manylinux_2_{y}_{arch}" for y in range(minor, 4, -1)]
    aliases = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{aliases[y]}_{arch}" for y in (17, 12, 5) if y <= minor]
    return tags


def target_environment(python_version: str | None, platform: str | None) -> dict:
    """PEP 508 marker environment of the target (the local one where a field is not given)."""
    env = dict(default_environment())
    if python_version:
        parts = python_version.split(".")
        env["python_version"] = ".".join(parts[:2])
        env["python_full_version"] = ".".join((parts + ["0", "0"])[:3])
        env["implementation_name"] = "cpython"
        env["platform_python_implementation"] = "CPython"
    if platform:
        if platform.startswith(("manylinux", "musllinux", "linux")):
            arch = re.sub(r"^(manylinux|musllinux)(_\d+_\d+|2014|2010|1)?_|^linux_", "", platform)
            env.update(sys_platform="linux", platform_system="Linux", os_name="posix", platform_machine=arch)
        elif platform.startswith("win"):
            env.update(sys_platform="win32", platform_system="Windows", os_name="nt",
                       platform_machine={"win_amd64": "AMD64", "win_arm64": "ARM64", "win32": "x86"}.get(platform, platform))
        elif platform.startswith("macosx"):
            env.update(sys_platform="darwin", platform_system="Darwin", os_name="posix",
                       platform_machine=platform.rsplit("_", 1)[-1])
    return env


def target_args(python_version: str | None, platform: str | None, implementation: str = "cp") -> list[str]:
    """pip options selecting wheels for the target; none at all means the local interpreter."""
    args = ["--only-binary=:all:"]
    for tag in platform_tags(platform) if platform else []:
        args += ["--platform", tag]
    if python_version:
        args += ["--python-version", python_version, "--implementation", implementation]
    return args


# ----------------------------------------------------------------------------------------- requirements

def project_requirements(pyproject: Path, extras: list[str]) -> tuple[list[str], list[str]]:
    """(requirements of the project with `extras`, the build-system requirements).

    Extras that name the project itself ("gbla-workbench[data,workbook]") are expanded in place."""
    doc = tomllib.loads(Path(pyproject).read_text())
    project = doc["project"]
    name = canonical(project["name"])
    optional = project.get("optional-dependencies", {})
    out, seen = list(project.get("dependencies", [])), set()

    def add(extra):
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"{pyproject}: no optional dependency group {extra!r}; defined: {', '.join(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            r = Requirement(req)
            if canonical(r.name) == name:
                for e in sorted(r.extras):
                    add(e)
            else:
                out.append(req)

    for e in extras:
        add(e)
    return list(dict.fromkeys(out)), list(doc.get("build-system", {}).get("requires", []))


def read_constraints(path: Path) -> tuple[dict[str, str], set[str]]:
    """A `pip freeze` / `pip list --format=freeze` file: ({name: version} of the `name==version` lines,
    every name listed). Lines pip cannot take as constraints (`name @ file:///...`, `-e ...`) still
    say that the package is installed."""
    pins, names = {}, set()
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
            names.add(canonical(m.group(1)))
            continue
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if m:
            names.add(canonical(m.group(1)))
    return pins, names


# ----------------------------------------------------------------------------------------- selection

def without_marker(req: Requirement) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def dependency_edges(report: dict, roots: list[str], env: dict) -> tuple[dict[str, set[str]], set[str], list[str]]:
    """From a pip installation report: {package: packages it needs on the target}, the root packages,
    and the requirements the target needs that the report lacks (as strings without markers).

    Markers are evaluated in the target's environment, with the extras each package is asked for
    (by the roots or by the packages that need it); edges point only at resolved packages. pip
    evaluates markers with the interpreter that runs it, even under --python-version, so a dependency
    only a newer Python needs (`aiohttp; python_version == "3.12"`) is missing from its report."""
    items = {canonical(i["metadata"]["name"]): i for i in report["install"]}
    requires = {n: [Requirement(r) for r in i["metadata"].get("requires_dist") or []] for n, i in items.items()}
    wanted_extras: dict[str, set[str]] = {n: set() for n in items}
    root_names, missing = set(), []
    for req in map(Requirement, roots):
        n = canonical(req.name)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        if n not in items:
            missing.append(without_marker(req))
            continue
        root_names.add(n)
        wanted_extras[n] |= set(req.extras)
    edges: dict[str, set[str]] = {n: set() for n in items}
    todo = list(root_names)  # walk from the roots: only extras that reached packages ask for count
    while todo:
        n = todo.pop()
        for req in requires[n]:
            dep = canonical(req.name)
            if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e})
                                                  for e in {""} | wanted_extras[n]):
                continue
            if dep not in items:
                missing.append(without_marker(req))
                continue
            new_extras = set(req.extras) - wanted_extras[dep]
            if dep not in edges[n] or new_extras:
                edges[n].add(dep)
                wanted_extras[dep] |= new_extras
                todo.append(dep)
    return edges, root_names, list(dict.fromkeys(missing))


def closure(start, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(edges.get(n, ()))
    return seen


def select(report: dict, roots: list[str], env: dict, skip_patterns=(), installed_names=()) -> dict:
    """Split the resolved packages into what to download and what the target already has.

    Returns {"download": {name: version}, "present": {name: why}}: a package is present when it
    matches a skip pattern, is listed as installed, or is a dependency of such a package."""
    versions = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    edges, root_names, _ = dependency_edges(report, roots, env)
    patterns = [canonical(p) for p in skip_patterns]
    installed = {canonical(n) for n in installed_names}
    direct = {n for n in versions if n in installed or any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    present = {}
    for n in sorted(direct):
        present[n] = "installed on the target" if n in installed else "skipped"
    for n in sorted(closure(direct, edges) - direct):
        parents = sorted(p for p in direct if n in closure([p], edges))
        present[n] = f"dependency of {', '.join(parents[:3])}{' ...' if len(parents) > 3 else ''}"
    needed = closure(root_names, edges)
    return {"download": {n: versions[n] for n in sorted(needed) if n not in present}, "present": present}


# ----------------------------------------------------------------------------------------- pip

def pip_version(pip: list[str]) -> tuple[int, ...]:
    out = subprocess.run(pip + ["--version"], check=True, capture_output=True, text=True).stdout
    return tuple(int(x) for x in re.match(r"pip (\d+)\.(\d+)", out).groups())


def find_pip(python_version: str | None, log=print) -> list[str]:
    """pip of a Python of the target's version where one is on PATH (`python3.12`), else this one's.

    pip checks Requires-Python and evaluates dependency markers with the interpreter that runs it,
    even under --python-version: from another Python, versions that need the target's (a numpy
    newer than this Python supports, pinned by the target's freeze list) cannot be resolved."""
    local = f"{sys.version_info[0]}.{sys.version_info[1]}"
    wanted = ".".join((python_version or local).split(".")[:2])
    if wanted != local:
        candidate = [f"python{wanted}", "-m", "pip"]
        try:
            if subprocess.run(candidate + ["--version"], capture_output=True).returncode == 0:
                return candidate
        except OSError:
            pass
        log(f"note: no working python{wanted} on PATH; pip runs under Python {local}, so Requires-Python "
            f"and markers are judged for {local} (what {wanted} needs in addition is added). "
            f"--pip 'PATH/TO/python{wanted} -m pip' (make: WHEELHOUSE_PIP=...) resolves exactly.")
    return [sys.executable, "-m", "pip"]


def resolve(pip: list[str], requirements: list[str], targeting: list[str], constraints: dict[str, str],
            workdir: Path) -> dict:
    """pip's installation report for `requirements` on the target (nothing is installed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / "report.json"
    cmd = pip + ["install", "--dry-run", "--ignore-installed", "--quiet", "--disable-pip-version-check",
                 "--report", str(report), "--target", str(workdir / "target"), *targeting]
    if constraints:
        cfile = workdir / "constraints.txt"
        cfile.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
        cmd += ["--constraint", str(cfile)]
    subprocess.run(cmd + requirements, check=True)
    return json.loads(report.read_text())


def download(pip: list[str], pins: list[str], targeting: list[str], dest: Path) -> None:
    if pins:
        subprocess.run(pip + ["download", "--no-deps", "--quiet", "--disable-pip-version-check", "--dest",
                              str(dest), *targeting] + pins, check=True)


def wheel_name(filename: str) -> str:
    return canonical(filename.split("-", 1)[0])


def build(dest: Path, *, extras: list[str], python_version: str | None, platform: str | None,
          implementation: str = "cp", skip=(), constraints_file: Path | None = None,
          pyproject: Path = REPO_ROOT / "pyproject.toml", pip: list[str] | None = None, log=print) -> dict:
    pip = pip or find_pip(python_version, log)
    if pip_version(pip) < (22, 2):
        raise SystemExit(f"{' '.join(pip)} is older than 22.2 (needs --report); upgrade pip or pass --pip")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    requirements, build_requires = project_requirements(pyproject, extras)
    pins, installed = read_constraints(constraints_file) if constraints_file else ({}, set())
    targeting = target_args(python_version, platform, implementation)
    env = target_environment(python_version, platform)
    target = f"Python {python_version or env['python_full_version'] + ' (local)'} on {platform or 'the local platform'}"
    log(f"resolving {len(requirements)} requirements for {target} ...")
    with tempfile.TemporaryDirectory() as tmp:
        roots = list(requirements)
        for attempt in range(10):  # add what the target's markers ask for and pip's did not, until complete
            report = resolve(pip, roots, targeting, pins, Path(tmp) / str(attempt))
            missing = dependency_edges(report, roots, env)[2]
            if not missing:
                break
            log(f"  the target also needs {', '.join(missing)}; resolving again")
            roots += missing
        else:
            raise SystemExit(f"the resolution for {target} still lacks {missing}")
        chosen = select(report, roots, env, skip, installed)
        # the build backend is installed into an isolated build environment, never from the target's
        # own packages, so it is always downloaded (and resolved without the target's pins)
        build_report = resolve(pip, build_requires, targeting, {}, Path(tmp) / "build") if build_requires else {"install": []}
    wanted = dict(chosen["download"])
    for item in build_report["install"]:
        wanted[canonical(item["metadata"]["name"])] = item["metadata"]["version"]
    previous = json.loads((dest / MANIFEST).read_text()).get("files", {}) if (dest / MANIFEST).is_file() else {}
    for old in previous:  # wheels of an earlier build that this one does not want
        if (dest / old).is_file() and wheel_name(old) not in wanted:
            (dest / old).unlink()
    log(f"downloading {len(wanted)} wheels into {dest} ({len(chosen['present'])} resolved packages left out) ...")
    download(pip, [f"{n}=={v}" for n, v in sorted(wanted.items())], targeting, dest)
    files = {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl")) if wheel_name(p.name) in wanted}
    got = {wheel_name(f) for f in files}
    if got != set(wanted):
        raise SystemExit(f"pip download did not deliver wheels for {sorted(set(wanted) - got)}")
    (dest / "requirements.txt").write_text("".join(f"{n}=={v}\n" for n, v in sorted(wanted.items())))
    manifest = {
        "target": {"python_version": python_version, "platform": platform, "implementation": implementation,
                   "platform_tags": platform_tags(platform) if platform else None},
        "extras": extras, "requirements": roots, "build_requires": build_requires,
        "skip": list(skip), "constraints_file": str(constraints_file) if constraints_file else None,
        "left_out": chosen["present"], "wheels": wanted, "files": files,
        "total_bytes": sum(files.values()),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"{len(files)} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB in {dest}")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default="wheelhouse", help="folder for the wheels (default: wheelhouse)")
    ap.add_argument("--extras", default="run", help="comma-separated extras of pyproject.toml (default: run)")
    ap.add_argument("--python-version", default="", help="target Python, e.g. 3.12 (default: this one)")
    ap.add_argument("--platform", default="", help="target platform tag, e.g. manylinux_2_28_x86_64 (default: this one)")
    ap.add_argument("--implementation", default="cp")
    ap.add_argument("--skip", default="", help="space-separated names (fnmatch patterns) the target already has; "
                                               "their dependencies are left out too")
    ap.add_argument("--constraints", default="", help="the target's `pip list --format=freeze`: pins the "
                                                      "resolution to its versions and leaves its packages out")
    ap.add_argument("--pip", default="", help="pip command (default: this Python's pip)")
    args = ap.parse_args(argv)
    build(Path(args.dest), extras=[e for e in args.extras.split(",") if e], python_version=args.python_version or None,
          platform=args.platform or None, implementation=args.implementation, skip=args.skip.split(),
          constraints_file=Path(args.constraints) if args.constraints else None,
          pip=shlex.split(args.pip) if args.pip else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
