"""Stage 1, second half: the checks a resolved run config must pass before anything runs (docs/grids.md).

`validate(cfg)` needs the registries and the lower layers (datasets, artifact kinds, components): it builds the
method's components and the backbone on the meta device, checks ranges, dataset and weights files, and the
limits each artifact fit needs. benchmarks/config/grid.py's `resolve` calls it for every run it expands.
"""
from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.build.components import build_backbone
from benchmarks.config.plugins import load_all
from benchmarks.data.datasets import DATASETS, check_dataset, image_size_rule
from benchmarks.data.prepare import BUILD_KEY, artifact_order, check_build, eval_kinds, latent_requires
from core.compile import MODES, PRECISIONS, SDPA_BACKENDS
from core.config import ConfigError, check_keys
from core.errors import CorruptFileError
from core.registry import BACKBONES, ENCODERS, LATENTS
from core.types import Groups
from methods.compose import build_method, build_schedule
from methods.guidance import build_guidance


# The trackers' own rules (benchmarks/execution/trackers.py), checked here so that a bad `log` section fails at load.
WANDB_MODES = ("online", "offline", "disabled")


def _wandb_installed() -> bool:
    try:
        import wandb  # noqa: F401 - optional dependency: only probed
    except ImportError:
        return False
    return True


def check_log_cfg(log_cfg: dict) -> list[tuple[bool, str]]:
    """(ok, message) checks of the `log` section, checked at load (validate) and when a run opens its trackers."""
    mode = log_cfg.get("wandb_mode")
    return [
        (mode is None or mode in WANDB_MODES,
         f"log.wandb_mode must be one of {', '.join(WANDB_MODES)} or null, got {mode!r}"),
        (not log_cfg.get("wandb") or _wandb_installed(),
         "log.wandb=true needs the wandb package, which is not installed: `pip install wandb` "
         "(or `pip install -e .[wandb]`), or set log.wandb=false"),
    ]


def validate(cfg: dict, check_files: bool = True) -> None:
    """Checks that need the registries: component keys and artifact fit() keys, basic ranges; with
    check_files, also that the dataset and every weights file exist (a dry run plans without them)."""

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
    sizes = None
    if check_files:
        sizes = _check_dataset(cfg["data"]["name"], cfg["data"]["root"], cfg["data"]["image_size"],
                               cfg["data"]["stream"])
        e = cfg["eval"]
        if e["metric"] == "adm" and not (e["adm_ref"] and Path(e["adm_ref"]).expanduser().is_file()):
            raise ConfigError(f"eval.adm_ref: ADM reference batch {e['adm_ref']} not found; pass "
                              "eval.adm_ref=<VIRTUAL_imagenet256_labeled.npz> (docs/paper_scale.md: where to get it)")
    for kind, fit_cfg in cfg["prepare"].items():
        if kind == BUILD_KEY:          # prepare.seed: the artifact-build index, not a kind (benchmarks/data/prepare.py)
            check_build(fit_cfg)
            continue
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
        order = artifact_order(needed, cfg["prepare"])
    except KeyError as e:
        raise ConfigError(f"method.latent: {e.args[0]}") from None
    _check_limits(cfg, order, sizes)



