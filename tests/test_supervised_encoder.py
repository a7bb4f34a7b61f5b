"""The strong stand-in (supervised CNN tokens) and the FD-network oracle: shapes, grid order, which labels the
fit reads, reproducibility, save/load, the pixel probe reported next to the token probe, and that the oracle
really is the FD network's map."""
import pytest
import torch
import torch.nn.functional as F

from benchmarks.config.plugins import load_all
from benchmarks.data.prepare import artifact_plan
from core.registry import ENCODERS
from core.types import ImageData, to_unit
from encoders.fdnet import FDNet
from encoders.semantic import linear_probe, pixel_probe
from encoders.supervised import FDNetTokenNet, FDNetTokens, SupervisedEncoder, TokenCNN

load_all()

FIT = dict(steps=3, batch_size=8, probe_images=48, width=4, dim=8, bf16=False)


def tiny_data(n: int = 96, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageData("rand", x, y, x[:32].clone(), y[:32].clone(), 10)


def test_tokencnn_shapes_grid_and_final_norm():
    net = TokenCNN(1, 32, patch=4, dim=16, width=4).eval()
    tokens = net(torch.randn(3, 1, 32, 32))
    assert net.grid == (8, 8) and net.dim == 16 and tokens.shape == (3, 64, 16)
    assert torch.allclose(tokens.mean(-1), torch.zeros(3, 64), atol=1e-5)
    assert TokenCNN(3, 32, patch=2, dim=8, width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 256, 8)
    for bad in (3, 1, 64):
        with pytest.raises(ValueError, match="patch must be a power of 2"):
            TokenCNN(1, 32, patch=bad, dim=8, width=4)
    with pytest.raises(ValueError, match="width and dim must be >= 1"):
        TokenCNN(1, 32, patch=4, dim=8, width=0)
    with pytest.raises(ValueError, match="steps, batch_size and probe_images must be >= 1"):
        SupervisedEncoder.fit(tiny_data(), {}, "cpu", **{**FIT, "steps": 0})


def test_tokencnn_tokens_are_row_major():
    # A change in the bottom-right corner moves the last tokens of the row-major grid, never the first row.
    net = TokenCNN(1, 32, patch=4, dim=8, width=4).eval()
    x = torch.zeros(1, 1, 32, 32)
    x2 = x.clone()
    x2[0, 0, 31, 31] = 1.0
    changed = ((net(x2) - net(x)).abs().sum(-1)[0] > 1e-6).nonzero().flatten()
    assert changed.numel() and changed.min() >= 6 * 8 and 63 in changed.tolist()


def test_fit_reads_only_its_half_of_the_labels(monkeypatch):
    data = tiny_data()
    seen = {}
    import encoders.supervised as sup
    real = sup.train_supervised

    def spy(net, images, labels, *args, **kw):
        seen["labels"] = labels.clone()
        return real(net, images, labels, *args, **kw)

    monkeypatch.setattr(sup, "train_supervised", spy)
    SupervisedEncoder.fit(data, {}, "cpu", train_half=0, **FIT)
    assert torch.equal(seen["labels"], data.train_y[0::2])
    with pytest.raises(ValueError, match="train_half"):
        SupervisedEncoder.fit(data, {}, "cpu", train_half=2, **FIT)


def test_fit_is_reproducible_and_round_trips(tmp_path):
    data = tiny_data()
    a = SupervisedEncoder.fit(data, {}, "cpu", seed=3, **FIT)
    b = SupervisedEncoder.fit(data, {}, "cpu", seed=3, **FIT)
    x = to_unit(data.test_x[:4])
    assert torch.equal(a.tokens(x), b.tokens(x))
    s = a.summary()
    assert s["kind"] == "supervised-encoder" and 0 <= s["linear_probe_acc"] <= 1
    assert s["pixel_probe_acc"] == round(pixel_probe(data, 48), 4)
    a.save(tmp_path)
    c = SupervisedEncoder.load(tmp_path)
    assert torch.equal(c.tokens(x), a.tokens(x)) and c.grid == (8, 8) and c.dim == 8


def test_cls_token_is_the_mean_token():
    enc = SupervisedEncoder.fit(tiny_data(), {}, "cpu", cls_token=True, **FIT)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    tokens = enc.tokens(x)                                       # (2, 1 + 64, 8)
    assert tokens.shape == (2, 65, 8) and torch.allclose(tokens[:, 0], tokens[:, 1:].mean(1))


def test_pixel_probe_is_the_token_probe_on_raw_pixels():
    data = tiny_data()
    flat = lambda u8: to_unit(u8).flatten(1).float()
    ref = linear_probe(flat(data.train_x[:40]), data.train_y[:40], flat(data.test_x), data.test_y, 10)
    assert pixel_probe(data, 40) == ref


def test_supervised_tokens_carry_the_label_where_pixels_do_not():
    # Classes told apart only by a non-linear feature of the pixels (an XOR of two quadrants): a linear probe on
    # the pixels is at chance, the supervised tokens are not: what "carries semantics" means here, in small.
    g = torch.Generator().manual_seed(0)
    n = 600
    a, b = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, 32, 32), generator=g).to(torch.uint8)
    x[a == 1, :, :16, :16] += 150
    x[b == 1, :, 16:, 16:] += 150
    y = a ^ b
    data = ImageData("xor", x[:400], y[:400], x[400:], y[400:], 2)
    enc = SupervisedEncoder.fit(data, {}, "cpu", steps=150, batch_size=32, width=4, dim=8, bf16=False, flips=False,
                                probe_images=400)
    s = enc.summary()
    assert s["pixel_probe_acc"] < 0.7 and s["linear_probe_acc"] > 0.9, s


