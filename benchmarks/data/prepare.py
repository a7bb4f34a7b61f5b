"""Stage 2 of a grid (docs/architecture.md, "The stages of a grid"): train or load every frozen artifact a run needs, then encode the
training set (and its horizontal flips) into a latent cache with per-channel statistics.

Everything is cached under `<cache_dir>/<kind>-<hash of what made it>/`, built once under a file lock
and shared by every run of every grid that needs the same thing. Diffusion jobs never run a frozen
encoder per step: they read only the latent cache. A streamed dataset (`data.stream: true`, a folder too
large for memory) keeps only a sample in memory; its encodings and latent cache are the same folders,
sharded, written by benchmarks/extract.py (docs/paper_scale.md).
"""
from __future__ import annotations

import inspect
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from benchmarks.data.run_data import data_key, load_data, streamed
from benchmarks.data.shards import is_sharded, open_sharded
from core.cache import MARKER, cache_key, cached_dir, read_safetensors, verify_dir
from core.config import ConfigError
from core.progress import track
from core.registry import ENCODERS, LATENTS
from core.seed import generator
from core.types import ImageData, to_unit
from encoders.base import read_json, write_json
from methods.latents import ENCODER   # the semantic slot's kind: one definition, next to the latents that read it

log = logging.getLogger(__name__)

FD_NET = "fd-net"          # the profile's FD feature network (never the semantic encoder)
BUILD_KEY = "seed"         # prepare.seed: the artifact-build index (a reserved key of `prepare`, not a kind)
BUILD_STRIDE = 1000        # build b adds 1000 * b to each artifact's fit seed
MAX_BUILD = 999_999        # fit seeds stay below core/seed.py's 2**31 - 1 fold for base seeds up to ~1.1e9
STATS_SAMPLES = 10_000     # per-channel stats from 10k random latents (docs/methods.md §5.2)


@dataclass
class Prepared:
    data: ImageData
    artifact_dirs: dict[str, Path]
    latent_dir: Path
    artifacts: dict[str, Any] = field(default_factory=dict)   # loaded on request

    def summaries(self) -> dict[str, dict]:
        return {k: read_json(d / "summary.json") for k, d in self.artifact_dirs.items()}


# ----------------------------------------------------------------------------- planning
def latent_requires(latent_cfg: dict) -> tuple[str, ...]:
    cls = LATENTS.get(latent_cfg["name"])
    keys = {k: v for k, v in latent_cfg.items() if k != "name"}
    return tuple(cls.requires_for(**keys))


def eval_kinds(cfg: dict) -> tuple[str, ...]:
    """Artifacts the evaluation needs: the FD network on the small profiles; none with eval.metric=adm
    (Inception and the ADM reference batch are files, not artifacts)."""
    return (FD_NET,) if cfg.get("eval", {}).get("metric", "fd-net") == "fd-net" else ()


def artifact_order(kinds: tuple[str, ...], prepare_cfg: dict | None = None) -> list[str]:
    """Kinds plus everything they require, dependencies first. A slot's requirements are those of the
    class that fills it (`prepare.<kind>.use`), e.g. a pretrained VA-VAE needs no semantic encoder."""
    order: list[str] = []
    prepare_cfg = prepare_cfg or {}

    def visit(kind: str, path: tuple[str, ...]) -> None:
        if kind in order:
            return
        if kind in path:
            raise ConfigError(f"artifact dependency cycle: {' -> '.join(path + (kind,))}")
        for dep in ENCODERS.get((prepare_cfg.get(kind) or {}).get("use", kind)).requires:
            visit(dep, path + (kind,))
        order.append(kind)

    for k in kinds:
        visit(k, ())
    return order


# ----------------------------------------------------------------------------- artifact builds
# The artifact build (texture VAE, semantic encoder, PCA, SemVAE, ...) moves FDs more than training seeds
# do (issue 17), so a grid replicates over builds with `prepare.seed` as an axis, like `seed`:
#   axes: {prepare.seed: [0, 1], seed: [0, 1]}    # 2 artifact builds x 2 training seeds per method
# Build b != 0 adds BUILD_STRIDE * b to the fit seed (configured, else fit()'s default) of every artifact
# whose fit() takes a `seed`; artifacts without one (pretrained weights such as "dinov2") are the same in
# every build. The FD network is never rebuilt: it is the evaluation's ruler, and FDs measured with
# different rulers could not be compared or pooled across builds. Build 0 changes nothing at all (no key,
# no seed, no folder name moves), so every existing cache, run id and reference result stays valid.
def check_build(value: Any) -> int:
    """prepare.seed as an int in [0, MAX_BUILD], or ConfigError (a bool is refused: true/false are typos)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BUILD:
        raise ConfigError(f"prepare.seed must be an integer in [0, {MAX_BUILD}] (the artifact-build index; "
                          f"docs/grids.md), got {value!r}")
    return value


def prepare_build(cfg: dict) -> int:
    """The run's artifact-build index (prepare.seed; 0 when absent, as in every config made before it)."""
    return check_build((cfg.get("prepare") or {}).get(BUILD_KEY, 0))


