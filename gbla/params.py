"""The ablation grid as data: params/*.yaml -> Grid -> RunConfigs. Pure: no Dask, no papermill.

    grid = load_grid("params/ablations.yaml", "full")
    configs = grid.expand()                      # every (dataset, variant, seed) of the profile
    config = grid.run_config("beauty", "hybrid", 0)

Errors name the file, the line and the key. gbla/grid.py executes what this module describes;
notebooks and gbla/runs.py import only this.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from gbla.common import REPO_ROOT
from gbla.config import LAYER_TYPES, GBLAOptions, ModelConfig, RunConfig, TrainConfig
from gbla.data.amazon import DATASETS as AMAZON_DATASETS

DEFAULT_PARAMS = REPO_ROOT / "params" / "ablations.yaml"

TOP_LEVEL_KEYS = {"datasets", "seeds", "model", "train", "variants", "synthetic", "runtime", "dask", "profiles"}
PROFILE_KEYS = {"description", "datasets", "seeds", "variants", "model", "train", "synthetic", "runtime", "dask",
                "compares_with"}
VARIANT_KEYS = {"name", "description", "encoder_layout", "gbla", "model"}
RUNTIME_DEFAULTS: dict[str, Any] = {
    "device": "auto", "backend": "auto", "step_mode": "auto", "processed_root": None, "runs_root": "outputs/runs",
    "reports_root": "outputs/reports", "cell_timeout_s": None, "reports": ["notebooks/aggregate.ipynb"]}
DASK_DEFAULTS: dict[str, Any] = {
    "cluster": "local", "gpus": "auto", "runs_per_gpu": 2, "cpu_workers": 1, "runs_per_cpu_worker": 2,
    "slurm": {}}
CLUSTERS = ("local", "slurm")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # names become folder names
SYNTHETIC = "synthetic"
# what `make data` can build, plus the generated dataset: a typo must not send the user to `make data`
KNOWN_DATASETS = (*AMAZON_DATASETS, SYNTHETIC)


def check_dataset_names(names: Iterable[str]) -> None:
    unknown = [d for d in names if d not in KNOWN_DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"known datasets: {', '.join(KNOWN_DATASETS)}")


# ---------------------------------------------------------------------------------------------
# parsing params/*.yaml, with errors that name the file, the line and the key

class ParamsError(ValueError):
    """A bad entry in a params file; the message names the file, line and key."""


def _fmt_path(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


class _Source:
    """The parsed YAML plus the line of every key, to point errors at the right place."""

    def __init__(self, path: Path):
        self.path = path
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ParamsError(f"{path}: params file not found") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML: {e}") from None
        self.lines: dict[tuple, int] = {}
        if root is not None:
            self._index(root, ())
        if not isinstance(self.data, dict):
            raise ParamsError(f"{path}: expected a mapping at the top level, got {type(self.data).__name__}")

    def _index(self, node, path: tuple) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                k = key.value
                if k in seen:  # PyYAML would silently keep the last one
                    raise ParamsError(f"{self.path}:{key.start_mark.line + 1}: {_fmt_path(path + (k,))}: "
                                      f"duplicate key (first at line {seen[k]})")
                seen[k] = key.start_mark.line + 1
                self.lines[path + (k,)] = key.start_mark.line + 1
                self._index(value, path + (k,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,))

    def error(self, path: Sequence[Any], message: str) -> ParamsError:
        path = tuple(path)
        line = None
        for n in range(len(path), -1, -1):  # the deepest part of the path that exists in the file
            line = self.lines.get(path[:n])
            if line is not None:
                break
        where = f"{self.path}:{line}" if line else str(self.path)
        return ParamsError(f"{where}: {_fmt_path(path)}: {message}")


def _type_ok(value: Any, type_name: str) -> Any:
    """Check (and for numbers, lightly coerce) a value against a dataclass field's annotation."""
    optional = type_name.endswith("| None")
    base = type_name.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise TypeError(f"must be {base}, got null")
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "str":
        if isinstance(value, str):
            return value
    elif base.startswith("tuple"):
        if isinstance(value, list):
            return tuple(value)
    else:
        return value
    raise TypeError(f"must be {base}{' or null' if optional else ''}, got {type(value).__name__} {value!r}")


