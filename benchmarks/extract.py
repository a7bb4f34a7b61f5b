"""`python -m benchmarks.extract grid=NAME|config=FILE [rank=R world=W] ...` (`--help`: SPEC below): encode a
streamed image folder into the sharded caches, one job per GPU. The command only: the extraction is
benchmarks/data/extract.py.
"""
from __future__ import annotations

import json
import logging
import sys

from omegaconf import OmegaConf

from benchmarks.config.cli import Key, Spec, config_names, command, parse as parse_args
from benchmarks.config.grid import expand
from benchmarks.config.plugins import load_all
from benchmarks.config.validate import validate
from benchmarks.data.datasets import READ_WORKERS
from benchmarks.data.extract import SHARD_IMAGES, extract_run, pick_device, rank_world
from benchmarks.data.run_data import streamed
from core.cache import MARKER
from core.config import ConfigError, structured, to_dict


SPEC = Spec(
    prog="python -m benchmarks.extract",
    purpose="Encode a streamed image folder (data.stream: true) into the sharded latent and semantic-token caches "
            "that `benchmarks.run` then reads, one job per GPU: rank r of W encodes its share of the shards; the "
            "last rank to finish merges them (docs/paper_scale.md). A shard already on disk is skipped.",
    keys=(
        Key("grid", "extract every distinct cache of this grid (a name below, or a grid YAML file)",
            metavar="NAME", complete=config_names("grid")),
        Key("config", "extract the cache of one resolved run config (config.yaml of a run folder)", type="path",
            metavar="FILE"),
        Key("profile", "the profile (with grid=)", default="the grid's own", metavar="NAME",
            complete=config_names("profile")),
        Key("rank", "this job's rank (give world= too)", type="int", low=0,
            default="torchrun's RANK, SLURM's task id, or 0"),
        Key("world", "how many jobs share the work", type="int", low=1, default="torchrun's or SLURM's, or 1"),
        Key("device", "auto (this rank's GPU, else the CPU), cuda, cuda:1, cpu", default="auto"),
        Key("workers", "DataLoader processes that decode images", type="int", low=0, default="min(8, cores - 1)"),
        Key("batch_size", "images per encoder batch", type="int", low=1, default="64"),
        Key("shard_images", "images per shard (a multiple of 1024 keeps SemVAE latents independent of it)",
            type="int", low=1, default=str(SHARD_IMAGES)),
    ),
    one_of=(("grid", "config"),),
    overrides="any other key=value overrides that config key (OmegaConf dotlist, e.g. data.root=/data/imagenet).",
    names=(("grids", config_names("grid")), ("profiles", config_names("profile"))),
    examples=("python -m benchmarks.extract grid=sfd_vs_redi profile=imagenet256 data.root=/data/imagenet",
              "python -m benchmarks.extract config=results/g/sfd-s0/config.yaml rank=0 world=8 workers=7"),
)
OPTIONS = tuple(SPEC.key_names)


def parse(argv: list[str]) -> tuple[dict[str, str], list[dict]]:
    """(options, the distinct streamed run configs to extract): grid= expands a grid, config= reads one
    resolved run config (config.yaml of a run folder); other key=value pairs override every config."""
    args = parse_args(SPEC, argv)
    opts, dotlist = args.values, args.overrides
    if "grid" in opts:
        cfgs = [r.cfg for r in expand(opts["grid"], dotlist, profile=opts.get("profile")).runs]
    else:
        load_all()
        cfg = to_dict(structured(OmegaConf.load(opts["config"]), OmegaConf.from_dotlist(dotlist)))
        validate(cfg)
        cfgs = [cfg]
    unique = {json.dumps([c["data"], c["prepare"], c["method"]["latent"], c["cache_dir"]], sort_keys=True): c for c in cfgs}
    if not all(streamed(c) for c in unique.values()):
        raise ConfigError("data.stream is false: in-memory caches are built by `python -m benchmarks.run` (prepare)")
    return opts, list(unique.values())


def _int(opts: dict[str, str], key: str, default: int | None = None) -> int | None:
    """An integer option (rank=, world=, batch_size=, ...), or ConfigError naming it."""
    if key not in opts:
        return default
    try:
        return int(opts[key])
    except ValueError:
        raise ConfigError(f"{key}={opts[key]}: not an integer") from None


@command(spec=SPEC)
def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    opts, cfgs = parse(argv)
    rank, world, local = rank_world(_int(opts, "rank"), _int(opts, "world"))
    sizes = {k: _int(opts, k, v) for k, v in (("batch_size", 64), ("workers", READ_WORKERS),
                                              ("shard_images", SHARD_IMAGES))}
    device = pick_device(opts.get("device", "auto"), local)
    for cfg in cfgs:
        out = extract_run(cfg, rank, world, device, **sizes)
        state = "complete" if (out / MARKER).exists() else "this rank's shards written; merged by the last rank"
        print(f"rank {rank}/{world}: {out}  ({state})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