def canonical_prepare(cfg: dict) -> dict:
    """Drop `prepare.seed: 0` from a resolved config in place: build 0 is the config as it was before the key
    existed, so its run hash (the run id) is the same whether or not prepare.seed=0 was written."""
    value = (cfg.get("prepare") or {}).get(BUILD_KEY)
    if value is not None and check_build(value) == 0:      # (check first: `false == 0` is no build 0)
        del cfg["prepare"][BUILD_KEY]
    return cfg


def _build_fit_cfg(kind: str, cls: Any, fit_cfg: dict, build: int) -> dict:
    """fit() keywords of one artifact in build `build` (see the comment above: FD_NET and seedless classes
    are unchanged; build 0 returns fit_cfg itself, so its cache key is exactly the old one)."""
    if build == 0 or kind == FD_NET:
        return fit_cfg
    param = inspect.signature(cls.fit).parameters.get("seed")
    if param is None:
        return fit_cfg
    base = fit_cfg.get("seed", 0 if param.default is inspect.Parameter.empty else param.default)
    return {**fit_cfg, "seed": int(base) + BUILD_STRIDE * build}


# ----------------------------------------------------------------------------- building
@dataclass
class Node:
    """One artifact to build: its slot (kind), the class that fills it, fit() keywords, cache key."""

    kind: str
    cls: Any
    fit_cfg: dict
    key_obj: dict

    @property
    def name(self) -> str:
        return cache_key(self.kind, self.key_obj)


def artifact_plan(cfg: dict) -> list[Node]:
    """The artifacts a run needs, dependencies first; each key holds its dependencies' keys. With
    prepare.seed = b != 0 the seeded artifacts other than the FD network get fit seed + 1000 b (their keys,
    and so their dependents' keys and the latent cache's, change; the FD network's does not)."""
    names: dict[str, str] = {}
    nodes = []
    build = prepare_build(cfg)
    for kind in artifact_order(latent_requires(cfg["method"]["latent"]) + eval_kinds(cfg), cfg["prepare"]):
        fit_cfg = dict(cfg["prepare"].get(kind, {}))
        # `use` fills a slot with another registered class, e.g. the semantic-encoder slot with the
        # pretrained timm DINOv2 ("dinov2") at paper scale; every consumer still reads the slot's name.
        use = fit_cfg.pop("use", kind)
        cls = ENCODERS.get(use)
        fit_cfg = _build_fit_cfg(kind, cls, fit_cfg, build)
        key_obj = {"kind": kind, "fit": fit_cfg, "data": data_key(cfg), "deps": {d: names[d] for d in cls.requires}}
        if use != kind:
            key_obj["use"] = use
        node = Node(kind, cls, fit_cfg, key_obj)
        names[kind] = node.name
        nodes.append(node)
    return nodes


def build_node(node: Node, cfg: dict, data: ImageData, dirs: dict[str, Path], device: torch.device) -> Path:
    """Train (or find cached) one artifact; `dirs` holds its finished dependencies."""
    def build(tmp: Path) -> None:
        deps = {d: artifact_class(dirs[d]).load(dirs[d], device) for d in node.cls.requires}
        t0 = time.time()
        log.info("prepare: training %s %s", node.kind, node.fit_cfg)
        art = node.cls.fit(data, deps, device, **node.fit_cfg)
        art.save(tmp)
        log.info("prepare: %s done in %.1fs: %s", node.kind, time.time() - t0, art.summary())

    return cached_dir(cfg["cache_dir"], node.kind, node.key_obj, build)


def build_artifacts(cfg: dict, data: ImageData, device: torch.device) -> dict[str, Path]:
    dirs: dict[str, Path] = {}
    for node in artifact_plan(cfg):
        dirs[node.kind] = build_node(node, cfg, data, dirs, device)
    return dirs


def load_artifacts(dirs: dict[str, Path], device: torch.device) -> dict[str, Any]:
    return {kind: artifact_class(d).load(d, device) for kind, d in dirs.items()}


def artifact_class(art_dir: Path) -> Any:
    """The class that built a cached artifact (key.json records `use` when a slot holds another class)."""
    key = read_json(Path(art_dir) / "key.json")
    return ENCODERS.get(key.get("use", key["kind"]))


def build_latent(cfg: dict, artifacts: dict[str, Any]):
    latent_cfg = dict(cfg["method"]["latent"])
    return LATENTS.build(latent_cfg, artifacts=artifacts)



