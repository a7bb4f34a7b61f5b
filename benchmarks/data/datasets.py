"""Image datasets for the profiles: the registry by name, ImageFolder trees (small, imagenet256); Fashion-MNIST
from IDX files (tiny) is fashion_mnist.py.

Images are kept as uint8 (N, C, H, W); the VAEs map them to [-1, 1] with `core.types.to_unit`.
The folder readers use the ADM center crop of guided-diffusion / DiT (docs/methods.md §0.2).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, Subset

from benchmarks.data.fashion_mnist import fashion_paths, load_fashion_mnist
from core.cache import cached_dir, read_safetensors
from core.errors import CorruptFileError
from core.types import ImageData

# ---------------------------------------------------------------------------------------------------
# Image folders (class subfolders) with the ADM center crop
# ---------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
TEST_FRACTION = 0.1  # held-out share when the folder has no train/val split


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """ADM center crop (docs/methods.md §0.2): box-halve while short side ≥ 2·size, bicubic short side → size, center crop.

    Returns an RGB uint8 array (size, size, 3).
    """
    image = image.convert("RGB")
    # Halving with a box filter first avoids the aliasing a single large bicubic downscale would add.
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)  # (H, W, 3)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def _class_files(directory: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """(file, class index) for every image under directory/<class>/ (recursively), sorted for determinism."""
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (directory / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        items += [(p, label) for p in files]
    return items


def scan_image_folder(root: str | Path, split_dirs: tuple[str, str] = ("train", "val")
                      ) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Find classes and files: (sorted class names, {"train": [(path, label)], "test": [...]}).

    With root/<split_dirs[0]> and root/<split_dirs[1]> present, those are the splits (class names from the
    train folder); otherwise every class subfolder of root is used and a deterministic 10% becomes "test".
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; pass data.root=DIR with one subfolder per class")
    train_dir, test_dir = (root / d for d in split_dirs)
    has_split = train_dir.is_dir() and test_dir.is_dir()
    class_root = train_dir if has_split else root
    classes = sorted(p.name for p in class_root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class subfolders in {class_root}; expected {class_root}/<class>/<image>")
    if has_split:
        splits = {"train": _class_files(train_dir, classes), "test": _class_files(test_dir, classes)}
    else:
        items = _class_files(root, classes)
        order = np.random.RandomState(0).permutation(len(items))  # fixed seed: the same split on every machine
        n_test = int(len(items) * TEST_FRACTION) if len(items) >= 2 else 0
        test_idx = set(order[:n_test].tolist())
        splits = {"train": [it for i, it in enumerate(items) if i not in test_idx],
                  "test": [it for i, it in enumerate(items) if i in test_idx]}
    if not splits["train"]:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {class_root}/<class>/")
    return classes, splits


def read_cropped(path: Path, size: int) -> np.ndarray:
    """One image file, ADM-center-cropped to (size, size, 3) uint8; an unreadable or truncated image is a
    one-line CorruptFileError naming it (PIL's own error would come from deep inside a DataLoader)."""
    try:
        with Image.open(path) as im:
            return center_crop_adm(im, size)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:   # PIL's decode failures
        raise CorruptFileError(f"{path}: not a readable image ({str(e).splitlines()[0] or type(e).__name__}); "
                               "replace or delete it, or point data.root at a good copy") from None


def _read_all(items: list[tuple[Path, int]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.zeros((len(items), 3, size, size), dtype=np.uint8)  # (N, 3, S, S)
    for i, (path, _) in enumerate(items):
        x[i] = read_cropped(path, size).transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return torch.from_numpy(x), y


def load_image_folder(root: str | Path, image_size: int, split_dirs: tuple[str, str] = ("train", "val")) -> ImageData:
    """An ImageFolder tree read into memory as RGB uint8 (N, 3, S, S), ADM-center-cropped (small profile)."""
    classes, splits = scan_image_folder(root, split_dirs)
    train_x, train_y = _read_all(splits["train"], image_size)
    test_x, test_y = _read_all(splits["test"], image_size)
    return ImageData(name=f"folder-{Path(root).name}", train_x=train_x, train_y=train_y,
                     test_x=test_x, test_y=test_y, num_classes=len(classes))


class ImageFolderDataset(Dataset):
    """Streaming version of `load_image_folder` for folders too large for memory (paper-scale profile).

    Yields (uint8 tensor (3, S, S), int label); same classes, splits and crop as `load_image_folder`.
    `limit` keeps only the first N items of the split (data.limit_train / data.limit_test).
    """

    def __init__(self, root: str | Path, image_size: int, split: str = "train",
                 split_dirs: tuple[str, str] = ("train", "val"), limit: int | None = None) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root).expanduser()
        self.classes, splits = scan_image_folder(root, split_dirs)
        self.items = splits[split][:limit]
        self.image_size = image_size

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.items], dtype=torch.int64)   # (N,)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        arr = read_cropped(path, self.image_size)  # (S, S, 3)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label  # (3, S, S)


