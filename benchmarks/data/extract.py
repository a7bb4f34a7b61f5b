"""Latent and feature extraction for image folders too large for memory (`data.stream: true`), one job per
GPU: the sharded twin of prepare's in-memory `build_encodings` + `build_latent_cache` (docs/paper_scale.md).

Its command (benchmarks/extract.py):

    python -m benchmarks.extract grid=NAME [profile=P] [rank=R world=W] [device=auto] [workers=8]
                                 [batch_size=64] [shard_images=8192] [key=value ...]
    python -m benchmarks.extract config=results/<grid>/<run>/config.yaml [rank=R world=W] ...

The train split is cut into shards of `shard_images` consecutive images; rank r of W encodes the shards
[r·K/W, (r+1)·K/W) (K shards), reading images with a DataLoader (workers, pinned memory, ADM crop):
the tokenizer's posterior sample with one seeded generator per image, and the semantic encoder's fp16
patch tokens when the latent needs them, each for the image and its horizontal flip; then it composes
the run's latents from its shards. Batches never cross a shard, so a shard's bytes do not depend on W.
A shard already on disk is skipped (a killed job resumes); whichever rank finds every shard written
after its own work merges: index.json, per-channel stats (10k random latents, docs/methods.md §5.2), info.json,
key.json and the COMPLETE marker, into the cache folders prepare would use (same names and keys).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from benchmarks.data.datasets import READ_WORKERS, ImageFolderDataset
from benchmarks.data.prepare import (FD_NET, STATS_SAMPLES, artifact_plan, build_latent, build_node, encodings_key,
                                     latent_key, load_artifacts, stream_cache_dirs)
from benchmarks.data.run_data import load_data, streamed
from benchmarks.data.shards import ShardWriter, map_shard, open_sharded, shard_file, shard_ok, write_index
from core.cache import MARKER, verify_dir, write_manifest
from core.config import ConfigError
from core.progress import track
from core.seed import generator
from core.types import to_unit
from encoders.base import read_json, write_json
from methods.latents import ENCODER

log = logging.getLogger(__name__)

SHARD_IMAGES = 8192     # ImageNet: 157 shards; per shard 268 MB of f16d32 latents and 3.2 GB of DINOv2-B tokens
                        # per flip, written through a memory map (never held in memory)
COMPOSE_CHUNK = 1024    # latents are composed in blocks starting every 1024 rows of a shard; a SemVAE sample
                        # is seeded by its block's first row, so any shard size that is a multiple of it gives
                        # the same latents


# ----------------------------------------------------------------------------- ranks, devices, seeds
def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int, int]:
    """(rank, world, local rank): rank=/world= given, else torchrun's RANK/WORLD_SIZE, else SLURM
    (tasks of a job step × tasks of a job array, the array numbered from SLURM_ARRAY_TASK_MIN), else (0, 1)."""
    env = os.environ
    if rank is None and world is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
        else:
            tasks, local = int(env.get("SLURM_NTASKS", "1")), int(env.get("SLURM_LOCALID", "0"))
            rank, world = int(env.get("SLURM_PROCID", "0")), tasks
            if "SLURM_ARRAY_TASK_ID" in env:
                first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
                count = int(env.get("SLURM_ARRAY_TASK_COUNT") or int(env["SLURM_ARRAY_TASK_MAX"]) - first + 1)
                rank, world = (int(env["SLURM_ARRAY_TASK_ID"]) - first) * tasks + rank, count * tasks
    else:
        local = 0
    if rank is None or world is None or not 0 <= rank < world:
        raise ConfigError(f"need 0 ≤ rank < world, got rank={rank} world={world} (give both rank= and world=)")
    return rank, world, local


def pick_device(name: str, local_rank: int) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():           # one visible GPU per task (--gpus-per-task=1) or LOCAL_RANK's
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def image_seed(split: int, index: int) -> int:
    """Seed of the posterior noise of training image `index` (split 0) or of its flip (split 1)."""
    return split << 32 | index


def compose_seed(split: int, start: int) -> int:
    """Seed of the latent builder's own noise (SemVAE) for the compose block starting at row `start`."""
    return (2 + split) << 32 | start