@torch.no_grad()
def _batched(fn, x: torch.Tensor, device: torch.device, seed: int, batch: int = 500, stage: str = "encoding") -> torch.Tensor:
    """fn(x_chunk on device, generator) over chunks of x, one generator for the whole pass, output on CPU.
    Progress (core/progress.py) is reported per chunk under `stage`."""
    gen = generator(seed, device)
    starts = range(0, x.shape[0], batch)
    return torch.cat([fn(x[i:i + batch].to(device), gen).cpu() for i in
                      track(stage, starts, unit=f"chunks of {batch} images")])


def _splits(cfg: dict, data: ImageData) -> dict[str, torch.Tensor]:
    """uint8 training images, and their horizontal flips when the profile caches flips."""
    out = {"": data.train_x}
    if cfg["data"]["flips"]:
        out["_flip"] = data.train_x.flip(-1)
    return out


def encodings_key(cfg: dict, art_dir: Path) -> dict:
    """Cache key of one network's encodings of the training set (in memory or sharded)."""
    return {"artifact": Path(art_dir).name, "data": data_key(cfg), "flips": cfg["data"]["flips"]}


def encoding_kinds(cfg: dict) -> tuple[str, ...]:
    """The artifacts whose encodings a run's latent is composed from: its tokenizer, and the semantic
    encoder when the latent or its aux targets use tokens (the builder's `tokenizer_kind`, `uses_tokens`)."""
    req = latent_requires(cfg["method"]["latent"])
    return (req[0],) + ((ENCODER,) if ENCODER in req else ())


def latent_key(cfg: dict, enc: dict[str, Path], dirs: dict[str, Path]) -> dict:
    """Cache key of a run's latent cache: the latent config, the encodings and artifacts it is made from."""
    return {"latent": cfg["method"]["latent"], "encodings": {k: Path(d).name for k, d in enc.items()},
            "artifacts": {k: Path(d).name for k, d in dirs.items() if k != FD_NET}}


def _in_memory_only(cfg: dict, what: str) -> None:
    if streamed(cfg):
        raise ConfigError(f"{what}: data.stream is true, so this cache is sharded and written by "
                          "`python -m benchmarks.extract` (docs/paper_scale.md), not built in memory")


def build_encodings(cfg: dict, data: ImageData, kind: str, art_dir: Path, device: torch.device) -> Path:
    """Run one frozen network over the training set (and flips) once: texture latents (posterior samples,
    fixed seeds) for a tokenizer, fp16 patch tokens for the semantic encoder. Shared by every latent builder."""
    _in_memory_only(cfg, f"encodings of {kind}")
    key_obj = encodings_key(cfg, art_dir)

    def build(tmp: Path) -> None:
        art = artifact_class(art_dir).load(art_dir, device)
        t0 = time.time()
        if kind == ENCODER:
            fn, name = (lambda x, g: art.tokens(to_unit(x)).half()), "tokens"
        else:
            fn, name = (lambda x, g: art.encode(to_unit(x), generator=g).float()), "texture"
        tensors = {f"{name}{sfx}": _batched(fn, imgs, device, seed=i, stage=f"{kind} encoding" + (" (flips)" if sfx else ""))
                   for i, (sfx, imgs) in enumerate(_splits(cfg, data).items())}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        log.info("prepare: %s encodings %s in %.1fs", kind, list(next(iter(tensors.values())).shape), time.time() - t0)

    return cached_dir(cfg["cache_dir"], f"enc-{kind}", key_obj, build)


