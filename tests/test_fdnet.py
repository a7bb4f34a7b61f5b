"""FD network: training on a separable toy, feature shapes and channel handling, save/load, and the
torch-fidelity custom extractor (FD(A, A) ≈ 0, FD(A, B) > 0, idempotent registration)."""
import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset

from core.registry import ENCODERS
from core.types import ImageData
from encoders.fdnet import FDNet, make_fidelity_extractor

SIZE = 16




def blobs(n: int, seed: int, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, 16, 16): class k is a bright 4×4 square in quadrant k on noise; labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 60, (n, 1, SIZE, SIZE), generator=g, dtype=torch.uint8)
    for k in range(classes):
        r, c = 2 + 8 * (k // 2), 2 + 8 * (k % 2)
        x[y == k, :, r:r + 4, c:c + 4] = 250
    return x, y


@pytest.fixture(scope="module")
def net() -> FDNet:
    x, y = blobs(256, 0)
    xt, yt = blobs(64, 1)
    data = ImageData("blobs", x, y, xt, yt, 4)
    return FDNet.fit(data, {}, "cpu", width=8, feature_dim=16, steps=40, batch_size=32, lr=5e-3)


class U8Dataset(Dataset):
    """Items uint8 (3, H, W), as torch-fidelity wants."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x.expand(-1, 3, -1, -1).contiguous()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def test_fit_learns_the_toy(net):
    s = net.summary()
    assert ENCODERS.get("fd-net") is FDNet
    assert s["test_accuracy"] >= 0.95 and s["feature_dim"] == 16 and s["fit_seconds"] > 0


def test_train_half_uses_disjoint_halves():
    x, y = blobs(64, 0)
    data = ImageData("blobs", x, y, x[:8], y[:8], 4)
    kw = dict(width=4, feature_dim=8, steps=2, batch_size=16)
    nets = [FDNet.fit(data, {}, "cpu", train_half=h, **kw) for h in (0, 1)]
    assert nets[0].weights_hash() != nets[1].weights_hash() and nets[0].fit_args["train_half"] == 0
    with pytest.raises(ValueError, match="train_half"):
        FDNet.fit(data, {}, "cpu", train_half=2, **kw)


def test_features_logits_predict_shapes(net):
    x, y = blobs(10, 2)
    f = net.features(x)
    assert f.shape == (10, 16) and f.dtype == torch.float32 and (f >= 0).all()  # after the ReLU
    assert net.logits(x).shape == (10, 4)
    assert net.predict(x).dtype == torch.int64 and net.predict(x).shape == (10,)
    rgb = x.expand(-1, 3, -1, -1)  # 3-channel uint8 (torch-fidelity's input) is averaged to grey
    torch.testing.assert_close(net.features(rgb), f)


def test_input_checks(net):
    with pytest.raises(TypeError, match="uint8"):
        net.features(torch.zeros(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="resize"):
        net.features(torch.zeros(2, 1, SIZE * 2, SIZE * 2, dtype=torch.uint8))


def test_save_load_round_trip(net, tmp_path):
    net.save(tmp_path)
    back = FDNet.load(tmp_path, "cpu")
    x, _ = blobs(8, 3)
    torch.testing.assert_close(back.features(x), net.features(x), rtol=0, atol=0)
    assert back.weights_hash() == net.weights_hash() and back.summary() == net.summary()


def test_extractor_registration_is_idempotent(net):
    name, cls = make_fidelity_extractor(net)
    name2, cls2 = make_fidelity_extractor(net)
    assert name == name2 and cls is cls2 and name.startswith("fd-net-")
    assert cls.get_provided_features_list() == ("fd", "logits")
    assert cls.get_default_feature_layer_for_metric("fid") == "fd"
    assert cls.get_default_feature_layer_for_metric("isc") == "logits"
    ext = cls(name, ["logits", "fd"])
    logits, feats = ext(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))  # order of the request
    assert logits.shape == (2, 4) and feats.shape == (2, 16)


def test_torch_fidelity_metrics(net):
    name, _ = make_fidelity_extractor(net)
    a, _ = blobs(300, 10)
    a_copy = U8Dataset(a)
    b, _ = blobs(300, 11, classes=1)  # a different distribution: every image is class 0
    kw = dict(feature_extractor=name, fid=True, kid=True, prc=True, cuda=False, save_cpu_ram=True,
              cache=False, verbose=False, kid_subset_size=100, kid_subsets=10)
    same = torch_fidelity.calculate_metrics(input1=U8Dataset(a), input2=a_copy, **kw)
    diff = torch_fidelity.calculate_metrics(input1=U8Dataset(a), input2=U8Dataset(b), **kw)
    assert abs(same["frechet_inception_distance"]) < 1e-3
    assert diff["frechet_inception_distance"] > 1.0
    assert diff["kernel_inception_distance_mean"] > same["kernel_inception_distance_mean"]
    assert same["precision"] == pytest.approx(1.0) and same["recall"] == pytest.approx(1.0)
    isc = torch_fidelity.calculate_metrics(input1=U8Dataset(a), feature_extractor=name, isc=True, cuda=False,
                                           save_cpu_ram=True, cache=False, verbose=False)
    assert 3.0 < isc["inception_score_mean"] <= 4.0 + 1e-6  # 4 balanced, confidently classified classes
