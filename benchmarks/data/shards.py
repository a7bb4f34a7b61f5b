"""Sharded cache folders: the on-disk format of a latent / feature cache too large to load whole
(written by benchmarks/extract.py, read by benchmarks/data/prepare.py and the training feed).

A sharded folder holds `<name>-<shard:05d>.safetensors`, each the rows [start, stop) of the train split
for every key of the cache (e.g. `texture` and `texture_flip`), and, once every shard exists, `index.json`
(rows, shard list, keys). The shards are plain safetensors files (safetensors.torch.load_file reads them),
written block by block through a memory map under a temporary name and renamed when complete, so a
shard never has to fit in memory and a killed job leaves no half shard behind. They are read through
numpy memory maps of the safetensors layout (8-byte little-endian header length, JSON header, raw
row-major data): a batch of random rows reads only those rows.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from core.errors import CorruptFileError
from encoders.base import read_json, write_json

INDEX = "index.json"
# safetensors dtype names <-> torch / numpy (the dtypes the caches use: fp32 latents, fp16 tokens, int64 labels)
ST_DTYPES = {"F32": (torch.float32, np.float32), "F16": (torch.float16, np.float16),
             "I64": (torch.int64, np.int64), "U8": (torch.uint8, np.uint8)}
ST_NAME = {t: name for name, (t, _) in ST_DTYPES.items()}


def shard_file(name: str, shard: int) -> str:
    return f"{name}-{shard:05d}.safetensors"


def read_header(path: Path) -> tuple[dict, int]:
    """(safetensors header, byte offset where the data starts); ValueError when it is not one."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
    if size == 0 or len(raw) != size:
        raise ValueError(f"{path}: truncated safetensors header")
    return json.loads(raw), 8 + size


def _views(buf: np.ndarray, header: dict, base: int) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file mapped into `buf` (a uint8 memmap of the file), no copy."""
    out = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        begin, end = spec["data_offsets"]
        out[key] = buf[base + begin: base + end].view(ST_DTYPES[spec["dtype"]][1]).reshape(spec["shape"])
    return out


def map_shard(path: Path) -> dict[str, np.ndarray]:
    """{key: read-only memory-mapped array} of one shard file."""
    header, base = read_header(path)
    return _views(np.memmap(path, np.uint8, "r"), header, base)


def shard_ok(path: Path, start: int, stop: int) -> bool:
    """A finished shard of rows [start, stop): in place (renamed, so complete when it was written),
    header readable, the rows it says, and as long as its header says (a truncated copy is redone)."""
    try:
        header, base = read_header(path)
        meta = header.get("__metadata__", {})
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        return (meta.get("start"), meta.get("stop")) == (str(start), str(stop)) and path.stat().st_size == base + end
    except (OSError, ValueError, KeyError):
        return False


class ShardWriter:
    """One shard file, filled row block by row block through a memory map under `<file>.tmp<pid>` and
    renamed into place by `commit` (atomic: the shard exists only when complete)."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], rows: int,
                 meta: dict[str, str]) -> None:
        self.path, self.rows = Path(path), rows
        self.tmp = self.path.with_name(f"{self.path.name}.tmp{os.getpid()}")
        header: dict = {"__metadata__": meta}
        offset = 0
        for key, (dtype, shape) in sorted(specs.items()):
            nbytes = rows * math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": ST_NAME[dtype], "shape": [rows, *shape], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)                      # data starts 8-byte aligned, as safetensors writes it
        with open(self.tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)              # sparse until written
        self._buf = np.memmap(self.tmp, np.uint8, "r+")
        self.views = _views(self._buf, header, 8 + len(raw))

    def write(self, row: int, tensors: dict[str, torch.Tensor]) -> None:
        """Rows [row, row + n) of every key (tensors (n, ...) on any device)."""
        for key, value in tensors.items():
            self.views[key][row: row + value.shape[0]] = value.detach().cpu().numpy()

    def commit(self) -> Path:
        self._buf.flush()                                  # msync: the data is on disk before the rename
        self.views = {}
        del self._buf
        os.replace(self.tmp, self.path)
        return self.path


class ShardedArray:
    """Rows [0, N) of one key over several shard files, memory-mapped: nothing is read until rows are
    taken. `shape` and `dtype` as a tensor's; `take(idx)` gathers rows in the order given."""

    def __init__(self, parts: list[np.ndarray], starts: list[int]) -> None:
        self.parts = parts
        self.starts = np.asarray(starts, dtype=np.int64)                  # (S,) first row of each shard
        self.shape = (int(sum(p.shape[0] for p in parts)), *parts[0].shape[1:])
        self.np_dtype = parts[0].dtype
        self.dtype = next(t for t, n in ST_DTYPES.values() if n == self.np_dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows idx (n,) -> (n, ...) numpy array (into `out` when given, e.g. a pinned buffer's view).
        Rows are read in ascending order, shard by shard (sequential reads where rows are close)."""
        idx = np.asarray(idx, dtype=np.int64)
        out = np.empty((idx.shape[0], *self.shape[1:]), self.np_dtype) if out is None else out
        if idx.size == 0:
            return out
        order = np.argsort(idx, kind="stable")
        shard = np.searchsorted(self.starts, idx[order], side="right") - 1         # (n,) shard of each, sorted
        cuts = np.flatnonzero(np.diff(shard)) + 1
        for group, s in zip(np.split(order, cuts), shard[np.r_[0, cuts]]):
            out[group] = self.parts[s][idx[group] - self.starts[s]]
        return out

    def numpy(self) -> np.ndarray:
        """Every row in memory (small caches and tests)."""
        return np.concatenate(self.parts)


def write_index(folder: Path, name: str, bounds: list[tuple[int, int]], **extra) -> dict:
    """index.json of a folder whose shards `<name>-<i>` hold rows bounds[i]; every shard must be finished."""
    folder = Path(folder)
    files = [shard_file(name, i) for i in range(len(bounds))]
    header, _ = read_header(folder / files[0])
    keys = {k: {"dtype": v["dtype"], "shape": v["shape"][1:]} for k, v in header.items() if k != "__metadata__"}
    index = {"rows": bounds[-1][1], "shards": [[f, a, b] for f, (a, b) in zip(files, bounds)], "keys": keys, **extra}
    write_json(folder / INDEX, index)
    return index


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / INDEX).exists()


def open_sharded(folder: Path) -> dict[str, ShardedArray]:
    """{key: ShardedArray} of a finished sharded folder; one memory map per shard file."""
    folder = Path(folder)
    index = read_json(folder / INDEX)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in index["keys"]}
    for file, _, _ in index["shards"]:
        try:
            views = map_shard(folder / file)
        except (OSError, ValueError, KeyError) as e:      # missing, truncated, garbled header
            raise CorruptFileError(f"{folder / file}: not a readable shard ({type(e).__name__}: {e}); "
                                   f"delete {folder} and rerun to rebuild it") from None
        for key, view in views.items():
            parts[key].append(view)
    starts = [start for _, start, _ in index["shards"]]
    return {key: ShardedArray(p, starts) for key, p in parts.items()}
