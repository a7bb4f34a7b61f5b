"""ImageNet-256 evaluation with the ADM protocol (docs/methods.md §9): FID, sFID, IS, precision/recall of a
sample batch against guided-diffusion's reference batch `VIRTUAL_imagenet256_labeled.npz`. The sample side
(balanced labels, seed-42 shuffle, the `arr_0` npz the ADM evaluator reads, per-rank shards) is adm_npz.py.
Its command: benchmarks/adm_eval.py (`python -m benchmarks.adm_eval --help`).

ADM's evaluator runs TensorFlow's 2015 Inception graph; here the same weights run through torch-fidelity's
port (`inception-v3-compat`), which matches the TF graph closely but not bit for bit (docs/paper_scale.md).
"""
from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.utils import create_feature_extractor

from benchmarks.evaluation.adm_npz import _check_images, _read_npz, load_samples   # the sample side (npz, shards, labels)
from core.errors import NonFiniteError

REF_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
           "VIRTUAL_imagenet256_labeled.npz")
REF_HINT = f"download it with `wget {REF_URL}` (guided-diffusion evaluations README) and pass ref=<path>"
INCEPTION_FILE = Path(URL_INCEPTION_V3).name        # torch-fidelity's pt_inception-2015-12-05 conversion
# ADM's sFID tensor `mixed_6/conv:0` is the 1×1 branch (conv + BN + ReLU, 192 ch, 17×17) of the TF graph's 7th
# mixed block: torch-fidelity's weight converter maps `mixed_6/conv/*` to `Mixed_6d.branch1x1` (mixed_3 = Mixed_6a,
# mixed_4..7 = Mixed_6b..6e), not to the 768-channel concat of Mixed_6e. Uncertain, unchecked against the TF graph
# here (no TensorFlow, no .pb offline): mixed_5/mixed_6 have equal shapes, so the mapping rests on block order, and
# the op named `mixed_6/conv` is taken to be the ReLU (its Conv2D and batchnorm ops are named below it).
SPATIAL_MODULE = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7                                 # ADM: spatial[..., :7] -> 17·17·7 = 2023 dims
STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IS_SPLIT = 5000                                      # ADM's split size at every N (10 splits at 50k)
PR_K = 3                                             # k-NN manifold radius (ADM's nhood_sizes=(3,))
PR_BLOCK = 10000                                     # ADM's ManifoldEstimator row and column batch size
FD_METHODS = ("scipy", "eigh")                       # scipy: ADM's sqrtm; eigh: the same trace, faster


#################################################################################
#                  Inception-v3 (torch-fidelity) with the sFID hook             #
#################################################################################

def resolve_inception_weights(path: str | Path | None) -> Path:
    """`path`, or (None) where torch-fidelity's own download lands in the torch hub cache. Never downloads:
    a missing file raises a one-line FileNotFoundError saying where it looked and where to get it."""
    looked = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE if path is None else Path(path).expanduser()
    if not looked.is_file():
        raise FileNotFoundError(f"Inception-v3 weights not found at {looked}; download torch-fidelity's "
                                f"pt_inception-2015-12-05 weights from {URL_INCEPTION_V3} and pass inception=<path>")
    return looked


@dataclass
class Activations:
    pool: np.ndarray      # (N, 2048) float32, pool_3: FID and precision/recall
    spatial: np.ndarray   # (N, 2023) float32, mixed_6/conv[..., :7] flattened in TF's (H, W, C) order: sFID
    logits: np.ndarray    # (N, 1008) float32, pool_3 @ W without bias ('logits_unbiased', ADM's softmax input)


