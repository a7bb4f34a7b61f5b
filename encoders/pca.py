"""Artifact "pca": ReDi's PCA of semantic-encoder patch tokens (https://arxiv.org/abs/2504.16064, docs/methods.md §4).

Each token feature is standardised with its own mean/std, then a full-rank PCA without whitening is fitted;
a latent keeps the first r coefficients per token, reshaped to the token grid and not rescaled.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from core.registry import ENCODERS
from core.types import ImageData, to_unit
from encoders.base import Artifact, batched

log = logging.getLogger(__name__)


def fit_pca(rows: Tensor) -> dict[str, Tensor]:
    """Standardise then PCA in float64, the sklearn `StandardScaler` + `PCA(whiten=False)` recipe.

    Args:
        rows: (M, D) token features.
    Returns float64 tensors: feat_mean (D,), feat_std (D,) (population std, as StandardScaler), pca_mean (D,)
    (mean of the standardised rows: 0 up to rounding, kept because sklearn's PCA subtracts its own mean),
    components (D, D) orthonormal rows by descending variance, explained_variance (D,) (ddof 1, as sklearn).
    """
    x = rows.double()
    feat_mean = x.mean(0)
    # A constant feature would divide by 0; sklearn leaves such a feature unscaled (std 1), so do we.
    feat_std = x.std(0, correction=0)
    feat_std = torch.where(feat_std > 0, feat_std, torch.ones_like(feat_std))
    z = (x - feat_mean) / feat_std                                          # (M, D)
    pca_mean = z.mean(0)
    zc = z - pca_mean
    # eigh of the D×D covariance instead of an SVD of the M×D data: same result, M/D times cheaper.
    cov = zc.t() @ zc / (x.shape[0] - 1)                                    # (D, D)
    evals, evecs = torch.linalg.eigh(cov)                                   # ascending
    order = torch.argsort(evals, descending=True)
    evals, components = evals[order].clamp_min(0), evecs[:, order].t()      # components: (D, D) rows
    # Deterministic signs (eigh's are arbitrary): the largest-magnitude entry of each component is positive.
    pivot = components.abs().argmax(1)
    signs = torch.sign(components.gather(1, pivot[:, None]))
    components = components * signs
    return dict(feat_mean=feat_mean, feat_std=feat_std, pca_mean=pca_mean, components=components,
                explained_variance=evals)


@ENCODERS.register("pca")
class TokenPCA(nn.Module, Artifact):
    """PCA of semantic tokens. `project(tokens (N, T, D), rank) -> (N, rank, h, w)` on the encoder's grid."""

    requires: tuple[str, ...] = ("semantic-encoder",)

    def __init__(self, dim: int, grid: tuple[int, int] | list[int], summary: dict | None = None) -> None:
        super().__init__()
        self.dim, self.grid = dim, (int(grid[0]), int(grid[1]))
        for name, shape in [("feat_mean", (dim,)), ("feat_std", (dim,)), ("pca_mean", (dim,)),
                            ("components", (dim, dim)), ("explained_variance", (dim,))]:
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))
        self._summary = dict(summary or {})

    @property
    def explained_variance_ratio(self) -> Tensor:
        return self.explained_variance / self.explained_variance.sum()

    def project(self, tokens: Tensor, rank: int) -> Tensor:
        """tokens (N, T, D) -> the first `rank` PCA coefficients (N, rank, h, w), computed in tokens' dtype."""
        if not 1 <= rank <= self.dim:
            raise ValueError(f"PCA rank must be in [1, {self.dim}], got {rank}")
        n, t, d = tokens.shape
        if (t, d) != (self.grid[0] * self.grid[1], self.dim):
            raise ValueError(f"tokens {tuple(tokens.shape)} do not match the PCA's grid {self.grid} × dim {self.dim}")
        cast = lambda b: b.to(tokens.device, tokens.dtype)
        z = (tokens - cast(self.feat_mean)) / cast(self.feat_std) - cast(self.pca_mean)   # (N, T, D)
        coeffs = z @ cast(self.components[:rank]).t()                                     # (N, T, r)
        return coeffs.transpose(1, 2).reshape(n, rank, *self.grid)                        # (N, r, h, w)

    def reconstruct(self, coeffs: Tensor) -> Tensor:
        """Inverse of `project`: (N, r, h, w) -> tokens (N, T, D); exact when r = D."""
        n, r = coeffs.shape[:2]
        cast = lambda b: b.to(coeffs.device, coeffs.dtype)
        c = coeffs.reshape(n, r, -1).transpose(1, 2)                                      # (N, T, r)
        z = c @ cast(self.components[:r]) + cast(self.pca_mean)                           # (N, T, D)
        return z * cast(self.feat_std) + cast(self.feat_mean)

    @classmethod
    def fit(cls, data: ImageData, deps: dict, device: torch.device | str = "cpu", *, max_images: int = 10000,
            max_rows: int = 200000, seed: int = 0) -> "TokenPCA":
        """Fit on the tokens of `max_images` random training images, at most `max_rows` token rows.

        ReDi fits on ~300 × 256 images' tokens; a random subset of rows keeps the fit at a fraction of a second.
        """
        start = time.perf_counter()
        encoder = deps["semantic-encoder"]
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(data.train_x.shape[0], generator=gen)[:max_images]
        tokens = batched(lambda u8: encoder.tokens(to_unit(u8)), data.train_x[idx], device=device)  # (n, T, D)
        rows = tokens.reshape(-1, tokens.shape[-1])                                                 # (n·T, D)
        rows = rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]
        pca = cls(encoder.dim, encoder.grid)
        for name, value in fit_pca(rows).items():
            getattr(pca, name).copy_(value)
        ratio = pca.explained_variance_ratio
        cum = ratio.cumsum(0)
        pca._summary = dict(kind="pca", rows=int(rows.shape[0]), images=int(idx.numel()),
                            explained_variance_ratio=[round(float(v), 5) for v in ratio[:16]],
                            cumulative={str(r): round(float(cum[r - 1]), 4) for r in (1, 2, 4, 8, 16, 32)
                                        if r <= pca.dim},
                            seconds=round(time.perf_counter() - start, 2))
        log.info("pca: %s", pca._summary)
        return pca.to(device)

    # ------------------------------------------------------------------ persistence (Artifact hooks)
    def artifact_config(self) -> dict:
        return dict(dim=self.dim, grid=list(self.grid))      # the statistics are buffers: in the weights file

    @classmethod
    def from_saved(cls, out_dir: str | Path, state: dict[str, Tensor] | None, config: dict, summary: dict,
                   device: torch.device | str) -> "TokenPCA":
        pca = cls(config["dim"], config["grid"], summary)
        pca.load_state_dict(state)
        return pca.to(device)

    def summary(self) -> dict:
        return dict(self._summary)