def test_oracle_is_the_fd_networks_map(tmp_path):
    data = tiny_data()
    fdnet = FDNet.fit(data, {}, "cpu", width=4, feature_dim=8, steps=2, batch_size=8)
    oracle = FDNetTokens.fit(data, {"fd-net": fdnet}, "cpu", train_half=0, probe_images=48)
    x = to_unit(data.test_x[:3])
    h = fdnet.eval().stages[:-1](x).flatten(2).transpose(1, 2)             # (3, 64, 16)
    assert torch.allclose(oracle.tokens(x), F.layer_norm(h, (16,)), atol=1e-6)
    assert oracle.grid == (8, 8) and oracle.dim == 16 and oracle.summary()["oracle"] is True
    assert oracle.summary()["not_applicable"] == {"train_half": 0}
    oracle.save(tmp_path)
    assert torch.equal(FDNetTokens.load(tmp_path).tokens(x), oracle.tokens(x))
    with pytest.raises(ValueError, match="patch must be 4"):
        FDNetTokens.fit(data, {"fd-net": fdnet}, "cpu", patch=2)
    assert isinstance(FDNetTokens.load(tmp_path).net, FDNetTokenNet)


def test_registry_and_slot_use(monkeypatch):
    import benchmarks.data.run_data as run_data
    monkeypatch.setattr(run_data, "_fingerprint", lambda name, root: "fixed-fingerprint")   # no data read
    assert {"semantic-encoder", "supervised-encoder", "fdnet-oracle"} <= set(ENCODERS.names())
    # The oracle in the semantic-encoder slot pulls the FD network in before it, with its key in the slot's key.
    cfg = {"method": {"latent": {"name": "vae-pca", "rank": 8}},
           "prepare": {"semantic-encoder": {"use": "fdnet-oracle", "patch": 4}, "fd-net": {"train_half": 1}},
           "data": {"name": "fashion-mnist", "root": None, "image_size": 32, "limit_train": 2000,
                    "limit_test": 500, "flips": True, "stream": False},
           "eval": {"metric": "fd-net"}, "cache_dir": "unused"}
    plan = artifact_plan(cfg)
    kinds = [n.kind for n in plan]
    assert kinds.index("fd-net") < kinds.index("semantic-encoder")
    node = plan[kinds.index("semantic-encoder")]
    assert node.key_obj["use"] == "fdnet-oracle" and node.key_obj["deps"] == {"fd-net": plan[kinds.index("fd-net")].name}


def test_report_puts_each_probe_next_to_the_pixels(tmp_path):
    from benchmarks.reporting.report import _prepare_section
    arts = {"semantic-encoder semantic-encoder-aa": {"kind": "supervised-encoder", "linear_probe_acc": 0.904,
                                                     "pixel_probe_acc": 0.8242},
            "semantic-encoder semantic-encoder-bb": {"kind": "fdnet-oracle", "oracle": True, "linear_probe_acc": 0.889,
                                                     "pixel_probe_acc": 0.8242},
            "fd-net": {"kind": "fd-net", "test_accuracy": 0.889}}
    (tmp_path / "prepare.json").write_text(__import__("json").dumps({"artifacts": arts}))
    lines = _prepare_section(tmp_path)
    assert "| semantic-encoder semantic-encoder-aa (supervised-encoder) | 0.904 | 0.824 | +8.0 points |" in lines
    assert "| semantic-encoder semantic-encoder-bb (fdnet-oracle, ORACLE: upper bound) | 0.889 | 0.824 | +6.5 points |" in lines
    assert not any(line.startswith("| fd-net (") for line in lines)
