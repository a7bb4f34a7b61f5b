"""Stage 1 (DESIGN.md §4): expand a grid YAML (axes × overrides) into fully resolved run configs.

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
"""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from core.compile import MODES, PRECISIONS, SDPA_BACKENDS
from core.config import ConfigError, check_keys, run_hash, structured, to_dict
from core.registry import ENCODERS

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
SPECIAL_AXES = ("method", "backbone", "seed")
GRID_KEYS = {"description", "profile", "axes", "overrides", "baseline", "sweep", "by_profile"}


def config_roots() -> list[Path]:
    """The package's configs plus any folders in SEMPRIOR_CONFIG_PATH (plugins' presets and grids);
    a folder earlier in the path wins over later ones and over the package's own."""
    extra = [Path(p) for p in os.environ.get("SEMPRIOR_CONFIG_PATH", "").split(os.pathsep) if p]
    return [*extra, CONFIG_ROOT]


def available(kind: str) -> list[str]:
    return sorted({p.stem for root in config_roots() for p in (root / kind).glob("*.yaml")})


def find_yaml(kind: str, name: str) -> Path | None:
    for root in config_roots():
        if (root / kind / f"{name}.yaml").exists():
            return root / kind / f"{name}.yaml"
    return None


def load_yaml(kind: str, name: str) -> dict:
    """configs/<kind>/<name>.yaml with the safe loader; unknown names list the valid ones."""
    path = find_yaml(kind, name)
    if path is None:
        raise ConfigError(f"unknown {kind} {name!r}; valid: {', '.join(available(kind))}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


@dataclass
class RunSpec:
    run_id: str
    label: dict[str, Any]            # the axis values that identify this run (seed included)
    cfg: dict

    @property
    def group(self) -> str:
        """Label without the seed: runs that differ only by seed are one curve."""
        return ",".join(f"{k}={v}" for k, v in self.label.items() if k != "seed")


@dataclass
class Grid:
    name: str
    profile: str
    runs: list[RunSpec]
    baseline: str | None = None
    sweep: str | None = None           # an axis to plot final FD against (e.g. the Δt sweep)
    meta: dict = field(default_factory=dict)


def _dot(key: str, value: Any) -> dict:
    """'a.b.c', v -> {'a': {'b': {'c': v}}}."""
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _axis_layer(key: str, value: Any, profile: str) -> list:
    """Config layers for one axis value. A method preset holds the paper's settings in `method:` and,
    under `profiles: {<profile>: [dotlist]}`, the values a small profile must scale (e.g. the REPA
    depth on a 4-block backbone), each with its reason next to it in the YAML."""
    if key == "method":
        preset = load_yaml("method", str(value))
        unknown = set(preset) - {"method", "profiles"}
        if unknown:
            raise ConfigError(f"method preset {value!r}: unknown keys {sorted(unknown)}; valid: method, profiles")
        scaled = (preset.get("profiles") or {}).get(profile) or []
        return [{"method": preset["method"]}, OmegaConf.from_dotlist(list(scaled))]
    if key == "backbone":
        return [{"backbone": {"name": str(value)}}]
    return [_dot(key, value)]


def validate(cfg: dict, check_files: bool = True) -> None:
    """Checks that need the registries: component keys and artifact fit() keys, basic ranges; with
    check_files, also that the dataset and every weights file exist (a dry run plans without them)."""
    from benchmarks.plugins import load_all
    from benchmarks.prepare import artifact_order, eval_kinds, latent_requires
    from core.registry import LATENTS

    from benchmarks.datasets import DATASETS

    load_all()
    if cfg["data"]["name"] not in DATASETS:
        raise ConfigError(f"unknown dataset {cfg['data']['name']!r}; valid: {', '.join(sorted(DATASETS))}")
    for split in ("train", "test"):
        limit = cfg["data"][f"limit_{split}"]
        if limit is not None and limit < 1:
            raise ConfigError(f"data.limit_{split} must be ≥ 1 or null, got {limit}")
    if cfg["train"]["steps"] < 1:
        raise ConfigError(f"train.steps must be ≥ 1, got {cfg['train']['steps']}")
    if cfg["train"]["batch_size"] < 1:
        raise ConfigError(f"train.batch_size must be ≥ 1, got {cfg['train']['batch_size']}")
    from core.registry import BACKBONES

    if cfg["backbone"]["name"] not in BACKBONES:
        raise ConfigError(f"unknown backbone {cfg['backbone']['name']!r}; valid: {', '.join(BACKBONES.names())}")
    lat = cfg["method"]["latent"]
    try:
        check_keys(f"method.latent {lat.get('name')!r}", LATENTS.get(lat["name"]), lat, deps=("artifacts",))
        needed = latent_requires(lat) + eval_kinds(cfg)
    except KeyError as e:
        raise ConfigError(f"method.latent: {e.args[0]}") from None
    _check_ranges(cfg)
    _check_components(cfg)
    if check_files:
        _check_dataset(cfg["data"]["name"], cfg["data"]["root"], cfg["data"]["image_size"], cfg["data"]["stream"])
        e = cfg["eval"]
        if e["metric"] == "adm" and not (e["adm_ref"] and Path(e["adm_ref"]).expanduser().is_file()):
            raise ConfigError(f"eval.adm_ref: ADM reference batch {e['adm_ref']} not found; pass "
                              "eval.adm_ref=<VIRTUAL_imagenet256_labeled.npz> (docs/paper_scale.md: where to get it)")
    for kind, fit_cfg in cfg["prepare"].items():
        if kind not in ENCODERS:
            raise ConfigError(f"prepare.{kind}: unknown artifact kind; valid: {', '.join(ENCODERS.names())}")
        fit_cfg = dict(fit_cfg or {})
        use = fit_cfg.pop("use", kind)
        if use not in ENCODERS:
            raise ConfigError(f"prepare.{kind}.use: unknown artifact class {use!r}; valid: {', '.join(ENCODERS.names())}")
        for key, value in fit_cfg.items():
            if check_files and (key == "weights" or key.endswith("_path")) and value and not Path(str(value)).expanduser().exists():
                raise ConfigError(f"prepare.{kind}.{key}: weights file {value} does not exist; download it and "
                                  "pass its path (which files and where: docs/paper_scale.md)")
        check_keys(f"prepare.{kind}", ENCODERS.get(use).fit, fit_cfg, deps=("data", "deps", "device"))
    try:      # after the slots' `use` names are known to exist: the dependency order (and cycles) of what is used
        artifact_order(needed, cfg["prepare"])
    except KeyError as e:
        raise ConfigError(f"method.latent: {e.args[0]}") from None


def resolve(profile: str, label: dict[str, Any], overrides: list[str] | None = None,
            cli: list[str] | None = None, check_files: bool = True) -> dict:
    """One fully resolved, validated run config: profile < method preset < overrides < other axes < cli."""
    prof = load_yaml("profile", profile)
    first = [x for k, v in label.items() if k == "method" for x in _axis_layer(k, v, profile)]
    rest = [x for k, v in label.items() if k != "method" for x in _axis_layer(k, v, profile)]
    cfg = to_dict(structured(prof, {"profile": profile}, *first, OmegaConf.from_dotlist(list(overrides or [])),
                             *rest, OmegaConf.from_dotlist(list(cli or []))))
    validate(cfg, check_files)
    return cfg


@functools.lru_cache(maxsize=8)
def _check_dataset(name: str, root: str | None, image_size: int, stream: bool = False) -> None:
    """Load the dataset once per process (a streamed one: scan its folder) so a missing one fails at load
    with where it looked."""
    from benchmarks.datasets import check_dataset

    try:
        check_dataset(name, root, image_size, stream)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def _check_ranges(cfg: dict) -> None:
    t, e = cfg["train"], cfg["eval"]
    checks = [
        (t["lr"] > 0, f"train.lr must be > 0, got {t['lr']}"),
        (0 <= t["ema_decay"] < 1, f"train.ema_decay must be in [0, 1), got {t['ema_decay']}"),
        (t["precision"] in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {t['precision']!r}"),
        (t["sdpa"] in SDPA_BACKENDS, f"train.sdpa must be one of {', '.join(SDPA_BACKENDS)}, got {t['sdpa']!r}"),
        (str(t["compile"]).lower() in (*MODES, "true", "false"),
         f"train.compile must be one of {', '.join(MODES)}, got {t['compile']!r}"),
        (t["device"] in ("auto", "cpu", "cuda") or t["device"].startswith("cuda:"),
         f"train.device must be auto, cpu or cuda[:N], got {t['device']!r}"),
        (not (t["cuda_graph"] and t["device"] == "cpu"),
         "train.cuda_graph=true needs a CUDA device; train.device is cpu (set train.cuda_graph=false)"),
        (t["log_every"] >= 1 and t["ckpt_every"] >= 1, "train.log_every and train.ckpt_every must be ≥ 1"),
        (t["keep_ckpts"] >= 1, f"train.keep_ckpts must be ≥ 1, got {t['keep_ckpts']}"),
        (t["grad_clip"] is None or t["grad_clip"] > 0, f"train.grad_clip must be > 0 or null, got {t['grad_clip']}"),
        (e["num_samples"] >= 10 and e["batch_size"] >= 1, "eval.num_samples must be ≥ 10 and eval.batch_size ≥ 1"),
        (e["every"] >= 0, f"eval.every must be ≥ 0 (0 = only eval.at and the last step), got {e['every']}"),
        (e["metric"] in ("fd-net", "adm"), f"eval.metric must be fd-net or adm, got {e['metric']!r}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _check_components(cfg: dict) -> None:
    """Build every component once with stand-in shapes (backbone on the meta device: no memory, no
    compute), so a bad value (Δt ≥ 1, an unknown solver, a REPA depth past the last block, a bad
    time_embed_order) fails at load with one line instead of minutes later inside a job."""
    import torch

    from benchmarks.components import build_backbone
    from core.registry import LATENTS
    from core.types import Groups
    from methods.compose import build_method, build_schedule
    from methods.guidance import build_guidance

    names = LATENTS.get(cfg["method"]["latent"]["name"]).group_names
    groups = Groups(tuple(names), (2,) * len(names))
    where = "method.schedule"
    try:
        schedule = build_schedule(cfg["method"], groups)
        where = "backbone"
        with torch.device("meta"):
            model = build_backbone(cfg, schedule, (groups.channels, 8, 8), 10)
        where = "method (loss / sampler / guidance)"
        method = build_method(cfg["method"], groups=groups, hidden_size=model.hidden_size, encoder_dim=8,
                              null_label=10, schedule=schedule, sampler_overrides=cfg["eval"]["sampler"],
                              guidance=cfg["eval"]["guidance"])
        build_guidance(cfg["method"]["guidance"], null_label=10)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e).splitlines()[0]
        raise ConfigError(f"{where}: {msg}") from None
    too_deep = [d for d in method.loss.hidden_at if not 1 <= d <= model.depth]
    if too_deep:
        raise ConfigError(f"method.loss: hidden states requested after block(s) {too_deep} but backbone "
                          f"{cfg['backbone']['name']!r} has {model.depth} blocks (set e.g. method.loss.repa.depth)")


def expand(grid_name: str, cli: list[str] | None = None, profile: str | None = None,
           check_files: bool = True) -> Grid:
    """Resolve every run of a grid; `cli` is a dotlist applied last to every run."""
    g = load_yaml("grid", grid_name)
    unknown = set(g) - GRID_KEYS
    if unknown:
        raise ConfigError(f"grid {grid_name!r}: unknown keys {sorted(unknown)}; valid: {', '.join(sorted(GRID_KEYS))}")
    prof_name = profile or g.get("profile", "tiny")
    # by_profile: {<profile>: {axes: {...}, overrides: [...]}} replaces those axes / adds those overrides when
    # the grid runs at that profile (e.g. the XL/1 backbone at imagenet256 instead of the tiny one).
    by_profile = (g.get("by_profile") or {}).get(prof_name) or {}
    if set(by_profile) - {"axes", "overrides"}:
        raise ConfigError(f"grid {grid_name!r}: by_profile.{prof_name} has unknown keys "
                          f"{sorted(set(by_profile) - {'axes', 'overrides'})}; valid: axes, overrides")
    axes: dict[str, list] = {**(g.get("axes") or {}), **(by_profile.get("axes") or {})}
    overrides = list(g.get("overrides") or []) + list(by_profile.get("overrides") or [])
    if not axes or any(not isinstance(v, list) or not v for v in axes.values()):
        raise ConfigError(f"grid {grid_name!r} has no runs: every axis needs a non-empty list (axes: {axes})")
    runs = []
    for values in itertools.product(*axes.values()):
        label = dict(zip(axes.keys(), values))
        cfg = resolve(prof_name, label, overrides, cli, check_files)
        method, backbone = cfg["method"]["name"], cfg["backbone"]["name"]
        run_id = f"{label.get('method', method)}-{backbone}-s{cfg['seed']}-{run_hash(cfg)[:8]}"
        label = {"method": label.get("method", method), **{k: v for k, v in label.items() if k != "method"}}
        if "backbone" in label:
            label["backbone"] = backbone          # the command line may have replaced the axis value
        runs.append(RunSpec(run_id=run_id, label=label, cfg=cfg))
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"grid {grid_name!r}: two runs resolve to the same config (duplicate axis values?)")
    return Grid(name=grid_name, profile=prof_name, runs=runs, baseline=g.get("baseline"), sweep=g.get("sweep"),
                meta={"description": g.get("description", "")})
