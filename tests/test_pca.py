"""ReDi PCA artifact (docs/methods.md §4) against a float64 reference: standardise, PCA without whitening, project."""
import pytest
import torch

from core.registry import ENCODERS
from core.types import ImageData
from encoders.pca import TokenPCA, fit_pca


def correlated_rows(m: int = 3000, d: int = 12, seed: int = 0) -> torch.Tensor:
    """(m, d) float64 rows with a non-trivial mean, per-feature scales and correlations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(-1, 1, d, dtype=torch.float64)
    return (torch.randn(m, d, generator=g, dtype=torch.float64) @ mix) * scales + 3.0


def fitted(rows: torch.Tensor, grid=(3, 4)) -> TokenPCA:
    pca = TokenPCA(rows.shape[1], grid)
    for name, value in fit_pca(rows).items():
        getattr(pca, name).copy_(value)
    return pca


def test_fit_matches_svd_reference():
    rows = correlated_rows()
    out = fit_pca(rows)
    z = (rows - rows.mean(0)) / rows.std(0, correction=0)
    _, s, vh = torch.linalg.svd(z - z.mean(0), full_matrices=False)
    ref_var = s.pow(2) / (rows.shape[0] - 1)
    assert torch.allclose(out["explained_variance"], ref_var, rtol=1e-9, atol=1e-12)
    # Same directions up to sign.
    dots = (out["components"] * vh).sum(1).abs()
    assert torch.allclose(dots, torch.ones_like(dots), atol=1e-8)
    assert torch.allclose(out["pca_mean"], torch.zeros(12, dtype=torch.float64), atol=1e-12)


def test_components_orthonormal_and_sorted():
    out = fit_pca(correlated_rows())
    c = out["components"]
    assert torch.allclose(c @ c.t(), torch.eye(12, dtype=torch.float64), atol=1e-10)
    var = out["explained_variance"]
    assert (var[:-1] >= var[1:]).all()
    # Deterministic signs: the largest-magnitude entry of each component is positive.
    assert (c.gather(1, c.abs().argmax(1, keepdim=True)) > 0).all()


def test_projection_of_the_mean_is_zero_and_variances_match():
    rows = correlated_rows()
    pca = fitted(rows)
    mean_token = rows.mean(0).expand(1, 12, 12)                               # (1, T=12, D=12)
    assert torch.allclose(pca.project(mean_token, 12), torch.zeros(1, 12, 3, 4, dtype=torch.float64), atol=1e-10)
    coeffs = pca.project(rows.reshape(-1, 12, 12), 12)                        # (250, 12, 3, 4)
    per_comp = coeffs.transpose(0, 1).reshape(12, -1)                         # (D, M)
    assert torch.allclose(per_comp.mean(1), torch.zeros(12, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(per_comp.var(1), pca.explained_variance, rtol=1e-9)  # no whitening, no rescale


def test_full_rank_reconstruction_is_exact_and_rank_is_a_prefix():
    rows = correlated_rows()
    pca = fitted(rows)
    tokens = correlated_rows(24, seed=1).reshape(2, 12, 12)
    assert torch.allclose(pca.reconstruct(pca.project(tokens, 12)), tokens, atol=1e-10)
    # A prefix up to rounding, not bit for bit: the two matmuls have different shapes, and BLAS may pick a
    # different kernel (and summation order) for each, which differs between CPU models (AMD vs Intel).
    assert torch.allclose(pca.project(tokens, 4), pca.project(tokens, 12)[:, :4], rtol=0, atol=1e-12)


def test_project_layout_dtype_and_errors():
    rows = correlated_rows()
    pca = fitted(rows)
    tokens = correlated_rows(24, seed=2).reshape(2, 12, 12).float()
    out = pca.project(tokens, 3)
    assert out.shape == (2, 3, 3, 4) and out.dtype == torch.float32
    # Token t sits at grid cell (t // w, t % w).
    flat = pca.project(tokens, 3).flatten(2)                                  # (N, r, T)
    z = ((tokens.double() - pca.feat_mean) / pca.feat_std - pca.pca_mean) @ pca.components[:3].t()
    assert torch.allclose(flat.transpose(1, 2).double(), z, atol=1e-4)
    with pytest.raises(ValueError):
        pca.project(tokens, 0)
    with pytest.raises(ValueError):
        pca.project(tokens[:, :6], 3)


def test_constant_feature_does_not_divide_by_zero():
    rows = correlated_rows()
    rows[:, 3] = 5.0
    out = fit_pca(rows)
    assert torch.isfinite(out["components"]).all() and out["feat_std"][3] == 1.0


class PatchMeanEncoder:
    """Stand-in semantic encoder: 4×4 patch pixels through a fixed random map, (N, 64, 6) tokens."""

    grid, dim = (8, 8), 6

    def __init__(self) -> None:
        self.w = torch.randn(16, 6, generator=torch.Generator().manual_seed(0))

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        patches = torch.nn.functional.unfold(images, 4, stride=4).transpose(1, 2)   # (N, 64, 16)
        return torch.tanh(patches @ self.w)


def test_fit_artifact_summary_and_round_trip(tmp_path):
    assert ENCODERS.get("pca") is TokenPCA and TokenPCA.requires == ("semantic-encoder",)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 32, 32), generator=g, dtype=torch.uint8)
    data = ImageData("rand", x, torch.zeros(64, dtype=torch.long), x[:8], torch.zeros(8, dtype=torch.long), 10)
    pca = TokenPCA.fit(data, {"semantic-encoder": PatchMeanEncoder()}, "cpu", max_images=40, max_rows=1000)
    s = pca.summary()
    assert s["rows"] == 1000 and s["images"] == 40 and len(s["explained_variance_ratio"]) == 6
    assert abs(float(pca.explained_variance_ratio.sum()) - 1) < 1e-12
    pca.save(tmp_path / "pca")
    back = TokenPCA.load(tmp_path / "pca")
    assert back.grid == (8, 8) and back.summary() == s
    for name, buf in pca.named_buffers():
        assert torch.equal(buf, getattr(back, name)), name
