"""A run's data: what it is (`data_key`: name, size, limits and a content fingerprint, never the path, for every
cache key), and the images in memory (`load_data`; for a streamed folder the cached sample, `load_sample`).
Used by prepare (benchmarks/data/prepare.py), prepare_grid and the sharded extraction.
"""
from __future__ import annotations

import functools

from benchmarks.data.datasets import READ_WORKERS, cached_sample, check_streamable, fingerprint, load_dataset
from core.config import ConfigError
from core.types import ImageData

STREAM_SAMPLE = 10_000     # training images a streamed dataset keeps in memory for artifact fits (PCA and
                           # SemVAE fit on 10k images by default)


def streamed(cfg: dict) -> bool:
    """data.stream (configs resolved before the key existed, and hand-built ones, have no such key)."""
    return bool(cfg["data"].get("stream", False))


def data_key(cfg: dict) -> dict:
    """What the data is (name, size, limits, a content fingerprint), not where (data.root is left out, so a
    moved copy keeps its caches; datasets.fingerprint)."""
    d = cfg["data"]
    key = {"name": d["name"], "image_size": d["image_size"], "limit_train": d["limit_train"],
           "limit_test": d["limit_test"], "fingerprint": _fingerprint(d["name"], d.get("root"))}
    if streamed(cfg):
        key["stream"] = True
    return key


@functools.lru_cache(maxsize=None)
def _fingerprint(name: str, root: str | None) -> str:
    """Once per process and dataset (a folder walk for an ImageNet-sized tree takes seconds)."""
    try:
        return fingerprint(name, root)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None


def load_data(cfg: dict) -> ImageData:
    """The dataset in memory; for a streamed one, the cached sample (`load_sample`)."""
    if streamed(cfg):
        return load_sample(cfg)
    d = _checked_data(cfg)
    data = load_dataset(d["name"], d["root"], d["image_size"])
    for split, limit in (("train", d["limit_train"]), ("test", d["limit_test"])):
        if limit is not None:
            setattr(data, f"{split}_x", getattr(data, f"{split}_x")[:limit])
            setattr(data, f"{split}_y", getattr(data, f"{split}_y")[:limit])
    return data


def _checked_data(cfg: dict) -> dict:
    d = cfg["data"]
    for split in ("train", "test"):
        if d[f"limit_{split}"] is not None and d[f"limit_{split}"] < 1:
            raise ConfigError(f"data.limit_{split} must be ≥ 1 or null, got {d[f'limit_{split}']}")
    return d


def load_sample(cfg: dict, workers: int = READ_WORKERS) -> ImageData:
    """What a streamed folder keeps in memory: `STREAM_SAMPLE` random training images and the test split
    (datasets.sample_image_folder), cached as `<cache_dir>/sample-<hash>/`, read once by the first job."""
    d = _checked_data(cfg)
    try:
        check_streamable(d["name"], d["root"])             # the folder itself is scanned only to build it
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cached_sample(cfg["cache_dir"], {"data": data_key(cfg), "train_images": STREAM_SAMPLE}, d["root"],
                         d["image_size"], STREAM_SAMPLE, limit_train=d["limit_train"], limit_test=d["limit_test"],
                         workers=workers)
