"""Fashion-MNIST, the tiny profile's dataset: its IDX files (gzip or raw, checked by content), where they are looked
for, and the padded uint8 images (N, 1, S, S). The dataset registry and the image-folder readers are datasets.py.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from core.errors import CorruptFileError
from core.types import ImageData

# Magic numbers of the IDX format (big-endian int32): 0x00000803 = ubyte, 3 dims; 0x00000801 = ubyte, 1 dim.
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049

FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
FASHION_HINT = ("apt-get install dataset-fashion-mnist, or pass data.root=DIR holding train-images-idx3-ubyte[.gz], "
                "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] "
                "(from https://github.com/zalandoresearch/fashion-mnist)")


def _corrupt(path: Path, problem: str) -> CorruptFileError:
    return CorruptFileError(f"{path}: {problem}; the Fashion-MNIST file is damaged: reinstall it "
                            f"(apt-get install --reinstall dataset-fashion-mnist) or point data.root at a good copy")


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzip-compressed or raw): images (N, H, W) or labels (N,), uint8.

    Raises core.errors.CorruptFileError (one line: the file, the problem, the fix) on a truncated or
    garbled gzip stream, an unknown magic number or a size that does not match the header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:    # BadGzipFile is an OSError; a cut stream an EOFError
            raise _corrupt(path, f"gzip stream unreadable ({str(e).splitlines()[0] or type(e).__name__})") from None
    elif path.suffix == ".gz":
        raise _corrupt(path, "named .gz but not gzip data")
    if len(raw) < 8:
        raise _corrupt(path, f"{len(raw)} bytes, shorter than an IDX header")
    magic = int.from_bytes(raw[0:4], "big")
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise _corrupt(path, f"magic number {magic} is not an IDX ubyte file "
                             f"(expected {IDX_IMAGES_MAGIC} for images or {IDX_LABELS_MAGIC} for labels)")
    ndim = magic & 0xFF  # the low byte of the magic number is the number of dimensions
    offset = 4 + 4 * ndim  # 16 for images, 8 for labels
    if len(raw) < offset:
        raise _corrupt(path, f"{len(raw)} bytes, shorter than its {offset}-byte IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise _corrupt(path, f"header says {dims} ({expected} bytes) but the file holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


FASHION_SHAPE = (28, 28)
FASHION_CLASSES = 10


def _check_fashion(paths: dict[str, Path], arrays: dict[str, np.ndarray]) -> None:
    """What the loader assumes of the four files beyond each being a valid IDX file: images are (N, 28, 28),
    labels (N,), the two counts of a split agree, labels lie in [0, 10)."""
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or tuple(x.shape[1:]) != FASHION_SHAPE:
            raise _corrupt(paths[f"{split}_x"], f"images of shape {list(x.shape)}, expected [N, 28, 28]")
        if y.ndim != 1:
            raise _corrupt(paths[f"{split}_y"], f"labels of shape {list(y.shape)}, expected [N]")
        if x.shape[0] != y.shape[0]:
            raise _corrupt(paths[f"{split}_y"], f"{y.shape[0]} labels for the {x.shape[0]} images of "
                                                f"{paths[f'{split}_x'].name}")
        if y.size and int(y.max()) >= FASHION_CLASSES:
            bad = int((y >= FASHION_CLASSES).sum())
            raise _corrupt(paths[f"{split}_y"], f"{bad} labels outside [0, {FASHION_CLASSES}) (max {int(y.max())})")


def _fashion_candidates(root: str | None) -> list[Path]:
    """Directories that may hold the Fashion-MNIST IDX files, in search order."""
    if root is not None:
        return [Path(root).expanduser(), Path(root).expanduser() / "fashion-mnist"]
    dirs = []
    if os.environ.get("SEMPRIOR_DATA"):
        dirs.append(Path(os.environ["SEMPRIOR_DATA"]).expanduser() / "fashion-mnist")
    dirs += [Path("/usr/share/datasets/fashion-mnist"), Path("~/.cache/semprior/fashion-mnist").expanduser()]
    return dirs


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_paths(root: str | None) -> dict[str, Path]:
    """The four IDX files of the first candidate directory that holds all of them, or a one-line error
    saying where it looked."""
    looked = _fashion_candidates(root)
    for directory in looked:
        paths = {k: _find_idx(directory, stem) for k, stem in FASHION_FILES.items()}
        if all(p is not None for p in paths.values()):
            return paths
    raise FileNotFoundError(f"Fashion-MNIST not found in {', '.join(map(str, looked))}; {FASHION_HINT}")


def load_fashion_mnist(root: str | None = None, pad_to: int = 32) -> ImageData:
    """Fashion-MNIST as uint8 (N, 1, pad_to, pad_to), zero-padded symmetrically from 28×28.

    Args:
        root: directory holding the four IDX files (.gz or raw); None searches $SEMPRIOR_DATA/fashion-mnist,
            /usr/share/datasets/fashion-mnist and ~/.cache/semprior/fashion-mnist.
        pad_to: output side; 32 adds a 2-pixel border of value 0 so that three ×2 downsamplings divide it.
    """
    if pad_to < 28 or (pad_to - 28) % 2:
        raise ValueError(f"pad_to must be 28 + an even number of pixels, got {pad_to}")
    paths = fashion_paths(root)
    arrays = {k: read_idx(p) for k, p in paths.items()}
    _check_fashion(paths, arrays)
    pad = (pad_to - 28) // 2

    def images(a: np.ndarray) -> torch.Tensor:
        a = np.pad(a, ((0, 0), (pad, pad), (pad, pad)))  # (N, pad_to, pad_to), border value 0
        return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)  # (N, 1, pad_to, pad_to)

    return ImageData(name="fashion-mnist",
                     train_x=images(arrays["train_x"]), train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
                     test_x=images(arrays["test_x"]), test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
                     num_classes=10)