@functools.lru_cache(maxsize=8)
def _check_dataset(name: str, root: str | None, image_size: int, stream: bool = False) -> tuple[int, int] | None:
    """Load the dataset once per process (a streamed one: scan its folder) so a missing one fails at load
    with where it looked, and a damaged one (core.errors.CorruptFileError) names its file. Returns the
    (train, test) image counts where the loader knows them."""

    try:
        return check_dataset(name, root, image_size, stream)
    except CorruptFileError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def _non_finite(node: Any, key: str = "") -> tuple[str, Any] | None:
    """The first (dotted key, value) of the resolved config that is NaN or ±inf: a float, or a string a
    component would turn into one with float() ("nan", "inf": how a command-line value reaches a dict
    field). No setting of the suite means anything at infinity, so none is exempt."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = ((f"[{i}]", v) for i, v in enumerate(node))
    else:
        if isinstance(node, str):
            try:
                node_f = float(node)
            except ValueError:
                return None
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            node_f = float(node)
        else:
            return None
        return None if math.isfinite(node_f) else (key, node)
    for k, v in items:
        sub = f"{key}{k}" if str(k).startswith("[") else (f"{key}.{k}" if key else str(k))
        found = _non_finite(v, sub)
        if found:
            return found
    return None


MAX_SEED = 2**31 - 2            # core/seed.py folds seeds modulo 2**31 - 1: larger ones would repeat smaller ones


def _check_train(t: dict) -> list[tuple[bool, str]]:
    """Optimizer and batch settings (each rule with the reason the trainer needs it)."""
    betas = t["betas"]
    betas_ok = isinstance(betas, list) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    mb, bs = t["micro_batches"], t["batch_size"]
    return [
        (t["lr"] > 0, f"train.lr must be > 0, got {t['lr']}"),
        (betas_ok, f"train.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {betas!r}"),
        (t["weight_decay"] >= 0, f"train.weight_decay must be ≥ 0, got {t['weight_decay']}"),
        (mb >= 0, f"train.micro_batches must be ≥ 0 (0 = one per process), got {mb}"),
        (mb <= 0 or bs % mb == 0, f"train.micro_batches={mb} must divide train.batch_size={bs} (the global "
                                  f"batch is split into equal shards; benchmarks/execution/train.py shard)"),
        (t["threads"] >= 0, f"train.threads must be ≥ 0 (0 = torch's default), got {t['threads']}"),
    ]


def _check_eval(cfg: dict) -> list[tuple[bool, str]]:
    """Evaluation points, seeds and sampler step counts."""
    e, steps = cfg["eval"], cfg["train"]["steps"]
    # Points past train.steps are allowed and skipped (eval_steps in benchmarks/execution/train.py), as is an eval.every
    # larger than the run: the last step is always evaluated, so a shortened run (train.steps=100 on a grid
    # made for 1 200) keeps working and still ends with a scored point.
    bad_at = [a for a in e["at"] if not isinstance(a, int) or isinstance(a, bool) or a < 0]
    checks = [
        (0 <= cfg["seed"] <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {cfg['seed']}"),
        (0 <= e["sample_seed"] <= MAX_SEED, f"eval.sample_seed must be in [0, {MAX_SEED}], got {e['sample_seed']}"),
        (not bad_at, f"eval.at holds {bad_at}: evaluation steps must be integers ≥ 0 (e.g. eval.at=[0])"),
        (e["grid_images"] >= 0, f"eval.grid_images must be ≥ 0, got {e['grid_images']}"),
    ]
    for where in ("method.sampler", "eval.sampler"):
        sampler = cfg[where.split(".")[0]]["sampler"] or {}
        n = sampler.get("steps")
        if n is not None:   # every sampler's time grid has `steps` points, both ends included (methods/samplers.py)
            checks.append((isinstance(n, int) and not isinstance(n, bool) and n >= 2,
                           f"{where}.steps must be an integer ≥ 2 (points of the sampler's time grid, both ends "
                           f"included), got {n!r}"))
    return checks


def _check_log(cfg: dict) -> list[tuple[bool, str]]:

    return check_log_cfg(cfg.get("log", {}))


def _check_ranges(cfg: dict) -> None:
    found = _non_finite(cfg)
    if found:
        raise ConfigError(f"{found[0]}={found[1]}: must be a finite number (NaN and ±inf are never valid settings)")
    t, e = cfg["train"], cfg["eval"]
    checks = _check_train(t) + _check_eval(cfg) + [
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
        *_check_log(cfg),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _check_components(cfg: dict) -> None:
    """Build every component once with stand-in shapes (backbone on the meta device: no memory, no
    compute), so a bad value (Δt ≥ 1, an unknown solver, a REPA depth past the last block, a bad
    time_embed_order) fails at load with one line instead of minutes later inside a job."""


    names = LATENTS.get(cfg["method"]["latent"]["name"]).group_names
    groups = Groups(tuple(names), (2,) * len(names))
    where = "method.schedule"
    try:
        schedule = build_schedule(cfg["method"], groups)
        where = "backbone"
        with torch.device("meta"):
            # 32×32: room for a packed extra token (REG's 768-d class token fits one channel, docs/methods.md §14)
            model = build_backbone(cfg, schedule, (groups.channels, 32, 32), 10)
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
    build_method(cfg["method"], groups=groups, hidden_size=model.hidden_size, encoder_dim=8, null_label=10,
                 schedule=schedule, sampler_overrides=None, guidance=None)  # the paper sampler alone (evaluate.py)
    _check_image_size(cfg, getattr(model, "patch_size", None))
    too_deep = [d for d in method.loss.hidden_at if not 1 <= d <= model.depth]
    if too_deep:
        raise ConfigError(f"method.loss: hidden states requested after block(s) {too_deep} but backbone "
                          f"{cfg['backbone']['name']!r} has {model.depth} blocks (set e.g. method.loss.repa.depth)")

# from `block_out_channels` (2^(levels - 1), encoders/texture_vae.py autoencoder_config).
PRETRAINED_DOWNSAMPLE = {"sd-vae-ft-ema": 8, "sd-vae-ft-mse": 8, "ldm-f16d32": 16, "vavae-f16d32": 16}


def _fit_args(cfg: dict, kind: str) -> tuple[str, dict]:
    """(class name filling the slot, its fit() keywords: defaults overridden by prepare.<kind>)."""

    slot = dict(cfg["prepare"].get(kind) or {})
    use = slot.pop("use", kind)
    params = inspect.signature(ENCODERS.get(use).fit).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return use, {**defaults, **slot}


def _tokenizer_factor(cfg: dict) -> tuple[str, int] | None:
    """(tokenizer slot, its downsampling factor) of the run's latent, or None where it cannot be known
    before the artifact exists (a plugin latent or tokenizer)."""


    lat = cfg["method"]["latent"]
    param = inspect.signature(LATENTS.get(lat["name"]).__init__).parameters.get("tokenizer")
    kind = lat.get("tokenizer", param.default if param is not None else None)
    if not isinstance(kind, str) or kind not in ENCODERS or \
            (cfg["prepare"].get(kind) or {}).get("use", kind) not in ENCODERS:   # validate() names the bad slot
        return None
    use, args = _fit_args(cfg, kind)
    if "block_out_channels" in args:
        return kind, 2 ** (len(args["block_out_channels"]) - 1)
    return (kind, PRETRAINED_DOWNSAMPLE[use]) if use in PRETRAINED_DOWNSAMPLE else None


def _check_image_size(cfg: dict, patch: int | None) -> None:
    """data.image_size against the dataset (datasets.image_size_rule: padding, a memory-safe maximum),
    the texture tokenizer's downsampling factor f (the latent grid is image_size / f) and the backbone's
    patch size p (the token grid is image_size / f / p): a size that breaks any of them fails here."""

    size, d = cfg["data"]["image_size"], cfg["data"]
    rule = image_size_rule(d["name"], size)
    if rule:
        raise ConfigError(f"data.image_size={size}: {rule}")
    tok = _tokenizer_factor(cfg)
    if tok is None:
        return
    kind, f = tok
    if size % f:
        raise ConfigError(f"data.image_size={size} must be a multiple of {f}, the downsampling factor of the texture "
                          f"tokenizer prepare.{kind} (latent grid = image_size / {f})")
    if patch and (size // f) % patch:
        raise ConfigError(f"data.image_size={size} gives a {size // f}×{size // f} latent grid (÷{f} by prepare.{kind}), "
                          f"not divisible by the patch size {patch} of backbone {cfg['backbone']['name']!r}: use a "
                          f"multiple of {f * patch}")


EPOCH_TRAINED = ("texture-vae", "vavae", "fd-net")     # fit() draws batches with shuffled_batches (no replacement)


def _check_limits(cfg: dict, kinds: list[str], sizes: tuple[int, int] | None) -> None:
    """data.limit_train / limit_test against what prepare and evaluation need, and (with the dataset
    loaded: `sizes` = its train and test counts) against what exists, since a limit past the end would
    be silently shortened.

    The artifacts trained in epochs of distinct images (EPOCH_TRAINED) need one full batch of them at
    least (encoders/texture_vae.py shuffled_batches refuses fewer), from the half they train on when
    train_half is set (the others draw with replacement). The FD reference's real-data floor draws
    eval.num_samples training images and compares them with the test split, so a limit below
    eval.num_samples would put the floor at another N than the curves. These rules concern the limits
    the user chose; a dataset that is itself small (a test folder) is used as it is, and prepare's own
    message names an artifact whose batch it cannot fill."""
    d, e = cfg["data"], cfg["eval"]
    lt, ls = d["limit_train"], d["limit_test"]
    if sizes is not None:
        for split, limit, n in (("train", lt, sizes[0]), ("test", ls, sizes[1])):
            if limit is not None and limit > n:
                raise ConfigError(f"data.limit_{split}={limit} is more than the {n} {split} images of "
                                  f"{d['name']!r} (use ≤ {n}, or null for all)")
    for kind in kinds if lt is not None else ():
        use, args = _fit_args(cfg, kind)
        bs = args.get("batch_size")
        if use not in EPOCH_TRAINED or not isinstance(bs, int):
            continue
        half = args.get("train_half") in (0, 1)
        need = 2 * bs if half else bs
        if lt < need:
            raise ConfigError(f"data.limit_train={lt} is fewer than prepare.{kind} needs: one batch of "
                              f"prepare.{kind}.batch_size={bs} distinct training images"
                              f"{' from the half it trains on (train_half), so 2 × ' + str(bs) if half else ''}"
                              f"; use data.limit_train ≥ {need} or a smaller batch_size")
    if e["metric"] == "fd-net":
        for split, n in (("train", lt), ("test", ls)):
            if n is not None and n < e["num_samples"]:
                raise ConfigError(f"data.limit_{split}={n} is fewer than eval.num_samples={e['num_samples']}: the FD "
                                  f"reference's real-data floor compares eval.num_samples training images with the "
                                  f"test split (use data.limit_{split} ≥ {e['num_samples']} or fewer eval samples)")