def posterior_sample(tokenizer: Any, x: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """(N, c, h, w) posterior sample of images x in [-1, 1], image i's noise drawn from gens[i] alone (CPU
    generators: diffusers draws one tensor per generator on the CPU), so the value of an image does not
    depend on its batch (pretrained VAEs split the list with their chunks, encoders/pretrained.py)."""
    return tokenizer.encode(x, generator=gens)


# ----------------------------------------------------------------------------- one sharded cache folder
@dataclass(eq=False)
class Target:
    """One cache folder being written shard by shard: files `<name>-<shard>.safetensors`."""

    folder: Path
    name: str                       # texture | tokens | train
    key_obj: dict

    def path(self, shard: int) -> Path:
        return self.folder / shard_file(self.name, shard)

    def done(self, shard: int, bounds: list[tuple[int, int]]) -> bool:
        return shard_ok(self.path(shard), *bounds[shard])

    @property
    def complete(self) -> bool:
        return (self.folder / MARKER).exists()

    def writer(self, shard: int, bounds: list[tuple[int, int]], first: dict[str, torch.Tensor]) -> ShardWriter:
        """A fresh writer for `shard`, laid out like the first block `first` ({key: (n, ...)}); stale temporary
        files of a killed attempt are removed."""
        for stale in self.folder.glob(self.path(shard).name + ".tmp*"):
            stale.unlink(missing_ok=True)
        start, stop = bounds[shard]
        specs = {k: (v.dtype, tuple(v.shape[1:])) for k, v in first.items()}
        return ShardWriter(self.path(shard), specs, stop - start, {"start": str(start), "stop": str(stop)})

    def claim(self, plan: dict) -> None:
        """Record what the shards are cut from (plan.json); refuse shards cut from another file list or size."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / "plan.json").exists():
            write_json(self.folder / "plan.json", plan)
        if read_json(self.folder / "plan.json") != plan:
            raise RuntimeError(f"{self.folder} was started from another file list or shard size "
                               f"({read_json(self.folder / 'plan.json')} vs {plan}); delete the folder to start over")


def shard_bounds(n: int, size: int) -> list[tuple[int, int]]:
    if size < 1:
        raise ConfigError(f"shard_images must be ≥ 1, got {size}")
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _suffixes(flips: bool) -> tuple[str, ...]:
    return ("", "_flip") if flips else ("",)


# ----------------------------------------------------------------------------- encode, compose, merge
@torch.no_grad()
def encode_shards(ds: ImageFolderDataset, bounds: list[tuple[int, int]], shards: range,
                  fns: dict[Target, Callable[[torch.Tensor, int, int], torch.Tensor]], device: torch.device, *,
                  batch_size: int, workers: int, flips: bool) -> None:
    """Write every missing shard of every target: fns[target](images (B,3,S,S) in [-1,1], index of the first,
    split) -> (B, ...) for the image (split 0) and its flip (split 1). One DataLoader over all missing shards."""
    todo = {s: [t for t in fns if not t.done(s, bounds)] for s in shards}
    todo = {s: ts for s, ts in todo.items() if ts}
    if not todo:
        return
    batches = [list(range(lo, min(lo + batch_size, bounds[s][1]))) for s in todo
               for lo in range(bounds[s][0], bounds[s][1], batch_size)]
    loader = iter(DataLoader(ds, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda"))
    for s, targets in track("extract: encoding shards", list(todo.items()), unit="shards"):   # core/progress.py
        t0, (start, stop) = time.time(), bounds[s]
        writers: dict[Target, ShardWriter] = {}
        for lo in range(start, stop, batch_size):
            x = to_unit(next(loader)[0].to(device, non_blocking=True))           # (B, 3, S, S) in [-1, 1]
            for t in targets:
                out = {f"{t.name}{sfx}": fns[t](x.flip(-1) if split else x, lo, split)
                       for split, sfx in enumerate(_suffixes(flips))}
                if t not in writers:
                    writers[t] = t.writer(s, bounds, out)
                writers[t].write(lo - start, out)
        for w in writers.values():
            w.commit()
        sec = time.time() - t0
        log.info("extract: %s shard %d (%d images, both flips: %s) in %.1fs, %.0f img/s", "+".join(t.name for t in targets),
                 s, stop - start, flips, sec, (stop - start) / max(sec, 1e-9))


@torch.no_grad()
def compose_shards(latent: Any, enc: dict[str, Target], target: Target, bounds: list[tuple[int, int]], shards: range,
                   labels: torch.Tensor, device: torch.device, flips: bool) -> None:
    """The run's latents (x1, x1_flip) and labels y for every missing shard, from the same shards of the
    encodings (read through memory maps), in blocks of COMPOSE_CHUNK rows as prepare composes in memory."""
    for s in track("extract: composing latent shards", shards, unit="shards"):
        if target.done(s, bounds):
            continue
        start, stop = bounds[s]
        tex = map_shard(enc[latent.tokenizer_kind].path(s))
        tok = map_shard(enc[ENCODER].path(s)) if ENCODER in enc else None
        writer = None
        for lo in range(0, stop - start, COMPOSE_CHUNK):
            hi = min(lo + COMPOSE_CHUNK, stop - start)
            out = {"y": labels[start + lo: start + hi]}
            for split, sfx in enumerate(_suffixes(flips)):
                x_tex = torch.from_numpy(tex[f"texture{sfx}"][lo:hi].copy()).to(device)        # (n, c, h, w)
                tokens = None if tok is None else torch.from_numpy(tok[f"tokens{sfx}"][lo:hi].copy()).to(device).float()
                out[f"x1{sfx}"] = latent.compose(x_tex, tokens, generator(compose_seed(split, start + lo), device))["x1"]
            writer = writer or target.writer(s, bounds, out)
            writer.write(lo, out)
        writer.commit()


def try_merge(t: Target, bounds: list[tuple[int, int]], finish: Callable[[Path], None] | None = None) -> bool:
    """Once every shard exists: index.json (+ `finish(folder)`), key.json and COMPLETE, under the cache
    folder's lock (the one core.cache uses), once. True when the folder is complete."""
    if t.complete:
        return True
    if not all(t.done(s, bounds) for s in range(len(bounds))):
        return False
    with FileLock(str(t.folder.parent / f".{t.folder.name}.lock")):
        if not t.complete:
            t0 = time.time()
            write_index(t.folder, t.name, bounds, shard_images=bounds[0][1] - bounds[0][0])
            if finish is not None:
                finish(t.folder)
            (t.folder / "key.json").write_text(json.dumps(t.key_obj, indent=2, sort_keys=True, default=str))
            write_manifest(t.folder)                  # core.cache: what every later open checks
            (t.folder / MARKER).write_text(f"{time.time() - t0:.1f}s merge\n")
            log.info("extract: %s complete (%d shards)", t.folder.name, len(bounds))
    return True


def latent_stats_and_info(latent: Any, enc: dict[str, Target]) -> Callable[[Path], None]:
    """The latent folder's stats.safetensors (prepare's recipe: 10k random rows, generator seed 0) and
    info.json (the in-memory fields), computed from the shards."""
    def finish(folder: Path) -> None:
        t0 = time.time()
        x1 = open_sharded(folder)["x1"]
        idx = torch.randperm(x1.shape[0], generator=generator(0))[:STATS_SAMPLES]
        mean, std = latent.stats_from(torch.from_numpy(x1.take(idx.numpy())))
        save_file({"mean": mean.float().contiguous(), "std": std.float().contiguous()}, str(folder / "stats.safetensors"))
        write_json(folder / "info.json", {"groups": list(latent.groups.names), "sizes": list(latent.groups.sizes),
                                          "shape": list(x1.shape[1:]),
                                          "aux": {k: enc[ENCODER].folder.name for k in latent.aux_keys},
                                          "seconds": round(time.time() - t0, 1)})
    return finish


# ----------------------------------------------------------------------------- the job
def stream_artifacts(cfg: dict, device: torch.device) -> dict[str, Path]:
    """The frozen artifacts a streamed run's latent needs ({kind: cache folder}), trained or loaded on the
    in-memory sample under prepare's locks (every rank asks; one builds). The FD network is left to training."""
    data = load_data(cfg)
    dirs: dict[str, Path] = {}
    for node in artifact_plan(cfg):
        if node.kind != FD_NET:
            for knob in ("fit_images", "max_images"):          # what the sample cannot give: say so, loudly
                if int(node.fit_cfg.get(knob, 0)) > data.train_x.shape[0]:
                    log.warning("prepare.%s.%s=%s, but a streamed dataset keeps %d training images in memory "
                                "(run_data.STREAM_SAMPLE): %s fits on those", node.kind, knob, node.fit_cfg[knob],
                                data.train_x.shape[0], node.kind)
            dirs[node.kind] = build_node(node, cfg, data, dirs, device)
    return dirs


def extract_run(cfg: dict, rank: int = 0, world: int = 1, device: torch.device | str = "cpu", *,
                batch_size: int = 64, workers: int = READ_WORKERS, shard_images: int = SHARD_IMAGES) -> Path:
    """This rank's share of a streamed run's encodings and latent cache; merges when it is the last.
    Returns the latent cache folder (complete once it holds COMPLETE)."""
    if not streamed(cfg):
        raise ConfigError("benchmarks.extract is for data.stream: true (prepare builds in-memory caches)")
    device = torch.device(device)
    dirs = stream_artifacts(cfg, device)
    enc_dirs, latent_dir = stream_cache_dirs(cfg, dirs)
    if (latent_dir / MARKER).exists():
        return verify_dir(latent_dir)             # damaged: CorruptFileError (delete it to extract again)
    latent = build_latent(cfg, load_artifacts(dirs, device))
    enc = {k: Target(d, "tokens" if k == ENCODER else "texture", encodings_key(cfg, dirs[k])) for k, d in enc_dirs.items()}
    lat = Target(latent_dir, "train", latent_key(cfg, enc_dirs, dirs))
    d = cfg["data"]
    ds = ImageFolderDataset(d["root"], d["image_size"], "train", limit=d["limit_train"])
    listing = "\n".join(f"{p.relative_to(ds.root).as_posix()}\t{y}" for p, y in ds.items)
    plan = {"rows": len(ds), "shard_images": shard_images, "files_sha1": hashlib.sha1(listing.encode()).hexdigest()}
    for t in (*enc.values(), lat):
        t.claim(plan)
    bounds = shard_bounds(len(ds), shard_images)
    mine = range(rank * len(bounds) // world, (rank + 1) * len(bounds) // world)
    log.info("extract rank %d/%d: shards %s of %d (%d images) for %s", rank, world, list(mine)[:1] + list(mine)[-1:],
             len(bounds), len(ds), latent_dir.name)
    tok, encoder = latent.tokenizer, latent.encoder
    fns: dict[Target, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
        enc[latent.tokenizer_kind]: lambda x, first, split: posterior_sample(
            tok, x, [generator(image_seed(split, first + i)) for i in range(x.shape[0])]).float()}
    if ENCODER in enc:
        fns[enc[ENCODER]] = lambda x, first, split: encoder.tokens(x).half()          # (B, T, D)
    encode_shards(ds, bounds, mine, fns, device, batch_size=batch_size, workers=workers, flips=d["flips"])
    compose_shards(latent, enc, lat, bounds, mine, ds.labels, device, d["flips"])
    if all([try_merge(t, bounds) for t in enc.values()]):      # (a list: try every folder)
        try_merge(lat, bounds, latent_stats_and_info(latent, enc))
    return latent_dir