def build_latent_cache(cfg: dict, data: ImageData, dirs: dict[str, Path], device: torch.device) -> Path:
    """Compose the run's latents from the cached encodings; per-channel stats from 10k of them."""
    _in_memory_only(cfg, "latent cache")
    arts = load_artifacts({k: d for k, d in dirs.items() if k != FD_NET}, device)
    latent = build_latent(cfg, arts)
    enc = {latent.tokenizer_kind: build_encodings(cfg, data, latent.tokenizer_kind, dirs[latent.tokenizer_kind], device)}
    if latent.uses_tokens:
        enc[ENCODER] = build_encodings(cfg, data, ENCODER, dirs[ENCODER], device)
    key_obj = latent_key(cfg, enc, dirs)

    def build(tmp: Path) -> None:
        t0 = time.time()
        tex = read_safetensors(enc[latent.tokenizer_kind] / "texture.safetensors")
        tok = read_safetensors(enc[ENCODER] / "tokens.safetensors") if ENCODER in enc else {}
        tensors = {"y": data.train_y.long()}

        def compose_split(i: int, sfx: str) -> torch.Tensor:
            x_tex, tokens = tex[f"texture{sfx}"], tok.get(f"tokens{sfx}")
            gen = generator(100 + i, device)      # one generator per split: the splits are independent
            return torch.cat([
                latent.compose(x_tex[j:j + 1000].to(device), None if tokens is None else
                               tokens[j:j + 1000].to(device).float(), gen)["x1"].cpu()
                for j in track("latent cache" + (" (flips)" if sfx else ""), range(0, x_tex.shape[0], 1000), unit="chunks of 1000")])

        # The images and their flips in two threads: each split draws from its own generator with the same
        # intra-op threads, so the result is bit-identical to one after the other (tests/test_prepare_seed.py),
        # and a cache built last (SFD's SemVAE pass, ≈ 70 s on the tiny profile) no longer leaves a core idle.
        splits = list(_splits(cfg, data))
        with ThreadPoolExecutor(max_workers=len(splits)) as pool:
            for sfx, x1 in zip(splits, pool.map(compose_split, range(len(splits)), splits)):
                tensors[f"x1{sfx}"] = x1
        idx = torch.randperm(tensors["x1"].shape[0], generator=generator(0))[:STATS_SAMPLES]
        mean, std = latent.stats_from(tensors["x1"][idx])
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "train.safetensors"))
        save_file({"mean": mean.float().contiguous(), "std": std.float().contiguous()}, str(tmp / "stats.safetensors"))
        write_json(tmp / "info.json", {"groups": list(latent.groups.names), "sizes": list(latent.groups.sizes),
                                       "shape": list(tensors["x1"].shape[1:]),
                                       "aux": {k: enc[ENCODER].name for k in latent.aux_keys},
                                       "seconds": round(time.time() - t0, 1)})
        log.info("prepare: latent cache %s in %.1fs", list(tensors["x1"].shape), time.time() - t0)

    return cached_dir(cfg["cache_dir"], "latents", key_obj, build)


def stream_cache_dirs(cfg: dict, dirs: dict[str, Path]) -> tuple[dict[str, Path], Path]:
    """Where a streamed run's sharded encodings ({kind: folder}) and latent cache live (names as in memory)."""
    root = Path(cfg["cache_dir"])
    enc = {k: root / cache_key(f"enc-{k}", encodings_key(cfg, dirs[k])) for k in encoding_kinds(cfg)}
    return enc, root / cache_key("latents", latent_key(cfg, enc, dirs))


def prepare_run(cfg: dict, device: torch.device | str = "cpu") -> Prepared:
    """Everything `train` needs, built once and cached; cheap when the caches exist. A streamed dataset's
    latent cache must have been extracted (benchmarks/data/extract.py; benchmarks/data/prepare_grid.py does it on one machine)."""
    device = torch.device(device)
    data = load_data(cfg)
    dirs = build_artifacts(cfg, data, device)
    if streamed(cfg):
        latent_dir = stream_cache_dirs(cfg, dirs)[1]
        if not (latent_dir / MARKER).exists():
            raise FileNotFoundError(f"sharded latent cache {latent_dir} is not extracted yet: run `python -m "
                                    "benchmarks.extract grid=<grid>` (one job per GPU; docs/paper_scale.md)")
        verify_dir(latent_dir)               # written by extract: nothing here can rebuild it, so refuse damage
    else:
        latent_dir = build_latent_cache(cfg, data, dirs, device)
    return Prepared(data=data, artifact_dirs=dirs, latent_dir=latent_dir)


def load_latent_cache(latent_dir: Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """(train tensors incl. aux targets, mean (1,C,1,1), std (1,C,1,1)) from a finished latent cache.

    A sharded cache (benchmarks/extract.py) gives `shards.ShardedArray`s (memory-mapped, read row by row
    by the feed) for x1/x1_flip and the aux targets, and the labels y as a tensor.
    """
    latent_dir = Path(latent_dir)
    verify_dir(latent_dir)                   # (a quick check; prepare_run has rebuilt a damaged in-memory one)
    stats = read_safetensors(latent_dir / "stats.safetensors")
    aux = read_json(latent_dir / "info.json")["aux"]
    for enc_dir in set(aux.values()):
        verify_dir(latent_dir.parent / enc_dir)
    if is_sharded(latent_dir):
        tensors: dict[str, Any] = open_sharded(latent_dir)
        tensors["y"] = torch.from_numpy(tensors["y"].numpy()).long()
        for enc_dir in set(aux.values()):
            tensors.update(open_sharded(latent_dir.parent / enc_dir))
        return tensors, stats["mean"], stats["std"]
    tensors = read_safetensors(latent_dir / "train.safetensors")
    for key, enc_dir in aux.items():
        # aux targets live once in the encodings cache next door (the REPA tokens are ~0.5 GB per split)
        tensors.update(read_safetensors(latent_dir.parent / enc_dir / f"{key}.safetensors"))
    return tensors, stats["mean"], stats["std"]
