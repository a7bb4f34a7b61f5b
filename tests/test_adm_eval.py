"""The ADM ImageNet-256 evaluation path (benchmarks/adm_eval.py, docs/methods.md §9) on a tiny ImageFolder tree with a
random-weight Inception in torch-fidelity's weights format: npz layout and shuffle, shard merging, the sFID
hook, metric plumbing (FID/sFID/IS/precision/recall), precomputed reference statistics, and clear errors."""
import json

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image

from benchmarks.evaluation import adm as adm_eval
from benchmarks import adm_eval as adm_eval_cmd
from benchmarks.evaluation.adm import (ADMInception, FDStats, Reference, frechet_distance, inception_score, load_reference, precision_recall, reference_self_check, score)
from benchmarks.evaluation.adm_npz import (balanced_labels, load_samples, merge_shards, pack_npz, read_png_folder, shuffle_order, write_shard)
from benchmarks.data.datasets import load_image_folder
from core.errors import CorruptFileError, NonFiniteError
from official_ref import (adm_distance_block, adm_inception_score, adm_manifold_radii, adm_precision_recall,
                          tf_gpu_row_sum)

CLASSES, PER_CLASS, PER_CLASS_VAL, SIZE = 4, 4, 2, 64


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """train/ and val/ class folders of 72×96 images (the ADM crop makes them 64×64), a colour per class."""
    root = tmp_path_factory.mktemp("tree")
    rng = np.random.RandomState(0)
    for split, n in (("train", PER_CLASS), ("val", PER_CLASS_VAL)):
        for c in range(CLASSES):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                base = np.array([60 * c, 255 - 50 * c, 40 + 30 * c if split == "train" else 200 - 30 * c])
                img = np.clip(base + rng.randint(-40, 40, (72, 96, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / f"class{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tree):
    """The tree read by the project's ImageFolder reader with the ADM center crop, as NHWC uint8."""
    d = load_image_folder(tree, SIZE)
    nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()  # noqa: E731  (N, 3, S, S) -> (N, S, S, 3)
    return nhwc(d.train_x), d.train_y.numpy(), nhwc(d.test_x), d.test_y.numpy()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weight Inception saved as torch-fidelity's state_dict: the class is built with its loading
    stubbed out (no download), convs re-initialised (He, seeded) so that features are O(1), not ~1e-8."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def net(weights):
    return ADMInception(weights, "cpu")


@pytest.fixture(scope="module")
def acts(net, data):
    """Activations of the train images (samples) and of the val images (a different set)."""
    return net.activations(data[0], batch_size=8), net.activations(data[2], batch_size=8)


def self_reference(a) -> Reference:
    return Reference(FDStats.of(a.pool), FDStats.of(a.spatial), a, False, (SIZE, SIZE))


# ----------------------------------------------------------------------------- sample side
def test_balanced_labels_exact_counts():
    y = balanced_labels(50_000)
    assert y.dtype == np.int64 and (np.bincount(y, minlength=1000) == 50).all()
    assert (np.diff(y) >= 0).all()  # class-ordered as drawn; pack_npz shuffles
    with pytest.raises(ValueError, match="multiple of num_classes=1000"):
        balanced_labels(50_001)


def test_pack_npz_layout_and_joint_shuffle(tmp_path, data):
    images, _, _, _ = data
    labels = balanced_labels(len(images), CLASSES)  # the tree's train split is class-ordered too
    out = pack_npz(images, labels, tmp_path / "samples.npz")
    with np.load(out) as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]
        x, y = z["arr_0"], z["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (CLASSES * PER_CLASS, SIZE, SIZE, 3)
    assert (np.bincount(y) == PER_CLASS).all() and not (np.diff(y) >= 0).all()  # balanced, not class-ordered
    order = shuffle_order(len(images), 42)
    np.testing.assert_array_equal(x, images[order])
    np.testing.assert_array_equal(y, labels[order])  # each image keeps its label
    for i in range(len(x)):  # the pairing, checked without the permutation: find each image in the input
        j = int(np.flatnonzero((images == x[i]).all(axis=(1, 2, 3)))[0])
        assert labels[j] == y[i]
    pack_npz(images, labels, tmp_path / "again.npz")
    assert (tmp_path / "again.npz").read_bytes() == out.read_bytes()  # seed 42 is deterministic
    assert not np.array_equal(shuffle_order(16, 42), shuffle_order(16, 43))


@pytest.mark.parametrize("with_index", [True, False])
def test_merge_shards_equals_packing_everything(tmp_path, data, with_index):
    images, labels = data[0], data[1]
    idx = np.arange(len(images))
    # a round-robin split (rank r holds every 3rd sample) needs the index to restore the global order
    parts = [idx[r::3] for r in range(3)] if with_index else np.array_split(idx, 3)
    for r, part in enumerate(parts):
        write_shard(images[part], labels[part], tmp_path / "shards", r, index=part if with_index else None)
    merged = merge_shards(tmp_path / "shards", tmp_path / "merged.npz")
    whole = pack_npz(images, labels, tmp_path / "whole.npz")
    assert merged.read_bytes() == whole.read_bytes()
    x, y = load_samples(tmp_path / "shards")  # a shard folder scores as its merged npz
    with np.load(whole) as z:
        np.testing.assert_array_equal(x, z["arr_0"])
        np.testing.assert_array_equal(y, z["arr_1"])
    with pytest.raises(ValueError, match="expected 17"):
        merge_shards(tmp_path / "shards", tmp_path / "broken.npz", expected=17)
    (tmp_path / "shards" / "samples_rank1.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing ranks \[1\]"):
        merge_shards(tmp_path / "shards", tmp_path / "broken.npz")
    if with_index:  # the last rank lost: its round-robin indices leave holes
        (tmp_path / "shards" / "samples_rank2.npz").unlink()
        write_shard(images[parts[1]], labels[parts[1]], tmp_path / "shards", 1, index=parts[1])
        with pytest.raises(ValueError, match="not a permutation"):
            merge_shards(tmp_path / "shards", tmp_path / "broken.npz")


def test_png_folder_reads_lossless_and_shuffles_like_pack(tmp_path, data):
    images = data[0]
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / f"{i:06d}.png")
    np.testing.assert_array_equal(read_png_folder(tmp_path), images)
    shuffled, labels = load_samples(tmp_path)  # a folder is scored in the order its packed npz would have
    np.testing.assert_array_equal(shuffled, images[shuffle_order(len(images))])
    assert labels is None
    Image.fromarray(images[0][:32]).save(tmp_path / "999999.png")
    with pytest.raises(ValueError, match="999999.png is 64×32"):
        read_png_folder(tmp_path)


# ----------------------------------------------------------------------------- features
def test_spatial_features_are_mixed_6d_branch1x1_first_7_channels_nhwc(net, data):
    """The sFID hook reads the 1×1 branch of Mixed_6d (TF mixed_6/conv), channels 0..6, flattened (H, W, C)."""
    seen = {}
    handle = net.net.Mixed_6d.register_forward_hook(lambda m, inp, out: seen.setdefault("x", inp[0]))
    try:
        a = net.activations(data[0][:2])
    finally:
        handle.remove()
    want = net.net.Mixed_6d.branch1x1(seen["x"])[:, :7]  # (2, 7, 17, 17)
    assert want.shape == (2, 7, 17, 17)
    np.testing.assert_allclose(a.spatial, want.permute(0, 2, 3, 1).reshape(2, -1).numpy(), rtol=1e-6)
    assert a.pool.shape == (2, 2048) and a.logits.shape == (2, 1008)
    assert a.pool.std() > 1e-3  # the re-initialised random weights give informative features


# ----------------------------------------------------------------------------- metrics
def test_fd_methods_agree_with_closed_form():
    rng = np.random.default_rng(0)
    a = FDStats(rng.normal(size=3), np.diag([1.0, 4.0, 9.0]))
    b = FDStats(np.zeros(3), np.diag([4.0, 1.0, 9.0]))
    want = float(a.mu @ a.mu) + (1 - 2) ** 2 + (2 - 1) ** 2 + 0  # Σ (√λa − √λb)² for commuting Σ
    for method in adm_eval.FD_METHODS:
        assert frechet_distance(a, b, method) == pytest.approx(want, rel=1e-10)
    x, y = rng.normal(size=(200, 64)), rng.normal(size=(300, 64)) @ rng.normal(size=(64, 64)) * 0.3
    sa, sb = FDStats.of(x), FDStats.of(y + 0.5)
    assert frechet_distance(sa, sb, "eigh") == pytest.approx(frechet_distance(sa, sb, "scipy"), rel=1e-8)
    with pytest.raises(ValueError, match="valid: scipy, eigh"):
        frechet_distance(sa, sb, "newton")


def test_eigh_that_fails_to_converge_falls_back_to_adms_sqrtm(monkeypatch):
    # Whether LAPACK's eigh converges on a degenerate Σ depends on the CPU's LAPACK build: force the failure.
    rng = np.random.default_rng(1)
    sa, sb = FDStats.of(rng.normal(size=(50, 16))), FDStats.of(rng.normal(size=(60, 16)) + 0.2)

    def fail(_):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", fail)
    assert frechet_distance(sa, sb, "eigh") == frechet_distance(sa, sb, "scipy")


def test_inception_score_formula():
    assert inception_score(np.zeros((20, 1008), np.float32)) == pytest.approx(1.0)  # uniform p(y|x)
    logits = np.full((8, 1008), -50.0, np.float32)
    logits[np.arange(8), np.arange(8) % 4] = 50.0  # confident, 4 classes equally often
    assert inception_score(logits, split_size=8) == pytest.approx(4.0, rel=1e-6)


@pytest.mark.parametrize("n", [3000, 12345, 10000])  # one split; 5000 + 5000 + 2345; exactly two
def test_inception_score_splits_as_adm(n):
    """ADM splits by 5000 samples at every N (the last split holds the rest): compared with the official
    formula restated in numpy (float32 softmax), on class-ordered logits where the split boundaries matter."""
    rng = np.random.default_rng(n)
    logits = rng.normal(0, 2, size=(n, 1008)).astype(np.float32)
    logits[np.arange(n), np.arange(n) * 40 // n] += 6.0                        # classes 0..39 in index order
    want = adm_inception_score(logits)
    assert inception_score(logits) == pytest.approx(want, rel=1e-5)
    assert adm_inception_score(logits, n // 10) != pytest.approx(want, rel=1e-3)  # the old N // 10 splits differ


def pool_like(rng, n: int, d: int = 2048) -> np.ndarray:
    """Non-negative features of Inception pool_3's scale: squared distances of a few hundred, where one
    float16 step is 0.25-0.5, so the float16 path decides boundary cases."""
    return (np.abs(rng.normal(size=(n, d))) * rng.uniform(0.4, 0.7, size=(n, 1))).astype(np.float32)


@pytest.mark.parametrize("d", [2048, 1500, 1000, 100, 5])  # cub's 256-thread path (>= 1024) and one warp
def test_float16_norms_in_tf_gpu_order(d):
    rng = np.random.default_rng(d)
    sq = np.square(pool_like(rng, 64, d).astype(np.float16))                  # ADM's tf.square in float16
    got = adm_eval._tf_row_sum16(torch.from_numpy(sq)).numpy()
    np.testing.assert_array_equal(got, tf_gpu_row_sum(sq))
    if d == 2048:  # float16 accumulation is not the exact sum rounded once: the order is part of the result
        assert (got != sq.astype(np.float64).sum(1).astype(np.float16)).sum() >= 5


def test_adm_distance_block_float16_and_its_float32_fallback():
    rng = np.random.default_rng(3)
    u, v = pool_like(rng, 6), pool_like(rng, 5)
    d = adm_eval.adm_sqdist(torch.from_numpy(u), torch.from_numpy(v))
    np.testing.assert_array_equal(d.numpy(), adm_distance_block(u, v))         # float16 values, as ADM's graph
    assert torch.equal(d, d.half().float()) and (d > 100).all()
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert not np.array_equal(d.numpy(), exact.astype(np.float32))            # not the float32 distances
    np.testing.assert_allclose(d.numpy(), exact, rtol=5e-3)
    big = v.copy()
    big[0] *= 12                                                              # ‖v₀‖² > 65504: float16 overflows
    d = adm_eval.adm_sqdist(torch.from_numpy(u), torch.from_numpy(big))       # the whole block in float32
    np.testing.assert_allclose(d.numpy(), adm_distance_block(u, big), rtol=1e-5)
    np.testing.assert_allclose(d.numpy(), ((u[:, None].astype(np.float64) - big[None]) ** 2).sum(-1), rtol=1e-4)
    assert not torch.equal(d, d.half().float())


def test_precision_recall_as_adm_blocks_and_overflow():
    """Radii, precision and recall against ADM's ManifoldEstimator restated in numpy, with blocks of 16 (ADM:
    10000) and points that overflow float16, so that some blocks take the float32 branch and others not."""
    rng = np.random.default_rng(4)
    ref = np.concatenate([pool_like(rng, 40), 12 * pool_like(rng, 8), pool_like(rng, 12)])
    samples = np.concatenate([pool_like(rng, 30) * 1.05, 12 * pool_like(rng, 5), pool_like(rng, 3)])
    for block in (16, 10000):                                                 # ADM's own size: one block
        for x in (ref, samples):
            got = adm_eval.manifold_radii(torch.from_numpy(x), block=block).numpy()
            np.testing.assert_allclose(got, adm_manifold_radii(x, block, block), rtol=1e-5)
        assert precision_recall(ref, samples, block=block) == adm_precision_recall(ref, samples, block, block)
    # the block structure decides which distances fall back to float32: one block of 10000 holds the large
    # points, so every radius is float32; in blocks of 16 most radii come from float16 blocks
    on_grid = lambda r: int((r == r.half().float()).sum())  # noqa: E731
    small = adm_eval.manifold_radii(torch.from_numpy(ref[:40]), block=16)
    one = adm_eval.manifold_radii(torch.from_numpy(ref[:40]), block=10000)
    assert on_grid(small) == 40 and torch.allclose(small, one, rtol=5e-3)      # no overflow: all float16
    small = adm_eval.manifold_radii(torch.from_numpy(ref), block=16)[:16]
    one = adm_eval.manifold_radii(torch.from_numpy(ref), block=10000)[:16]
    assert on_grid(small) > on_grid(one) + 8


@pytest.mark.parametrize("damage", ["truncated", "garbled", "pickled"])
def test_damaged_npz_is_one_corrupt_file_error(tmp_path, net, data, damage):
    path = tmp_path / "batch.npz"
    if damage == "pickled":
        np.savez(path, arr_0=np.array([{"not": "images"}], dtype=object))
    else:
        np.savez(path, arr_0=data[2])
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else raw[:200] + b"\xff" * 64 + raw[264:])
    with pytest.raises(CorruptFileError, match=r"batch\.npz is not a readable npz .*re-download it"):
        load_samples(path)
    with pytest.raises(CorruptFileError, match=r"batch\.npz is not a readable npz"):
        load_reference(path, net)


def test_nonfinite_activations_refused(acts):
    train, val = acts
    bad = adm_eval.Activations(train.pool.copy(), train.spatial, train.logits)
    bad.pool[1, 3] = np.nan
    with pytest.raises(NonFiniteError, match=r"samples' Inception activations.*pool_3.*1 non-finite"):
        score(bad, self_reference(val), fd="eigh")
    with pytest.raises(NonFiniteError, match=r"reference batch's Inception activations"):
        score(val, self_reference(bad), fd="eigh")


def test_self_and_other_set(acts):
    train, val = acts
    same = score(train, self_reference(train), fd="eigh")
    assert abs(same["fid"]) < 1e-6 * np.trace(FDStats.of(train.pool).sigma)
    assert abs(same["sfid"]) < 1e-6 * np.trace(FDStats.of(train.spatial).sigma)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    other = score(train, self_reference(val), fd="eigh")
    assert other["fid"] > 1.0 and other["sfid"] > 0.0
    for m in (same, other):
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0 and m["is"] >= 1.0


def test_precision_recall_direction_and_blocks():
    """Precision = samples inside the reference's k=3 balls, recall = references inside the samples' balls."""
    ref = np.arange(10, dtype=np.float32)[:, None]                          # 0..9 on a line
    s = np.array([0, 1, 2, 3, 100, 101, 102, 103], np.float32)[:, None]
    # samples 0..3 lie on references (4/8); the sample balls (radius 2 or 3) cover references 0..6 (7/10)
    assert precision_recall(ref, s) == pytest.approx((0.5, 0.7))
    rng = np.random.default_rng(1)
    ref, s = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(1.0, 0.6, size=(37, 8)).astype(np.float32)
    p, r = precision_recall(ref, s, block=1000)
    assert precision_recall(ref, s, block=7) == (p, r) and 0 < p < 1 and 0 < r < 1


def test_precomputed_reference_statistics_are_used(tmp_path, net, data, acts):
    train, val = acts
    pool, spatial = FDStats.of(val.pool), FDStats.of(val.spatial)
    shift = np.zeros_like(pool.mu)
    shift[0] = 10.0
    path = tmp_path / "ref_stats.npz"
    np.savez(path, arr_0=data[2][:5], mu=pool.mu + shift, sigma=pool.sigma, mu_s=spatial.mu, sigma_s=spatial.sigma)
    ref = load_reference(path, net)
    assert ref.precomputed and ref.acts.pool.shape == (5, 2048)  # P/R still use arr_0's activations
    np.testing.assert_array_equal(ref.pool.mu, pool.mu + shift)
    shifted = score(train, ref, fd="eigh")
    plain = frechet_distance(FDStats.of(train.pool), pool, "eigh")
    d = FDStats.of(train.pool).mu - pool.mu
    assert shifted["fid"] == pytest.approx(plain + (d - shift) @ (d - shift) - d @ d, rel=1e-9)
    # the self check: arr_0's own activations against statistics made from them (as ADM made the npz's)
    own = net.activations(data[2][:5])
    np.savez(path, arr_0=data[2][:5], mu=FDStats.of(own.pool).mu + shift, sigma=FDStats.of(own.pool).sigma,
             mu_s=FDStats.of(own.spatial).mu, sigma_s=FDStats.of(own.spatial).sigma)
    check = reference_self_check(load_reference(path, net), fd="eigh")
    assert check["fid"] == pytest.approx(shift @ shift, rel=1e-6) and abs(check["sfid"]) < 1e-6
    assert reference_self_check(self_reference(val)) is None  # no precomputed statistics, nothing to check
    np.savez(tmp_path / "partial.npz", arr_0=data[2][:5], mu=pool.mu, sigma=pool.sigma)
    with pytest.raises(ValueError, match="mu_s"):
        load_reference(tmp_path / "partial.npz", net)


# ----------------------------------------------------------------------------- CLI end to end and errors
def test_cli_end_to_end(tmp_path, weights, data, capsys):
    images, labels, val_images, _ = data
    pack_npz(images, labels, tmp_path / "samples.npz")
    np.savez(tmp_path / "ref.npz", arr_0=val_images)  # no mu/sigma: statistics come from arr_0
    out = tmp_path / "metrics.json"
    rc = adm_eval_cmd.main([f"samples={tmp_path / 'samples.npz'}", f"ref={tmp_path / 'ref.npz'}",
                        f"inception={weights}", f"out={out}", "device=cpu", "batch_size=8", "fd=eigh"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads(out.read_text())
    assert m["num_samples"] == len(images) and m["num_ref"] == len(val_images) and m["ref_stats"] == "computed"
    assert m["ref_self_check"] is None
    assert m["fid"] > 0 and m["sfid"] > 0 and m["is"] >= 1.0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert "fid=" in capsys.readouterr().out


def test_missing_weights_and_reference_say_where(tmp_path, weights, capsys):
    with pytest.raises(FileNotFoundError, match=r"not found at .*nowhere\.pth.*torch-fidelity.*releases"):
        ADMInception(tmp_path / "nowhere.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not torch-fidelity's Inception-v3 state_dict"):
        ADMInception(tmp_path / "bad.pth")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, SIZE, SIZE, 3), np.uint8))
    rc = adm_eval_cmd.main([f"samples={tmp_path / 's.npz'}", f"ref={tmp_path / 'VIRTUAL_imagenet256_labeled.npz'}",
                        f"inception={weights}", "device=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "VIRTUAL_imagenet256_labeled.npz not found" in err and "openaipublic.blob.core.windows.net" in err
    assert adm_eval_cmd.main([f"samples={tmp_path / 's.npz'}", "ref=x", "inceptoin=y"]) == 2
    assert "valid: samples, ref, inception" in capsys.readouterr().err