READ_WORKERS = min(8, max(0, (os.cpu_count() or 1) - 1))   # DataLoader processes that decode images


def read_images(ds: Dataset, indices: list[int], workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Items `indices` of a (uint8 image, label) dataset as (N, C, S, S) uint8 and (N,) int64, in that order."""
    loader = DataLoader(Subset(ds, indices), batch_size=64, num_workers=workers)
    parts = list(loader)
    if not parts:
        raise ValueError("read_images: no indices")
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]).long()


def sample_image_folder(root: str | Path, image_size: int, train_images: int, *, limit_train: int | None = None,
                        limit_test: int | None = None, workers: int = 0, seed: int = 0) -> ImageData:
    """What a streamed folder keeps in memory: a fixed random sample of `train_images` training images (in
    index order) and the first `limit_test` test images. The artifacts that fit or evaluate on data (PCA,
    SemVAE, reconstruction checks, the FD reference) see this sample; the latent cache covers the whole
    train split (benchmarks/extract.py).
    """
    train = ImageFolderDataset(root, image_size, "train", limit=limit_train)
    test = ImageFolderDataset(root, image_size, "test", limit=limit_test)
    pick = np.sort(np.random.RandomState(seed).permutation(len(train))[:train_images]).tolist()
    train_x, train_y = read_images(train, pick, workers)
    test_x, test_y = read_images(test, list(range(len(test))), workers) if len(test) else \
        (torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    return ImageData(name=f"folder-{Path(root).name}", train_x=train_x, train_y=train_y, test_x=test_x,
                     test_y=test_y, num_classes=train.num_classes)


def cached_sample(cache_dir: str | Path, key_obj: dict, root: str | Path, image_size: int, train_images: int, *,
                  limit_train: int | None = None, limit_test: int | None = None, workers: int = READ_WORKERS
                  ) -> ImageData:
    """`sample_image_folder(...)` read once into the content-addressed folder `<cache_dir>/sample-<hash>/`
    (sample.safetensors + info.json), so every later job reads one file instead of decoding the images."""
    def build(tmp: Path) -> None:
        data = sample_image_folder(root, image_size, train_images, limit_train=limit_train, limit_test=limit_test,
                                   workers=workers)
        save_file({k: getattr(data, k).contiguous() for k in ("train_x", "train_y", "test_x", "test_y")},
                  str(tmp / "sample.safetensors"))
        (tmp / "info.json").write_text(json.dumps({"name": data.name, "num_classes": data.num_classes}))

    folder = cached_dir(cache_dir, "sample", key_obj, build)
    info = json.loads((folder / "info.json").read_text())
    return ImageData(name=info["name"], num_classes=info["num_classes"], **read_safetensors(folder / "sample.safetensors"))


# ---------------------------------------------------------------------------------------------------
# Name -> loader
# ---------------------------------------------------------------------------------------------------

def _fashion(root: str | None, image_size: int) -> ImageData:
    return load_fashion_mnist(root, pad_to=image_size)


def _folder_root(root: str | None) -> str:
    if root is None:
        raise ValueError("dataset 'image-folder' needs data.root=DIR (one subfolder per class, or train/ and val/)")
    return root


def _folder(root: str | None, image_size: int) -> ImageData:
    return load_image_folder(_folder_root(root), image_size)


DATASETS: dict[str, Callable[[str | None, int], ImageData]] = {
    "fashion-mnist": _fashion,
    "image-folder": _folder,
}


def load_dataset(name: str, root: str | None, image_size: int) -> ImageData:
    """Load a dataset by name; an unknown name raises a one-line KeyError listing the valid names."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root, image_size)


def fingerprint(name: str, root: str | None) -> str:
    """What a dataset is, not where it is: a short hash for the cache keys (benchmarks/data/prepare.py), so that a
    cache built from one copy of a dataset is never served for different data under the same name (a
    class subset, a re-encoded copy) while a moved or re-mounted copy keeps its caches.

    fashion-mnist: size and first MiB of each IDX file. image-folder: the files `scan_image_folder` finds (the
    ones the readers use), split, label and relative path each, plus the sizes of the first and last image
    of every class in every split: one folder scan and two stats per class (no image is opened). Other
    (plugin) datasets: "" (the name alone, as before).
    """
    h = hashlib.sha256()
    if name == "fashion-mnist":
        for key, path in sorted(fashion_paths(root).items()):
            with open(path, "rb") as f:
                h.update(f"{key}:{path.name}:{path.stat().st_size}:".encode() + f.read(1 << 20))
    elif name == "image-folder":
        base = Path(_folder_root(root)).expanduser()
        _, splits = scan_image_folder(base)               # exactly the files the readers use
        for split, items in sorted(splits.items()):
            for i, (path, label) in enumerate(items):
                h.update(f"{split}:{label}:{path.relative_to(base)}\n".encode())
                if i == 0 or i == len(items) - 1 or items[i - 1][1] != label or items[i + 1][1] != label:
                    h.update(f"{path.stat().st_size}\n".encode())    # first and last image of each class
    else:
        return ""
    return h.hexdigest()[:16]


STREAMABLE = ("image-folder",)   # datasets `data.stream: true` can read from disk (benchmarks/extract.py)


def check_streamable(name: str, root: str | None) -> None:
    if name not in STREAMABLE:
        raise ValueError(f"data.stream: true needs data.name in {', '.join(STREAMABLE)}, got {name!r}")
    _folder_root(root)


def check_dataset(name: str, root: str | None, image_size: int, stream: bool = False) -> tuple[int, int]:
    """Fail early with where it looked: load the dataset, or for a streamed one only scan the folder
    (a streamed ImageNet is never read whole). Returns the (train, test) image counts."""
    if not stream:
        data = load_dataset(name, root, image_size)
        return int(data.train_x.shape[0]), int(data.test_x.shape[0])
    check_streamable(name, root)
    _, splits = scan_image_folder(root)
    return len(splits["train"]), len(splits["test"])


# The largest data.image_size each dataset takes, with the reason (benchmarks/config/grid.py refuses larger ones
# before anything is built). Fashion-MNIST is held in memory padded: 70,000 × S² bytes, 1.1 GB at 128 px
# and 4.6 GB at 256 for a 28-px image in a border. Folders are ADM-centre-cropped (upsampled when smaller);
# the papers stop at 512, and 1024² RGB is 3 MiB per image before the tokenizer.
MAX_IMAGE_SIZE = {"fashion-mnist": 128, "image-folder": 1024}


def image_size_rule(name: str, size: int) -> str | None:
    """Why `size` cannot be this dataset's data.image_size, or None when it can."""
    if name == "fashion-mnist" and (size < 28 or (size - 28) % 2):
        return "Fashion-MNIST's 28-px images are zero-padded symmetrically: use 28 + an even number (e.g. 32)"
    if size < 8:
        return "must be ≥ 8"
    top = MAX_IMAGE_SIZE.get(name)
    if top is not None and size > top:
        why = ("70,000 images held in memory padded to S×S bytes" if name == "fashion-mnist" else
               "ADM-centre-cropped images, upsampled when smaller; the papers stop at 512")
        return f"at most {top} for {name} ({why})"
    return None
