"""The sample side of the ADM protocol (docs/methods.md §9): balanced labels, the seed-42 shuffle, the `arr_0`
npz guided-diffusion's evaluator reads, per-rank shards and their merge, PNG folders. Scoring: adm_eval.py.
"""
from __future__ import annotations

import os
import random
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.data.datasets import IMAGE_EXTENSIONS
from core.errors import CorruptFileError

SHARD = re.compile(r"^samples_rank(\d+)\.npz$")



def balanced_labels(n: int, num_classes: int = 1000) -> np.ndarray:
    """Exactly n / num_classes labels per class (SFD: 50 per class for 50k), int64 (n,), class-ordered on
    purpose: a sampler draws them in this order and `pack_npz` shuffles the images afterwards (docs/methods.md §9)."""
    if n <= 0 or n % num_classes:
        raise ValueError(f"balanced labels need n to be a positive multiple of num_classes={num_classes}, got n={n}")
    return np.repeat(np.arange(num_classes, dtype=np.int64), n // num_classes)


def shuffle_order(n: int, seed: int = 42) -> np.ndarray:
    """The permutation SFD's shuffle script applies (`random.seed(seed); random.shuffle(files)`), as indices:
    class-ordered files would put whole classes into one IS split and bias IS (docs/methods.md §9)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return np.asarray(order, dtype=np.int64)


def _shuffled(images: np.ndarray, labels: np.ndarray | None, seed: int | None):
    if seed is None:
        return images, labels
    order = shuffle_order(images.shape[0], seed)
    return images[order], (None if labels is None else labels[order])


def _check_images(images: np.ndarray, where: str) -> None:  # what ADM's evaluator reads from arr_0
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{where}: expected uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz; a truncated, garbled or pickled file is one CorruptFileError naming it."""
    try:
        with np.load(path) as z:
            return dict(z)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError) as e:
        # what np.load and reading a member raise on a cut-short zip, a bad CRC, or an object (pickled) array
        raise CorruptFileError(f"{path} is not a readable npz ({type(e).__name__}: {str(e).splitlines()[0][:100]}); "
                               "re-download it, or write it again (benchmarks.evaluation.adm_npz.pack_npz)") from None


def _savez(path: Path, **arrays: np.ndarray) -> Path:
    """Uncompressed npz (ADM streams arr_0 from it), written to a temp file and renamed: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:               # a file object: np.savez appends no second ".npz"
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def pack_npz(images: np.ndarray, labels: np.ndarray | None, path: str | Path, shuffle_seed: int | None = 42) -> Path:
    """Write the npz the ADM evaluator reads: `arr_0` uint8 [N, H, W, 3], labels in `arr_1` (when given), images
    and labels shuffled together by `shuffle_order(N, shuffle_seed)` (None keeps the order). Peak memory ≈ 2× images."""
    _check_images(images, "pack_npz")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"pack_npz: {len(images)} images but {len(labels)} labels")
    images, labels = _shuffled(images, labels, shuffle_seed)
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels, np.int64)}
    return _savez(Path(path), **arrays)


def write_shard(images: np.ndarray, labels: np.ndarray, out_dir: str | Path, rank: int,
                index: np.ndarray | None = None) -> Path:
    """One rank's samples as `samples_rank{rank}.npz`: arr_0 images, arr_1 labels and, optionally, `index`
    (each sample's position in the global order), which makes the merged npz independent of the world size."""
    _check_images(images, f"write_shard(rank={rank})")
    arrays = {"arr_0": images, "arr_1": np.asarray(labels, np.int64)}
    return _savez(Path(out_dir) / f"samples_rank{rank}.npz",
                  **(arrays if index is None else {**arrays, "index": np.asarray(index, np.int64)}))


def read_shards(shard_dir: str | Path, expected: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All `samples_rank{r}.npz` of a folder as one (images, labels) in global order (by `index`, else by rank).
    A missing rank, a bad index or a count other than `expected` is an error: a crashed rank must not go unseen."""
    shard_dir = Path(shard_dir)
    files = {int(m.group(1)): p for p in shard_dir.glob("samples_rank*.npz") if (m := SHARD.match(p.name))}
    missing = sorted(set(range(max(files, default=-1) + 1)) - set(files))
    if not files or missing:
        raise FileNotFoundError(f"{shard_dir}: expected samples_rank0.npz .. samples_rank<R-1>.npz; "
                                f"{f'missing ranks {missing}' if files else 'none found'}")
    parts = [_read_npz(files[r]) for r in sorted(files)]
    images, labels = (np.concatenate([p[k] for p in parts]) for k in ("arr_0", "arr_1"))
    if expected is not None and len(images) != expected:
        raise ValueError(f"{shard_dir}: {len(images)} samples in {len(files)} shards, expected {expected}")
    if any("index" in p for p in parts):
        index = np.concatenate([p.get("index", np.full(len(p["arr_0"]), -1)) for p in parts])
        if not np.array_equal(np.sort(index), np.arange(len(index))):
            raise ValueError(f"{shard_dir}: shard indices are not a permutation of 0..{len(index) - 1} "
                             "(a shard lacks `index`, or a sample is duplicated or missing)")
        images, labels = images[np.argsort(index)], labels[np.argsort(index)]
    return images, labels


def merge_shards(shard_dir: str | Path, out_path: str | Path, shuffle_seed: int | None = 42,
                 expected: int | None = None) -> Path:
    """Merge a sharded sampler's `samples_rank{r}.npz` files into one shuffled ADM npz (`pack_npz`)."""
    return pack_npz(*read_shards(shard_dir, expected), out_path, shuffle_seed)


def read_png_folder(folder: str | Path) -> np.ndarray:
    """The images of a sampler's output folder (000000.png, ...) as uint8 [N, H, W, 3], sorted by file name.
    Nothing is resized: every image must have the size of the first."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    images = None
    for i, p in enumerate(files):
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"))                                 # (H, W, 3)
        images = np.empty((len(files), *arr.shape), np.uint8) if images is None else images
        if arr.shape != images.shape[1:]:
            raise ValueError(f"{p} is {arr.shape[1]}×{arr.shape[0]}, {files[0]} is {images.shape[2]}×{images.shape[1]}")
        images[i] = arr
    return images


def load_samples(path: str | Path, shuffle_seed: int | None = 42) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples to score: an ADM npz as it is, or a shard folder / image folder shuffled as `pack_npz` would,
    so that scoring a folder gives the numbers of scoring its packed npz (the IS splits follow the order)."""
    path = Path(path)
    if path.is_file():
        z = _read_npz(path)
        if "arr_0" not in z:
            raise ValueError(f"{path} has no arr_0 (keys: {', '.join(z)}); expected the ADM layout")
        images, labels = z["arr_0"], z.get("arr_1")
    elif path.is_dir():
        shards = any(SHARD.match(p.name) for p in path.iterdir())
        images, labels = _shuffled(*(read_shards(path) if shards else (read_png_folder(path), None)), shuffle_seed)
    else:
        raise FileNotFoundError(f"samples {path} does not exist (an npz, a folder of images or of samples_rank*.npz)")
    _check_images(images, str(path))
    return images, labels