class ADMInception:
    """torch-fidelity's FeatureExtractorInceptionV3 from a local weights file, plus a hook for sFID."""

    def __init__(self, weights: str | Path | None, device: str | torch.device = "cpu") -> None:
        self.weights = resolve_inception_weights(weights)
        self.device = torch.device(device)
        try:
            self.net = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], cuda=False,
                                                feature_extractor_weights_path=str(self.weights), verbose=False)
        except (RuntimeError, OSError, EOFError, KeyError, ValueError, pickle.UnpicklingError) as e:
            # what torch.load / load_state_dict raise on a wrong, truncated or foreign file
            raise ValueError(f"{self.weights} is not torch-fidelity's Inception-v3 state_dict "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); get {URL_INCEPTION_V3}") from None
        self.net.to(self.device)
        self._spatial: list[torch.Tensor] = []
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, out: torch.Tensor) -> None:
        x = out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)                     # (N, 17, 17, 7), TF's NHWC
        self._spatial.append(x.reshape(x.shape[0], -1).float().cpu())          # (N, 2023)

    @torch.no_grad()
    def activations(self, images: np.ndarray, batch_size: int = 100) -> Activations:
        """pool_3, sFID and logit features of uint8 images [N, H, W, 3] (resized to 299 inside, as ADM's graph)."""
        _check_images(images, "activations")
        pool, logits, self._spatial = [], [], []
        # ADM's graph is float32; TF32 convolutions (cuDNN's default) moved features by 3e-3 relative (H100), off: 3e-6
        tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
        try:
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2)  # (B, 3, H, W)
                p, lg = self.net(x.to(self.device))
                pool.append(p.float().cpu())
                logits.append(lg.float().cpu())
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        spatial, self._spatial = torch.cat(self._spatial), []
        return Activations(torch.cat(pool).numpy(), spatial.numpy(), torch.cat(logits).numpy())


#################################################################################
#                       Reference batch and the metrics                         #
#################################################################################

@dataclass
class FDStats:
    mu: np.ndarray      # (D,) float64
    sigma: np.ndarray   # (D, D) float64

    @classmethod
    def of(cls, acts: np.ndarray) -> "FDStats":
        return cls(acts.mean(0, dtype=np.float64), np.cov(acts.astype(np.float64), rowvar=False))


@dataclass
class Reference:
    pool: FDStats
    spatial: FDStats
    acts: Activations              # of arr_0: precision/recall always use them
    precomputed: bool              # statistics read from the npz (mu, sigma, mu_s, sigma_s), as ADM does
    image_shape: tuple[int, int]


def load_reference(path: str | Path, inception: ADMInception, batch_size: int = 100) -> Reference:
    """Read an ADM reference batch: statistics from the npz when present (docs/methods.md §9), else from arr_0."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ADM reference batch {path} not found; {REF_HINT}")
    z = _read_npz(path)
    if "arr_0" not in z:
        raise ValueError(f"{path} has no arr_0 (keys: {', '.join(z)}); {REF_HINT}")
    images, stats = z["arr_0"], {k: z[k].astype(np.float64) for k in STATS_KEYS if k in z}
    _check_images(images, str(path))
    if stats and len(stats) < len(STATS_KEYS):
        raise ValueError(f"{path} holds {sorted(stats)} but not {sorted(set(STATS_KEYS) - set(stats))}; "
                         "ADM reads all four statistics or none")
    acts = inception.activations(images, batch_size)
    if stats:
        pool, spatial = FDStats(stats["mu"], stats["sigma"]), FDStats(stats["mu_s"], stats["sigma_s"])
        d, ds = acts.pool.shape[1], acts.spatial.shape[1]
        if [stats[k].shape for k in STATS_KEYS] != [(d,), (d, d), (ds,), (ds, ds)]:
            got = ", ".join(f"{k} {stats[k].shape}" for k in STATS_KEYS)
            raise ValueError(f"{path}: statistics {got}; expected {d}-d (mu, sigma) and {ds}-d (mu_s, sigma_s)")
    else:
        pool, spatial = FDStats.of(acts.pool), FDStats.of(acts.spatial)
    return Reference(pool, spatial, acts, bool(stats), images.shape[1:3])


def reference_self_check(ref: Reference, fd: str = "scipy") -> dict[str, float] | None:
    """FID and sFID of the reference's own arr_0, through this port, against its precomputed (TF) statistics:
    both ≈ 0 when the port and the sFID layer match ADM's graph (docs/paper_scale.md). None without them."""
    if not ref.precomputed:
        return None
    return {"fid": frechet_distance(FDStats.of(ref.acts.pool), ref.pool, fd),
            "sfid": frechet_distance(FDStats.of(ref.acts.spatial), ref.spatial, fd)}