def _check_fields(src: _Source, path: tuple, mapping: Any, cls, exclude: Iterable[str] = (),
                  what: str = "option") -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise src.error(path, f"expected a mapping, got {type(mapping).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in set(exclude)}
    out = {}
    for key, value in mapping.items():
        if key not in fields:
            hint = " (set it per variant)" if key in exclude else ""
            raise src.error(path + (key,), f"unknown {what} {key!r}{hint}; known: {', '.join(sorted(fields))}")
        try:
            out[key] = _type_ok(value, str(fields[key].type))
        except TypeError as e:
            raise src.error(path + (key,), str(e)) from None
    return out


def _name_list(src: _Source, path: tuple, value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise src.error(path, f"expected a non-empty list of {what} names")
    for i, name in enumerate(value):
        if not isinstance(name, str) or not SAFE_NAME.match(name):
            raise src.error(path + (i,), f"{what} name must be a string of letters, digits, '.', '_', '-', "
                                         f"got {name!r}")
    if len(set(value)) != len(value):
        raise src.error(path, f"duplicate {what} names in {value}")
    return list(value)


def _dataset_list(src: _Source, path: tuple, value: Any) -> list[str]:
    names = _name_list(src, path, value, "dataset")
    for i, name in enumerate(names):
        try:
            check_dataset_names([name])
        except ValueError as e:
            raise src.error(path + (i,), str(e)) from None
    return names


def _seed_list(src: _Source, path: tuple, value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise src.error(path, "expected a non-empty list of integer seeds")
    for i, s in enumerate(value):
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise src.error(path + (i,), f"seed must be a non-negative integer, got {s!r}")
    if len(set(value)) != len(value):
        raise src.error(path, f"duplicate seeds in {value}")
    return list(value)


def _known_keys(src: _Source, path: tuple, mapping: Any, known: Iterable[str], what: str) -> dict:
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise src.error(path, f"expected a mapping, got {type(mapping).__name__}")
    for key in mapping:
        if key not in known:
            raise src.error(path + (key,), f"unknown {what} {key!r}; known: {', '.join(sorted(known))}")
    return dict(mapping)


@dataclass(frozen=True)
class Variant:
    name: str
    encoder_layout: tuple[str, ...]
    gbla: dict = field(default_factory=dict)    # GBLAOptions fields
    model: dict = field(default_factory=dict)   # other ModelConfig overrides
    description: str = ""


def _parse_variant(src: _Source, i: int, entry: Any) -> Variant:
    path = ("variants", i)
    if not isinstance(entry, dict):
        raise src.error(path, "each variant is a mapping with name, encoder_layout and optional gbla / model")
    label = path + (entry["name"],) if isinstance(entry.get("name"), str) else path
    _known_keys(src, path, entry, VARIANT_KEYS, "variant field")
    for required in ("name", "encoder_layout"):
        if required not in entry:
            raise src.error(label, f"missing required field {required!r}")
    name = _name_list(src, path + ("name",), [entry["name"]], "variant")[0]
    layout = entry["encoder_layout"]
    if not isinstance(layout, list) or not layout:
        raise src.error(path + ("encoder_layout",), "expected a non-empty list of layer types")
    for j, layer in enumerate(layout):
        if layer not in LAYER_TYPES:
            raise src.error(path + ("encoder_layout", j),
                            f"unknown layer type {layer!r} in variant {name!r}; known: {', '.join(LAYER_TYPES)}")
    gbla = _check_fields(src, path + ("gbla",), entry.get("gbla"), GBLAOptions, what="GBLA option")
    if "gbla" in entry and "gbla" not in layout:
        raise src.error(path + ("gbla",), f"variant {name!r} sets GBLA options but its encoder_layout has no "
                                          f"gbla layer")
    try:
        GBLAOptions(**gbla)
    except (ValueError, TypeError) as e:
        raise src.error(path + ("gbla",), str(e)) from None
    model = _check_fields(src, path + ("model",), entry.get("model"), ModelConfig,
                          exclude=("encoder_layout", "gbla"), what="model field")
    return Variant(name=name, encoder_layout=tuple(layout), gbla=gbla, model=model,
                   description=str(entry.get("description") or ""))


@dataclass
class Grid:
    """One profile of a params file, resolved: everything needed to build its RunConfigs."""
    params_file: Path
    profile: str
    datasets: list[str]
    seeds: list[int]
    variant_names: list[str]          # the profile's variants, in file order
    variants: dict[str, Variant]      # every variant defined in the file
    model: dict
    train: dict
    synthetic: dict
    runtime: dict
    dask: dict
    # the profile whose runs this one reruns with one setting changed (its report pairs them seed by seed)
    compares_with: str | None = None

    def run_config(self, dataset: str, variant: str, seed: int, *, train_overrides: dict | None = None) -> RunConfig:
        if variant not in self.variants:
            raise KeyError(f"{self.params_file}: no variant {variant!r}; defined: {', '.join(self.variants)}")
        v = self.variants[variant]
        model = {**self.model, **v.model,
                 "encoder_layout": v.encoder_layout, "gbla": GBLAOptions(**v.gbla)}
        train = {**self.train, **{k: val for k, val in (train_overrides or {}).items() if val is not None}}
        return RunConfig(dataset=dataset, variant=variant, seed=int(seed), model=ModelConfig(**model),
                         train=TrainConfig(**train))

    def expand(self, datasets: Sequence[str] | None = None, variants: Sequence[str] | None = None,
               seeds: Sequence[int] | None = None) -> list[RunConfig]:
        """Every run of the profile (optionally narrowed), dataset-major, then variant, then seed."""
        check_dataset_names(datasets or [])
        unknown = [v for v in (variants or []) if v not in self.variants]
        if unknown:
            raise ValueError(f"{self.params_file}: unknown variants {unknown}; defined: {', '.join(self.variants)}")
        return [self.run_config(d, v, s) for d in (datasets or self.datasets)
                for v in (variants or self.variant_names) for s in (seeds or self.seeds)]

    def path(self, key: str) -> Path | None:
        """A runtime path (runs_root, reports_root, processed_root); relative ones are under the repo root."""
        value = self.runtime.get(key)
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p

    @property
    def runs_root(self) -> Path:
        return self.path("runs_root")

    @property
    def reports_root(self) -> Path:
        return self.path("reports_root")

    @property
    def processed_root(self) -> Path | None:
        return self.path("processed_root")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def setting_changes(base: Grid, other: Grid) -> dict[str, tuple]:
    """{"train.patience": (10, 20)}: the settings in which every run of `other` differs from the run of
    the same dataset, variant and seed in `base` (its twin). ValueError where a run has no twin, where
    runs differ in different settings, or where nothing differs (nothing to compare)."""
    twins = {(c.dataset, c.variant, c.seed): c for c in base.expand()}
    changes = None
    for c in other.expand():
        twin = twins.get((c.dataset, c.variant, c.seed))
        if twin is None:
            raise ValueError(f"profile {other.profile!r} has {c.dataset}/{c.variant}/seed{c.seed}, which profile "
                             f"{base.profile!r} does not: nothing to pair it with")
        ours, theirs = _flat(twin.to_dict()), _flat(c.to_dict())
        diff = {k: (ours.get(k), theirs.get(k)) for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)}
        if changes is not None and diff != changes:
            raise ValueError(f"profile {other.profile!r} changes {', '.join(diff) or 'nothing'} for "
                             f"{c.dataset}/{c.variant} but {', '.join(changes) or 'nothing'} elsewhere: not one setting")
        changes = diff
    if not changes:
        raise ValueError(f"profile {other.profile!r} gives its runs the same configs as profile {base.profile!r}: "
                         f"nothing changed to compare")
    return changes


def _check_shared_run_folders(src: _Source, profiles: dict[str, Grid]) -> None:
    """Two profiles writing to the same runs folder must agree on the config of every run they share.

    A run folder is named by (dataset, variant, seed), not by config: a profile that trains `sa` on
    Beauty with other settings (say patience 20) into the full grid's runs folder would see the full
    grid's finished runs as not done and replace them, and the full grid would then replace its runs
    again. Such a profile needs a runs folder of its own (runtime.runs_root)."""
    for first, second in itertools.combinations(profiles, 2):
        a, b = profiles[first], profiles[second]
        if a.runs_root != b.runs_root:
            continue
        shared = itertools.product([d for d in a.datasets if d in b.datasets],
                                   [v for v in a.variant_names if v in b.variant_names],
                                   [s for s in a.seeds if s in b.seeds])
        for dataset, variant, seed in shared:
            ours = a.run_config(dataset, variant, seed).config_hash()
            theirs = b.run_config(dataset, variant, seed).config_hash()
            if ours != theirs:
                raise src.error(("profiles", second),
                                f"its run {dataset}/{variant}/seed{seed} (config {theirs}) and profile {first!r}'s "
                                f"(config {ours}) would share the folder {a.runtime['runs_root']}/{dataset}/{variant}/"
                                f"seed{seed}, each replacing the other's finished results; give profile {second!r} "
                                f"a runs folder of its own (runtime: {{runs_root: outputs/runs-{second}}})")


def load_grid(params_file: str | os.PathLike = DEFAULT_PARAMS, profile: str = "full") -> Grid:
    """Parse and validate a params file (every profile) and resolve `profile`.

    Relative params paths are taken from the repo root when they do not exist from the cwd.
    """
    profiles = load_profiles(params_file)
    if profile not in profiles:
        first = next(iter(profiles.values()))
        raise ParamsError(f"{first.params_file}: no profile {profile!r}; defined: {', '.join(profiles)}")
    return profiles[profile]


def load_profiles(params_file: str | os.PathLike = DEFAULT_PARAMS) -> dict[str, Grid]:
    """Every profile of a params file, resolved and validated, in file order (see load_grid)."""
    params_file = Path(params_file)
    if not params_file.is_absolute() and not params_file.exists() and (REPO_ROOT / params_file).exists():
        params_file = REPO_ROOT / params_file
    src = _Source(params_file)
    data = src.data
    _known_keys(src, (), data, TOP_LEVEL_KEYS, "top-level key")
    for required in ("datasets", "seeds", "variants", "profiles"):
        if required not in data:
            raise src.error((), f"missing required key {required!r}")
    datasets = _dataset_list(src, ("datasets",), data["datasets"])
    seeds = _seed_list(src, ("seeds",), data["seeds"])
    model = _check_fields(src, ("model",), data.get("model"), ModelConfig, exclude=("encoder_layout", "gbla"),
                          what="model field")
    train = _check_fields(src, ("train",), data.get("train"), TrainConfig, what="train field")
    if not isinstance(data["variants"], list) or not data["variants"]:
        raise src.error(("variants",), "expected a non-empty list of variants")
    variants: dict[str, Variant] = {}
    for i, entry in enumerate(data["variants"]):
        v = _parse_variant(src, i, entry)
        if v.name in variants:
            raise src.error(("variants", i, "name"), f"variant {v.name!r} is defined twice")
        variants[v.name] = v
    synthetic = _known_keys(src, ("synthetic",), data.get("synthetic"), _synthetic_keys(), "synthetic option")
    runtime = _merge(RUNTIME_DEFAULTS, _known_keys(src, ("runtime",), data.get("runtime"), RUNTIME_DEFAULTS,
                                                    "runtime option"))
    dask_cfg = _merge(DASK_DEFAULTS, _known_keys(src, ("dask",), data.get("dask"), DASK_DEFAULTS, "dask option"))

    profiles = data["profiles"]
    if not isinstance(profiles, dict) or not profiles:
        raise src.error(("profiles",), "expected a mapping of profile names to settings")
    resolved = {}
    for name, prof in profiles.items():
        path = ("profiles", name)
        prof = _known_keys(src, path, prof, PROFILE_KEYS, "profile key")
        p_variants = (_name_list(src, path + ("variants",), prof["variants"], "variant")
                      if "variants" in prof else list(variants))
        for j, v in enumerate(p_variants):
            if v not in variants:
                raise src.error(path + ("variants", j), f"unknown variant {v!r}; defined: {', '.join(variants)}")
        p_model = _check_fields(src, path + ("model",), prof.get("model"), ModelConfig,
                                exclude=("encoder_layout", "gbla"), what="model field")
        p_train = _check_fields(src, path + ("train",), prof.get("train"), TrainConfig, what="train field")
        p_runtime = _known_keys(src, path + ("runtime",), prof.get("runtime"), RUNTIME_DEFAULTS, "runtime option")
        p_dask = _known_keys(src, path + ("dask",), prof.get("dask"), DASK_DEFAULTS, "dask option")
        grid = Grid(
            params_file=params_file, profile=name,
            datasets=_dataset_list(src, path + ("datasets",), prof["datasets"])
            if "datasets" in prof else datasets,
            seeds=_seed_list(src, path + ("seeds",), prof["seeds"]) if "seeds" in prof else seeds,
            variant_names=p_variants, variants=variants,
            model={**model, **p_model}, train={**train, **p_train},
            synthetic={**synthetic, **_known_keys(src, path + ("synthetic",), prof.get("synthetic"),
                                                   _synthetic_keys(), "synthetic option")},
            runtime=_merge(runtime, p_runtime), dask=_merge(dask_cfg, p_dask),
            compares_with=str(prof["compares_with"]) if prof.get("compares_with") is not None else None)
        _check_runtime(src, path, grid)
        try:  # every variant must build a valid config under this profile's settings
            for v in grid.variant_names:
                grid.run_config(grid.datasets[0], v, grid.seeds[0])
        except (ValueError, TypeError) as e:
            raise src.error(path, f"variant {v!r} does not give a valid config: {e}") from None
        resolved[name] = grid
    _check_shared_run_folders(src, resolved)
    for name, grid in resolved.items():
        if grid.compares_with is not None:
            where = ("profiles", name, "compares_with")
            if grid.compares_with not in resolved or grid.compares_with == name:
                raise src.error(where, f"no other profile {grid.compares_with!r}; defined: {', '.join(resolved)}")
            try:
                setting_changes(resolved[grid.compares_with], grid)
            except ValueError as e:
                raise src.error(where, str(e)) from None
    return resolved


def _synthetic_keys() -> set[str]:
    """Keyword arguments of make_synthetic_dataset (any, if the module cannot be inspected)."""
    import inspect

    try:
        from gbla.data.synthetic import make_synthetic_dataset
    except ImportError:
        return {"num_users", "num_items", "seed"}
    params = inspect.signature(make_synthetic_dataset).parameters
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _check_runtime(src: _Source, path: tuple, grid: Grid) -> None:
    d = grid.dask
    if d["cluster"] not in CLUSTERS:
        raise src.error(path + ("dask", "cluster"), f"must be one of {CLUSTERS}, got {d['cluster']!r}")
    for key in ("runs_per_gpu", "cpu_workers", "runs_per_cpu_worker"):
        if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
            raise src.error(path + ("dask", key), f"must be a positive integer, got {d[key]!r}")
    if d["gpus"] != "auto" and not (isinstance(d["gpus"], list) and all(isinstance(g, (int, str)) for g in d["gpus"])):
        raise src.error(path + ("dask", "gpus"), f"must be 'auto' or a list of device ids, got {d['gpus']!r}")
    if not isinstance(d["slurm"], dict):
        raise src.error(path + ("dask", "slurm"), "expected a mapping of dask_jobqueue.SLURMCluster options")
    if not isinstance(grid.runtime["reports"], list):
        raise src.error(path + ("runtime", "reports"), "expected a list of notebook paths")


