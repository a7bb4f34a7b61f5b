"""Structured run configs: defaults live here (and in plugin constructor signatures), YAML is merged on top.

Precedence when a grid expands (benchmarks/config/grid.py): schema defaults < profile < method preset <
grid overrides < axis values < command-line dotlist. Unknown keys fail at load with the valid names.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


class ConfigError(ValueError):
    """A one-line, user-facing config problem (names the key and the valid choices)."""


@dataclass
class DataCfg:
    name: str = "fashion-mnist"        # benchmarks.data.datasets.DATASETS
    root: Optional[str] = None         # None: search the default places (see benchmarks/data/datasets.py)
    image_size: int = 32               # Fashion-MNIST 28 px is zero-padded to 32
    flips: bool = True                 # cache horizontal flips and pick one with p = 0.5 (LightningDiT/SFD, docs/methods.md §5.2)
    limit_train: Optional[int] = None  # use only the first N training images (smoke tests); None = all
    limit_test: Optional[int] = None   # use only the first N test images for the FD reference; None = all
    stream: bool = False               # image-folder too large for memory: the train split is read from disk by
                                       # benchmarks/extract.py into a sharded latent cache (docs/paper_scale.md)


@dataclass
class MethodCfg:
    name: str = MISSING
    latent: dict = field(default_factory=dict)      # LATENTS entry + its keys
    schedule: dict = field(default_factory=dict)    # SCHEDULES entry + its keys
    loss: dict = field(default_factory=dict)        # LOSSES entry + its keys
    sampler: dict = field(default_factory=dict)     # SAMPLERS entry + its keys (paper setting)
    guidance: Optional[dict] = None                 # paper guidance for sampling (None = unguided)
    backbone: dict = field(default_factory=dict)    # backbone keywords the method needs (SFD: qk_norm)


@dataclass
class TrainCfg:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    grad_clip: Optional[float] = None  # max global grad norm; None = off (REPA uses 1.0)
    ema_decay: float = 0.999
    ema_warmup: bool = True            # decay_k = min(decay, (1 + k) / (10 + k)): early EMA curves are honest
    precision: str = "auto"            # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | bf16-residual (+ bf16 residual stream)
    compile: str = "auto"              # auto (regions on CUDA, eager on CPU) | regions | blocks | full | off (core/compile.py)
    sdpa: str = "auto"                 # attention kernel of the training step: auto | flash | cudnn | efficient | math
    device: str = "auto"               # auto | cpu | cuda
    threads: int = 0                   # torch intra-op threads; 0 = leave torch's default
    micro_batches: int = 0             # shards of the global batch (0 = one per process); see core/dist.py
    cuda_graph: bool = False           # replay each shard's forward + backward as one CUDA graph (core/graphs.py)
    log_every: int = 50
    ckpt_every: int = 500
    keep_ckpts: int = 2


@dataclass
class EvalCfg:
    every: int = 250                   # evaluate the EMA model every N steps ...
    at: list = field(default_factory=lambda: [0])  # ... and at these steps (0 = the untrained model)
    num_samples: int = 2000            # balanced over classes
    batch_size: int = 500
    sampler: dict = field(default_factory=dict)     # keys merged onto method.sampler where the sampler accepts them
    guidance: Optional[dict] = None    # guidance for evaluation samples; None = unguided (the papers' convergence metric)
    sample_seed: int = 1234            # same noise and labels at every eval: lower-variance curves
    grid_images: int = 100             # images in the per-run sample PNG
    metric: str = "fd-net"             # fd-net: FD/KID/PR in the profile's own classifier + class accuracy (small
                                       # profiles) | adm: Inception FID, sFID, IS, PR against an ADM reference batch
    adm_ref: Optional[str] = None      # metric adm: VIRTUAL_imagenet256_labeled.npz (docs/paper_scale.md)
    inception: Optional[str] = None    # metric adm: torch-fidelity Inception weights file (None: the torch hub cache)


@dataclass
class LogCfg:
    """Experiment trackers (benchmarks/execution/trackers.py); they change no result, so they are not in the run hash."""
    tensorboard: bool = True           # TensorBoard event files under <run>/tb/ (tensorboard --logdir results/<grid>)
    wandb: bool = False                # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "semprior-bench"
    wandb_mode: Optional[str] = None   # online | offline | disabled; None = wandb's own default (WANDB_MODE)


@dataclass
class RunCfg:
    profile: str = "tiny"
    seed: int = 0
    method: MethodCfg = field(default_factory=MethodCfg)
    backbone: dict = field(default_factory=lambda: {"name": "lightningdit-tiny"})
    data: DataCfg = field(default_factory=DataCfg)
    prepare: dict = field(default_factory=dict)    # artifact kind -> fit() keywords (encoders/)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    cache_dir: str = "cache"           # shared artifacts and latent caches (not part of the run hash)
    log: LogCfg = field(default_factory=LogCfg)    # experiment trackers (not part of the run hash)


NOT_HASHED = ("cache_dir", "log")


def structured(*layers: Any) -> DictConfig:
    """Merge layers (dicts / DictConfigs / dotlists already parsed) onto the RunCfg schema."""
    base = OmegaConf.structured(RunCfg)
    try:
        return OmegaConf.merge(base, *layers)
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: Exception) -> str:
    """OmegaConf errors are multi-line; keep the message and add the valid keys of the parent node."""
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None) or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node: Any = OmegaConf.structured(RunCfg)
    try:
        for part in [p for p in parent.split(".") if p]:
            node = node[part]
        valid = ", ".join(sorted(node.keys())) if isinstance(node, DictConfig) else ""
    except Exception:  # noqa: BLE001 - the hint is best-effort, the message above is the error
        valid = ""
    return f"config key {key!r}: {msg}" + (f" (valid keys: {valid})" if valid else "")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def run_hash(cfg: dict) -> str:
    """sha1 of the resolved config minus the keys that do not change results."""
    body = {k: v for k, v in cfg.items() if k not in NOT_HASHED}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def stable_hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def check_keys(kind: str, ctor: Any, keys: dict, *, deps: tuple[str, ...] = (),
               allow_var_keyword: bool = False) -> None:
    """Fail early (at load) when a component config names a keyword its constructor does not take.

    A constructor taking **kwargs is refused (ConfigError): its keys cannot be checked, and an eval-time
    override (methods/compose.py `sampler_config`) only reaches parameters declared by name, so a
    **kwargs component could silently keep its own settings while every other run gets the override.
    `allow_var_keyword=True` is for the suite's own forwarding presets (backbone presets pass **kw to DiT,
    whose build raises TypeError on an unknown key at load).
    """
    params = inspect.signature(ctor).parameters
    var = [n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    if var:
        if allow_var_keyword:
            return
        raise ConfigError(f"{kind}: its constructor {_qualname(ctor)} takes **{var[0]}, so its config keys cannot "
                          f"be checked and evaluation overrides cannot reach them; declare every parameter by "
                          f"name (docs/adding_a_method.md, 'Fair by construction')")
    valid = [n for n, p in params.items() if n not in deps and n not in ("self", "cls")
             and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for k in keys:
        if k != "name" and k not in valid:
            raise ConfigError(f"{kind}: unknown key {k!r}; valid keys: {', '.join(valid)}")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


# ---------------------------------------------------------------------------------------------------
# Config files: one-line errors, duplicate keys refused
# ---------------------------------------------------------------------------------------------------

def _strict_loader():
    """A yaml.SafeLoader whose mappings refuse a key given twice: plain safe_load keeps the last value
    silently, so a grid with `axes:` twice would drop half of its runs without a word."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:       # the keys as written: a `<<:` merge may be overridden on purpose
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:                # unhashable: construct_mapping below reports it
                continue
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def load_config_yaml(path: Any, what: str = "config file") -> Any:
    """A config YAML (grid, method preset, profile, slurm profile) with the safe loader and one-line errors:
    "<path>:<line>: <problem>" for a syntax error or a duplicate key, and the file named for an unreadable,
    binary or non-UTF-8 file. An empty file gives None."""
    import yaml

    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if b"\x00" in raw:
        raise ConfigError(f"{path}: not a text file (binary content); a {what} is YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the {what} as UTF-8 YAML") from None
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = getattr(e, "context", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        detail = f"{problem}" + (f" ({context})" if context and "duplicate" not in problem else "")
        raise ConfigError(f"{where}: {detail} in {what}".replace("\n", " ")) from None
