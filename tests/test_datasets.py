"""Dataset readers: IDX parsing, Fashion-MNIST search and padding, ImageFolder splits and the ADM crop."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.data import datasets, fashion_mnist
from benchmarks.data.datasets import DATASETS, ImageFolderDataset, center_crop_adm, load_dataset, load_image_folder
from benchmarks.data.fashion_mnist import load_fashion_mnist, read_idx

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------- IDX helpers
def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_fake_fashion(root: Path, n_train: int = 12, n_test: int = 5, compress: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    sfx = ".gz" if compress else ""
    write_idx(root / f"train-images-idx3-ubyte{sfx}", rng.randint(1, 256, (n_train, 28, 28)), compress)
    write_idx(root / f"train-labels-idx1-ubyte{sfx}", rng.randint(0, 10, n_train), compress)
    write_idx(root / f"t10k-images-idx3-ubyte{sfx}", rng.randint(1, 256, (n_test, 28, 28)), compress)
    write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", rng.randint(0, 10, n_test), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x", images, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), images)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    write_idx(tmp_path / "y", labels, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "y"), labels)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes((1234).to_bytes(4, "big") + b"\0" * 8)
    with pytest.raises(ValueError, match="magic number 1234"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 3, 3), np.uint8), compress=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short")


# ----------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_from_root_is_padded_uint8(tmp_path, compress):
    write_fake_fashion(tmp_path, compress=compress)
    data = load_fashion_mnist(str(tmp_path))
    assert data.name == "fashion-mnist" and data.num_classes == 10
    assert data.train_x.shape == (12, 1, 32, 32) and data.test_x.shape == (5, 1, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    inner = data.train_x[:, :, 2:30, 2:30]
    assert (inner > 0).all()  # fake pixels are 1..255: the centre holds the original 28×28
    border = data.train_x.clone()
    border[:, :, 2:30, 2:30] = 0
    assert (border == 0).all()  # 2-pixel zero border on every side
    assert load_fashion_mnist(str(tmp_path), pad_to=28).train_x.shape == (12, 1, 28, 28)
    with pytest.raises(ValueError):
        load_fashion_mnist(str(tmp_path), pad_to=31)


def test_fashion_env_var_takes_precedence(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path / "fashion-mnist", n_train=7)
    monkeypatch.setenv("SEMPRIOR_DATA", str(tmp_path))
    assert load_fashion_mnist().train_x.shape[0] == 7


def test_fashion_missing_lists_places_and_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist(str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "apt-get install dataset-fashion-mnist" in msg
    monkeypatch.setenv("SEMPRIOR_DATA", str(tmp_path))
    looked = fashion_mnist._fashion_candidates(None)
    assert looked[0] == tmp_path / "fashion-mnist" and Path("/usr/share/datasets/fashion-mnist") in looked
    assert looked[-1] == Path("~/.cache/semprior/fashion-mnist").expanduser()


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="no Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
    data = load_dataset("fashion-mnist", None, 32)
    assert data.train_x.shape == (60000, 1, 32, 32) and data.test_x.shape == (10000, 1, 32, 32)
    assert data.train_y.unique().tolist() == list(range(10))
    assert int(data.train_x[:, :, :2].max()) == 0 and int(data.train_x.max()) == 255


# ----------------------------------------------------------------------------- image folders
def write_folder(root: Path, classes=("cat", "ant", "bee"), per_class: int = 5) -> None:
    rng = np.random.RandomState(1)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 20 + 7 * i, 30 + 3 * ci  # varied sizes and aspect ratios
            arr = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    (root / "ant" / "notes.txt").write_text("not an image")


def test_center_crop_adm_shape_and_constant_image():
    out = center_crop_adm(Image.new("RGB", (100, 60), (10, 20, 30)), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == np.array([10, 20, 30], np.uint8)).all()
    grey = center_crop_adm(Image.new("L", (40, 90), 200), 24)  # converted to RGB; tall image
    assert grey.shape == (24, 24, 3) and (grey == 200).all()


def test_center_crop_adm_keeps_the_centre():
    arr = np.zeros((64, 192, 3), np.uint8)
    arr[:, 64:128] = 255  # a white centre third of a wide image
    out = center_crop_adm(Image.fromarray(arr), 16)  # halved twice to 48×16, centre crop 16×16
    assert out.mean() > 250


def test_image_folder_without_split(tmp_path):
    write_folder(tmp_path)
    data = load_image_folder(tmp_path, 16)
    assert data.num_classes == 3 and data.train_x.shape[1:] == (3, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.train_x.shape[0] + data.test_x.shape[0] == 15 and data.test_x.shape[0] == 1  # 10% of 15
    again = load_image_folder(tmp_path, 16)
    assert torch.equal(data.test_x, again.test_x) and torch.equal(data.train_y, again.train_y)  # deterministic
    classes, _ = datasets.scan_image_folder(tmp_path)
    assert classes == ["ant", "bee", "cat"]  # label = index in sorted names


def test_image_folder_with_split_and_streaming(tmp_path):
    write_folder(tmp_path / "train", per_class=3)
    write_folder(tmp_path / "val", per_class=2)
    data = load_image_folder(tmp_path, 8)
    assert data.train_x.shape == (9, 3, 8, 8) and data.test_x.shape == (6, 3, 8, 8)
    ds = ImageFolderDataset(tmp_path, 8, split="test")
    assert len(ds) == 6 and ds.num_classes == 3
    x, y = ds[5]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and y == int(data.test_y[5])
    assert torch.equal(x, data.test_x[5])


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8)
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        load_image_folder(tmp_path, 8)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        load_image_folder(tmp_path, 8)


def test_load_dataset_unknown_name_lists_valid():
    with pytest.raises(KeyError) as e:
        load_dataset("mnist-fashion", None, 32)
    assert "fashion-mnist" in str(e.value) and "image-folder" in str(e.value) and "\n" not in str(e.value)
    assert set(DATASETS) == {"fashion-mnist", "image-folder"}
    with pytest.raises(ValueError, match="data.root"):
        load_dataset("image-folder", None, 32)


def test_fingerprint_is_what_not_where(tmp_path):
    """Cache keys carry a content fingerprint: a moved copy keeps it, different data under the same name
    (a class subset, an added or re-encoded image) does not (benchmarks/data/prepare.py _data_key)."""
    import shutil

    from benchmarks.data.run_data import data_key as _data_key

    a = tmp_path / "a"
    write_folder(a)
    fp = datasets.fingerprint("image-folder", str(a))
    shutil.copytree(a, tmp_path / "moved")
    assert datasets.fingerprint("image-folder", str(tmp_path / "moved")) == fp
    subset = tmp_path / "subset"
    shutil.copytree(a, subset)
    shutil.rmtree(subset / "bee")
    assert datasets.fingerprint("image-folder", str(subset)) != fp
    added = tmp_path / "added"
    shutil.copytree(a, added)
    Image.new("RGB", (40, 30)).save(added / "ant" / "zz_extra.png")
    assert datasets.fingerprint("image-folder", str(added)) != fp
    recoded = tmp_path / "recoded"
    shutil.copytree(a, recoded)
    last = sorted((recoded / "cat").iterdir())[-1]
    Image.new("RGB", (64, 64), (255, 0, 0)).save(last, format="PNG")    # same name, other bytes
    assert datasets.fingerprint("image-folder", str(recoded)) != fp

    def key(root):
        return _data_key({"data": {"name": "image-folder", "root": str(root), "image_size": 32,
                                   "limit_train": None, "limit_test": None}})
    assert key(a) == key(tmp_path / "moved") and key(a) != key(subset)


def test_fingerprint_of_fashion_files(tmp_path):
    write_fake_fashion(tmp_path / "one")
    write_fake_fashion(tmp_path / "two")
    write_fake_fashion(tmp_path / "three", n_train=13)
    fp = datasets.fingerprint("fashion-mnist", str(tmp_path / "one"))
    assert datasets.fingerprint("fashion-mnist", str(tmp_path / "two")) == fp
    assert datasets.fingerprint("fashion-mnist", str(tmp_path / "three")) != fp
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        datasets.fingerprint("fashion-mnist", str(tmp_path / "none"))