def frechet_distance(a: FDStats, b: FDStats, method: str = "scipy") -> float:
    """‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb) in float64. "scipy" is ADM's: sqrtm of the product, ε = 1e-6
    on the diagonals if it is not finite, an error if its diagonal's imaginary part exceeds 1e-3. "eigh" uses
    tr √(ΣaΣb) = Σ √λ(Lᵀ Σb L) with Σa = L Lᵀ (symmetric eigendecomposition): the same for PSD Σ, ~10× faster."""
    diff = a.mu - b.mu
    if method == "scipy":
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
        if not np.isfinite(covmean).all():
            eps = np.eye(a.sigma.shape[0]) * 1e-6
            covmean = linalg.sqrtm((a.sigma + eps) @ (b.sigma + eps))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError(f"Fréchet distance: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    elif method == "eigh":
        try:
            w, v = torch.linalg.eigh(torch.from_numpy(a.sigma))
        except torch.linalg.LinAlgError:
            # LAPACK's divide-and-conquer can fail to converge on a degenerate Σ (few samples, many exactly
            # zero features), and whether it does depends on the CPU's LAPACK build (seen with MKL on an Intel
            # Xeon, not on an AMD EPYC): fall back to ADM's own arithmetic, which is the reference anyway.
            return frechet_distance(a, b, "scipy")
        keep = w > w.max() * 1e-12                   # Σa is often rank-deficient (N < D): drop its null space
        root = v[:, keep] * w[keep].sqrt()                                      # (D, r), Σa = root rootᵀ
        m = root.T @ torch.from_numpy(b.sigma) @ root                           # (r, r), PSD
        tr_covmean = float(torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum())
    else:
        raise ValueError(f"unknown Fréchet method {method!r}; valid: {', '.join(FD_METHODS)}")
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """ADM's IS at every N: softmax of the unbiased logits, exp(E[KL(p(y|x) ‖ p(y))]) over consecutive splits of
    `split_size` samples (ADM: 5000, so 10 splits at 50k, one below 5000; the last split holds the remainder),
    averaged. The arithmetic is float64 log-softmax (ADM: float32 softmax, then log), which differs by ~1e-6
    relative and stays finite where ADM's float32 softmax underflows to 0 and 0·log 0 gives NaN."""
    n = logits.shape[0]
    if n == 0 or split_size < 1:
        raise ValueError(f"inception score needs samples and split_size >= 1, got {n} samples, split_size={split_size}")
    logp = torch.log_softmax(torch.from_numpy(logits).double(), dim=1)          # (N, 1008)
    scores = []
    for i in range(0, n, split_size):
        lp = logp[i:i + split_size]
        log_py = torch.logsumexp(lp, 0) - math.log(lp.shape[0])                 # log of the split's mean p(y)
        scores.append(math.exp(float((lp.exp() * (lp - log_py)).sum(1).mean())))
    return float(np.mean(scores))


def _sqdist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (a, b) in the inputs' dtype, clamped at 0: ADM's float32 fallback."""
    return (u.square().sum(1)[:, None] - 2 * u @ v.T + v.square().sum(1)[None, :]).clamp_min_(0)


def _to_half(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float16 rounded once (nearest, ties to even). torch's CPU cast goes through float32 and can
    round twice (1 + 2^-11 + 2^-40 becomes 1, not 1 + 2^-10); rounding to float32 toward odd first makes the
    second rounding exact (24 >= 11 + 2 bits)."""
    y = x.float()
    y = torch.where(y.double().abs() > x.abs(), torch.nextafter(y, torch.zeros_like(y)), y)   # toward zero
    odd = (y.view(torch.int32) | 1).view(torch.float32)                                       # sticky bit
    return torch.where(y.double() == x, y, odd).half()


def _add16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float16 + float16, rounded once (float32 holds the exact sum's rounding: 24 >= 2·11 + 2 bits)."""
    return (a.float() + b.float()).half()


def _tf_row_sum16(x: torch.Tensor) -> torch.Tensor:
    """tf.reduce_sum(x, 1) of a float16 (N, D) tensor on the GPU, in float16 and in TF's order: D >= 1024 goes to
    cub's segmented reduce (256 threads; thread t sums columns t, t+256, ... in turn; each warp of 32 threads
    adds in a shuffle tree; the 8 warp sums are added in turn), D < 1024 to TF's RowReduceKernel (lane l of one
    warp sums columns l, l+32, ...; then the shuffle tree). Zero padding leaves every sum exact as it was."""
    threads = 256 if x.shape[1] >= 1024 else 32
    pad = -x.shape[1] % threads
    x = torch.cat([x, x.new_zeros(x.shape[0], pad)], 1) if pad else x
    items = x.reshape(x.shape[0], -1, threads)                                  # (N, items per thread, threads)
    acc = items[:, 0]
    for j in range(1, items.shape[1]):
        acc = _add16(acc, items[:, j])
    warps = acc.reshape(acc.shape[0], -1, 32)                                   # (N, warps, 32 lanes)
    while warps.shape[2] > 1:                                                   # shuffle-down by 1, 2, 4, 8, 16
        warps = _add16(warps[:, :, 0::2], warps[:, :, 1::2])
    total = warps[:, 0, 0]
    for w in range(1, warps.shape[1]):
        total = _add16(total, warps[:, w, 0])
    return total


def adm_sqdist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's DistanceBlock on one (row block, column block) pair, (a, b) float32: the features cast to float16,
    ‖u‖² (squares rounded to float16, summed in float16 in TF's GPU order), u·vᵀ (float16 in, rounded to
    float16 out), then max((‖u‖² − 2u·v) + ‖v‖², 0) with every operation rounded to float16. If any entry of
    the block is not finite (float16 overflows above 65504), the whole block is recomputed in float32, as
    ADM's tf.cond does. u·v is accumulated exactly (float64) and rounded once, where cuBLAS accumulates in
    float32 in an order of its own: a few entries can differ by one float16 step (docs/paper_scale.md)."""
    u16, v16 = u.float().half(), v.float().half()
    nu = _tf_row_sum16(u16.float().square().half())                            # (a,)
    nv = _tf_row_sum16(v16.float().square().half())                            # (b,)
    two_uv = (2 * _to_half(u16.double() @ v16.double().T).float()).half()       # (a, b); exact unless inf
    d = _add16(_add16(nu[:, None], -two_uv), nv[None, :]).float()
    if torch.isfinite(d).all():
        return d.clamp_min_(0)
    return _sqdist(u.float(), v.float())


def manifold_radii(x: torch.Tensor, k: int = PR_K, block: int = PR_BLOCK) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in its own set, (N,): the (k+1)-th smallest
    entry of its distance row, the point itself included (ADM's partition, `[:, k]`). Row blocks against
    column blocks of `block` (ADM: 10000 both), keeping a running k+1 smallest: memory O(block²), not O(N²)."""
    if x.shape[0] <= k:
        raise ValueError(f"precision/recall need more than k={k} images per set, got {x.shape[0]}")
    radii = torch.empty(x.shape[0], device=x.device)
    for i in range(0, x.shape[0], block):
        best = None
        for j in range(0, x.shape[0], block):
            d = adm_sqdist(x[i:i + block], x[j:j + block])
            d = d if best is None else torch.cat([best, d], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values  # ascending
        radii[i:i + block] = best[:, k]
    return radii


def precision_recall(ref: np.ndarray, samples: np.ndarray, k: int = PR_K, block: int = PR_BLOCK,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """ADM's k-NN manifold precision (samples inside the reference manifold) and recall (the reverse) of ref
    (N_ref, D) and samples (N, D), with ADM's float16 distances (`adm_sqdist`) in its 10000 × 10000 blocks."""
    r, s = (torch.from_numpy(a).float().to(device) for a in (ref, samples))
    r_rad, s_rad = manifold_radii(r, k, block), manifold_radii(s, k, block)
    ref_in = torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)
    sample_in = torch.zeros(s.shape[0], dtype=torch.bool, device=r.device)
    for i in range(0, r.shape[0], block):
        for j in range(0, s.shape[0], block):
            d = adm_sqdist(r[i:i + block], s[j:j + block])                      # (b_ref, b_sample)
            ref_in[i:i + block] |= (d <= s_rad[None, j:j + block]).any(1)
            sample_in[j:j + block] |= (d <= r_rad[i:i + block, None]).any(0)
    return int(sample_in.sum()) / s.shape[0], int(ref_in.sum()) / r.shape[0]     # fractions, as ADM's float64 mean


def _check_finite(acts: Activations, whose: str) -> None:
    """ADM would print NaN metrics (or, in precision/recall, count NaN distances as outside every ball)."""
    for name, a in (("pool_3", acts.pool), ("the sFID features", acts.spatial), ("the logits", acts.logits)):
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise NonFiniteError(f"{whose} Inception activations: {name} holds {bad} non-finite values; the images "
                                 f"or the Inception weights are broken (re-download the weights from {URL_INCEPTION_V3})")


def score(acts: Activations, ref: Reference, fd: str = "scipy", device: str | torch.device = "cpu",
          is_split_size: int = IS_SPLIT) -> dict[str, float]:
    """FID, sFID, IS, precision, recall of sample activations against a reference (ADM's main, docs/methods.md §9)."""
    _check_finite(acts, "samples'")
    _check_finite(ref.acts, "reference batch's")
    precision, recall = precision_recall(ref.acts.pool, acts.pool, device=device)
    return {"fid": frechet_distance(FDStats.of(acts.pool), ref.pool, fd),
            "sfid": frechet_distance(FDStats.of(acts.spatial), ref.spatial, fd),
            "is": inception_score(acts.logits, is_split_size), "precision": precision, "recall": recall}


def evaluate(samples: str | Path, ref: str | Path, inception: str | Path | None = None, *,
             device: str | torch.device | None = None, batch_size: int = 100, fd: str = "scipy") -> dict:
    """Score samples (an ADM npz, an image folder or a shard folder) against an ADM reference batch."""
    if fd not in FD_METHODS:
        raise ValueError(f"unknown Fréchet method {fd!r}; valid: {', '.join(FD_METHODS)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = ADMInception(inception, device)       # weights, then the reference: fail before reading 10 GB of samples
    reference = load_reference(ref, net, batch_size)
    images, _ = load_samples(samples)
    if images.shape[1:3] != reference.image_shape:
        raise ValueError(f"samples are {images.shape[1]}×{images.shape[2]} but the reference batch is "
                         f"{reference.image_shape[0]}×{reference.image_shape[1]}")
    metrics = score(net.activations(images, batch_size), reference, fd, device)
    return {**metrics, "num_samples": int(images.shape[0]), "num_ref": int(reference.acts.pool.shape[0]),
            "ref_stats": "precomputed" if reference.precomputed else "computed", "fd_method": fd,
            "ref_self_check": reference_self_check(reference, fd),
            "samples": str(samples), "ref": str(ref), "inception": str(net.weights),
            "feature_extractor": "torch-fidelity inception-v3-compat (port of ADM's TF Inception, not bit-exact)"}
