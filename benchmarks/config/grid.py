"""Stage 1 (docs/architecture.md, "The stages of a grid"): expand a grid YAML (axes × overrides) into fully resolved run configs.

Grid file (benchmarks/configs/grid/<name>.yaml):
    profile: tiny                  # benchmarks/configs/profile/<profile>.yaml
    axes:                          # the cartesian product of these
      method: [sit, redi, sfd]     #   presets in benchmarks/configs/method/
      backbone: [lightningdit-tiny]#   registry names
      seed: [0, 1]
      method.schedule.delta_t.texture: [0.1, 0.3]   # any dotted key of the run config
    overrides: ["train.steps=2000"]
    by_profile:                    # per-profile axes / extra overrides (e.g. the XL backbone at imagenet256)
      imagenet256: {axes: {backbone: [lightningdit-xl-1]}}
    baseline: sit                  # the label the "× faster convergence" table compares with
Precedence: schema < profile < method preset < grid overrides < axis values < command line.
`grid=` also takes a path to a grid file (ending in .yaml/.yml, or containing a '/'). Every key, its type
and default: docs/grids.md; `validate_grid` checks them with the file and line of the offending key.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from benchmarks.config.validate import validate
from benchmarks.data.prepare import canonical_prepare, prepare_build
from core.config import ConfigError, run_hash, structured, to_dict

# Grid and config files live in benchmarks/config/gridfile.py; re-exported here, where callers have always found them.
from benchmarks.config.gridfile import (CONFIG_ROOT, GRID_COPY, GRID_KEYS, GRID_SOURCE, available,  # noqa: F401
                                        check_grid_folder, config_roots, dotlist, find_yaml, grid_source,
                                        grid_source_name, is_grid_path, key_lines, load_grid, load_yaml,
                                        record_grid_file, validate_grid)


@dataclass
class RunSpec:
    run_id: str
    label: dict[str, Any]            # the axis values that identify this run (seed included)
    cfg: dict

    @property
    def group(self) -> str:
        """Label without the replicate axes: runs that differ only by training seed or artifact build
        (prepare.seed) are one curve."""
        return ",".join(f"{k}={v}" for k, v in self.label.items() if k not in ("seed", "prepare.seed"))


@dataclass
class Grid:
    name: str
    profile: str
    runs: list[RunSpec]
    baseline: str | None = None
    sweep: str | None = None           # an axis to plot final FD against (e.g. the Δt sweep)
    meta: dict = field(default_factory=dict)
    source: Path | None = None         # the grid YAML file it was expanded from


def _dot(key: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def axis_layer(key: str, value: Any, profile: str) -> list:
    """Config layers for one axis value. A method preset holds the paper's settings in `method:` and,
    under `profiles: {<profile>: [dotlist]}`, the values a small profile must scale (e.g. the REPA
    depth on a 4-block backbone), each with its reason next to it in the YAML."""
    if key == "method":
        preset = load_yaml("method", str(value))
        where = f"method preset {value!r} ({find_yaml('method', str(value))})"
        unknown = set(preset) - {"method", "profiles"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; valid: method, profiles")
        if not isinstance(preset.get("method"), dict):
            raise ConfigError(f"{where}: needs `method:` as a mapping (name, latent, schedule, loss, sampler, ...), "
                              f"got {preset.get('method')!r}")
        profiles = preset.get("profiles") or {}
        if not isinstance(profiles, dict):
            raise ConfigError(f"{where}: `profiles:` must map a profile name to a list of key=value strings")
        scaled = dotlist(f"{where}: profiles.{profile}", profiles.get(profile))
        return [{"method": preset["method"]}, OmegaConf.from_dotlist(scaled)]
    if key == "backbone":
        return [{"backbone": {"name": str(value)}}]
    return [_dot(key, value)]



def resolve(profile: str, label: dict[str, Any], overrides: list[str] | None = None,
            cli: list[str] | None = None, check_files: bool = True) -> dict:
    """One fully resolved, validated run config: profile < method preset < overrides < other axes < cli."""
    prof = load_yaml("profile", profile)
    relabel = [x for x in [*(overrides or []), *(cli or [])] if x.split("=", 1)[0].strip() == "profile"]
    if relabel:
        raise ConfigError(f"{relabel[0]!r} among the overrides would only relabel the run (its settings stay "
                          f"profile {profile!r}'s); choose the profile with the grid's `profile:` key or profile=NAME "
                          "on the command line")
    first = [x for k, v in label.items() if k == "method" for x in axis_layer(k, v, profile)]
    rest = [x for k, v in label.items() if k != "method" for x in axis_layer(k, v, profile)]
    cfg = to_dict(structured(prof, {"profile": profile}, *first, OmegaConf.from_dotlist(list(overrides or [])),
                             *rest, OmegaConf.from_dotlist(list(cli or []))))
    validate(cfg, check_files)
    return canonical_prepare(cfg)          # prepare.seed=0 is dropped: build 0 keeps today's run ids



def _resolved(cfg: dict, axis: str) -> Any:
    """The resolved value of an axis key: `backbone` is the backbone's name, any other key a dotted path
    (`prepare.seed` is 0 where resolve dropped it: benchmarks/data/prepare.py canonical_prepare)."""
    if axis == "prepare.seed":
        return prepare_build(cfg)
    node: Any = cfg
    for part in ("backbone.name" if axis == "backbone" else axis).split("."):
        node = node[part]
    return node


# Downsampling factors of the pretrained tokenizers (their weights are not read at validation time): the
# SD-VAEs are f8, the LDM-format checkpoints f16 (encoders/pretrained.py). Trained tokenizers give theirs

def expand(grid_name: str, cli: list[str] | None = None, profile: str | None = None,
           check_files: bool = True) -> Grid:
    """Resolve every run of a grid; `grid_name` is a grid name or a path to a grid file (grid_source);
    `cli` is a dotlist applied last to every run."""
    grid_name, source, g = load_grid(grid_name)
    # `profile=X` among the overrides chooses the profile (as the run command's key does): set as a config key it
    # would only relabel the runs while every setting stayed the grid's profile's.
    named = [x.split("=", 1)[1] for x in cli or [] if x.split("=", 1)[0].strip() == "profile"]
    cli = [x for x in cli or [] if x.split("=", 1)[0].strip() != "profile"]
    if len(set(named) | ({profile} if profile and named else set())) > 1:
        raise ConfigError(f"two profiles asked for: {', '.join(sorted(set(named) | {profile} - {None}))}; give one")
    prof_name = profile or (named[0] if named else None) or g.get("profile", "tiny")
    # by_profile: {<profile>: {axes: {...}, overrides: [...]}} replaces those axes / adds those overrides when
    # the grid runs at that profile (e.g. the XL/1 backbone at imagenet256 instead of the tiny one).
    # load_grid checked every key's type (validate_grid), so the parts below are mappings and lists.
    where = f"grid {grid_name!r} ({source})"
    by_profile = (g.get("by_profile") or {}).get(prof_name) or {}
    axes: dict[str, list] = {**(g.get("axes") or {}), **(by_profile.get("axes") or {})}
    overrides = dotlist(f"{where}: overrides", g.get("overrides")) + \
        dotlist(f"{where}: by_profile.{prof_name}.overrides", by_profile.get("overrides"))
    if not axes:
        raise ConfigError(f"grid {grid_name!r} has no runs: it needs axes: with at least one key: [values] "
                          f"({source}; docs/grids.md)")
    runs = []
    for values in itertools.product(*axes.values()):
        label = dict(zip(axes.keys(), values))
        cfg = resolve(prof_name, label, overrides, cli, check_files)
        method, backbone = cfg["method"]["name"], cfg["backbone"]["name"]
        run_id = f"{label.get('method', method)}-{backbone}-s{cfg['seed']}-{run_hash(cfg)[:8]}"
        # The label says what the run IS: an axis value the command line replaced (backbone.name=..., seed=...,
        # any dotted key) is read back from the resolved config, so label.json agrees with the run id.
        label = {"method": label.get("method", method),
                 **{k: _resolved(cfg, k) for k in label if k != "method"}}
        if "prepare.seed" not in label and _resolved(cfg, "prepare.seed"):
            label["prepare.seed"] = _resolved(cfg, "prepare.seed")   # a build set on the command line: record it
        runs.append(RunSpec(run_id=run_id, label=label, cfg=cfg))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"grid {grid_name!r}: two runs resolve to the same config (duplicate axis values?)")
    return Grid(name=grid_name, profile=prof_name, runs=runs, baseline=g.get("baseline"), sweep=g.get("sweep"),
                meta={"description": g.get("description", "")}, source=source)
