"""Scoring generated samples at the small profiles: FD, KID and precision/recall through torch-fidelity with the
profile's FD network registered as a custom feature extractor, plus the FD classifier's accuracy on
class-conditional samples (does a sample show its class?); `generate` draws the samples a run is scored on.

Offline profiles never call this "FID": the metric is FD-<net> (Fréchet distance in the features of
the profile's own classifier), a different number from Inception FID (docs/metrics.md).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_featuresdict_to_statistics_cached, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import (create_feature_extractor, extract_featuresdict_from_input_id_cached,
                                  get_cacheable_input_name, resolve_feature_layer_for_metric)

from benchmarks.evaluation.adm import ADMInception, load_reference, score
from core.cache import cached_dir
from core.dist import Dist, gather_to_main, mean_over_ranks
from core.errors import NonFiniteError
from core.progress import Progress
from core.seed import generator
from core.types import check_finite, nonfinite_rows, to_uint8
from encoders.fdnet import make_fidelity_extractor

log = logging.getLogger(__name__)
REF_NAME = "fdref"          # torch-fidelity cache name of the reference (test-set) features


class U8Images(Dataset):
    """uint8 (N,C,H,W) -> items of uint8 3×H×W, as torch-fidelity wants (grey repeated to RGB)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images.cpu()

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def fidelity(images: torch.Tensor, reference: torch.Tensor, fdnet: Any, ref_dir: Path,
             device: torch.device) -> dict[str, float]:
    """FD, KID, precision, recall of uint8 images (N,C,H,W) against the cached reference features.

    FD and KID use the whole reference split. Precision/recall (k-NN manifolds, k = 3) use a fixed random
    subset of the reference of the same size N as the samples: the manifold radii depend on N, equal sizes
    keep precision and recall symmetric, and it avoids an O(N_ref²) distance matrix at every eval.
    """
    name = make_fidelity_extractor(fdnet)[0]
    n = images.shape[0]
    common = dict(input1=U8Images(images), cache_root=str(ref_dir), cache=True, feature_extractor=name,
                  cuda=device.type == "cuda", save_cpu_ram=True, verbose=False, batch_size=500,
                  samples_shuffle=False)
    m = checked_metrics(ref_dir, input2=U8Images(reference), input2_cache_name=REF_NAME, fid=True,
                        kid=True, kid_subset_size=min(1000, n), kid_subsets=50, **common)
    sub = torch.randperm(reference.shape[0], generator=generator(0))[:n]
    p = checked_metrics(ref_dir, input2=U8Images(reference[sub]), input2_cache_name=f"{REF_NAME}-n{n}",
                        prc=True, **common)
    out = {"fd": float(m["frechet_inception_distance"]), "kid": float(m["kernel_inception_distance_mean"]),
           "kid_std": float(m["kernel_inception_distance_std"]), "precision": float(p["precision"]),
           "recall": float(p["recall"])}
    check_metrics(out)
    return out


def checked_metrics(ref_dir: Path, **kwargs: Any) -> dict[str, float]:
    """torch_fidelity.calculate_metrics for one custom feature extractor (fid / kid / prc), through the same
    torch-fidelity functions in the same order (so the same numbers and the same cache files), with the
    features of both inputs and both inputs' FD statistics checked for NaN/inf before they are scored."""
    wanted = [m for m in ("fid", "kid", "prc") if kwargs.get(m)]
    layers = {m: resolve_feature_layer_for_metric(m, **kwargs) for m in wanted}
    extractor = create_feature_extractor(kwargs["feature_extractor"], list(set(layers.values())), **kwargs)
    samples = extract_featuresdict_from_input_id_cached(1, extractor, **kwargs)
    reference = extract_featuresdict_from_input_id_cached(2, extractor, **kwargs)
    fix = f" (cached in {ref_dir}: delete that folder to rebuild it)"
    for layer in set(layers.values()):
        check_finite(samples[layer], f"sample feature vectors ({extractor.get_name()} '{layer}')",
                     " (the samples are finite uint8: the FD network's weights are not)")
        check_finite(reference[layer], f"reference feature vectors ({extractor.get_name()} '{layer}')", fix)
    out: dict[str, float] = {}
    if "fid" in layers:
        stats = [fid_featuresdict_to_statistics_cached(feats, get_cacheable_input_name(i, **kwargs), extractor,
                                                       layers["fid"], **kwargs)
                 for i, feats in ((1, samples), (2, reference))]
        for (who, hint), st in zip((("sample", ""), ("reference", fix)), stats):
            check_finite(st["mu"][:, None], f"entries of the {who} feature mean", hint)
            check_finite(st["sigma"], f"rows of the {who} feature covariance", hint)
        out.update(fid_statistics_to_metric(*stats, False))
    if "kid" in layers:
        out.update(kid_featuresdict_to_metric(samples, reference, layers["kid"], **kwargs))
    if "prc" in layers:
        out.update(prc_featuresdict_to_metric(samples, reference, layers["prc"], **kwargs))
    return out


def check_metrics(metrics: dict[str, Any]) -> None:
    """The last guard: a score that is NaN/inf never reaches a report (one message naming the metrics)."""
    bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        raise NonFiniteError(f"scores {', '.join(f'{k}={metrics[k]}' for k in bad)} are not finite "
                             "although every feature and statistic was")


def reference_dir(cache_dir: str, fd_dir: Path, data, num_samples: int, device: torch.device, fdnet) -> Path:
    """Cache the reference (test split) features once, and the real-vs-real floor at `num_samples`."""
    key = {"fdnet": fd_dir.name, "data": data.name, "n_test": int(data.test_x.shape[0]), "n": num_samples}

    def build(tmp: Path) -> None:
        idx = torch.randperm(data.train_x.shape[0], generator=generator(0))[:num_samples]
        with Progress("FD reference statistics", 2, unit="parts") as progress:     # core/progress.py
            floor = fidelity(data.train_x[idx], data.test_x, fdnet, tmp, device)
            progress.update(1)
            floor["class_acc"] = class_accuracy(fdnet, data.train_x[idx], data.train_y[idx], device)
            progress.update(2)
        (tmp / "floor.json").write_text(json.dumps(floor, indent=2))
        log.info("prepare: FD reference cached; real-data floor at N=%d: %s", num_samples, floor)

    return cached_dir(cache_dir, "fdref", key, build)


class FDNetScorer:
    """Small profiles: FD, KID, precision/recall in the FD network's features against the test split, and the
    FD network's accuracy on the samples' labels."""

    def __init__(self, fdnet: Any, ref_images: torch.Tensor, ref_dir: Path, device: torch.device) -> None:
        self.fdnet, self.ref_images, self.ref_dir, self.device = fdnet, ref_images, ref_dir, device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return {**fidelity(images, self.ref_images, self.fdnet, self.ref_dir, self.device),
                "class_acc": class_accuracy(self.fdnet, images, labels, self.device)}


class ADMScorer:
    """Paper scale (eval.metric: adm): Inception FID, sFID, IS, precision/recall against the ADM reference
    batch (benchmarks/adm_eval.py). `fd` repeats the FID so reports and the status table read one key."""

    def __init__(self, ref: str | None, inception: str | None, device: torch.device) -> None:
        if not ref:
            raise FileNotFoundError("eval.metric=adm needs eval.adm_ref=<VIRTUAL_imagenet256_labeled.npz> "
                                    "(docs/paper_scale.md)")
        self.device = device
        self.net = ADMInception(inception, device)
        self.reference = load_reference(ref, self.net)
        check_reference(self.reference, ref)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images           # grey -> R = G = B
        acts = self.net.activations(rgb.permute(0, 2, 3, 1).contiguous().numpy())       # NHWC uint8, as ADM reads
        for field in ("pool", "spatial", "logits"):
            check_finite(getattr(acts, field), f"sample Inception activation vectors ({field})",
                         " (the samples are finite uint8: the Inception weights are not)")
        m = score(acts, self.reference, "scipy", self.device)
        out = {"fd": float(m["fid"]), **{k: float(m[k]) for k in ("fid", "sfid", "is", "precision", "recall")}}
        check_metrics(out)
        return out


def check_reference(ref: Any, path: str) -> None:
    """The ADM reference batch's statistics (precomputed in the npz, or from its images) and activations."""
    fix = f" in the reference batch {path} (re-download it; docs/paper_scale.md)"
    for name, st in (("pool", ref.pool), ("spatial", ref.spatial)):
        check_finite(st.mu[:, None], f"entries of the {name} feature mean", fix)
        check_finite(st.sigma, f"rows of the {name} feature covariance", fix)
    check_finite(ref.acts.pool, "reference Inception activation vectors (pool)", fix)


@torch.no_grad()
def class_accuracy(fdnet: Any, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    pred = torch.cat([fdnet.predict(images[i:i + 1000].to(device)).cpu() for i in range(0, images.shape[0], 1000)])
    return float((pred == labels.cpu()).float().mean())


def eval_labels(n: int, num_classes: int, seed: int) -> torch.Tensor:
    """Balanced labels (n / num_classes each, SFD's protocol), shuffled with a fixed seed."""
    y = torch.arange(n) % num_classes
    return y[torch.randperm(n, generator=generator(seed))]


@torch.no_grad()
def generate(method: Any, model: torch.nn.Module, latent: Any, shape: tuple[int, ...], labels: torch.Tensor,
             *, seed: int, batch_size: int, device: torch.device, guidance: Any = "default",
             dist: Dist = Dist()) -> torch.Tensor | None:
    """Sample len(labels) images as uint8 (N,C,H,W); the same seed gives the same noise every eval.

    With several processes, chunk k of `batch_size` samples is drawn by rank k mod world (its noise and
    generator depend only on k, so the images equal a 1-process run's) and rank 0 gathers them; the
    other ranks get None.
    """
    gen = generator(seed, "cpu")
    noise = torch.randn((labels.shape[0], *shape), generator=gen)
    mine, bad = {}, 0
    for k, i in enumerate(range(0, labels.shape[0], batch_size)):
        if k % dist.world != dist.rank:
            continue
        x0, y = noise[i:i + batch_size].to(device), labels[i:i + batch_size].to(device)
        x1 = method.sample(model, x0, y, guidance=guidance, generator=generator(seed + 1 + i, device))
        images = latent.decode(x1.float())
        n_bad = nonfinite_rows(images)
        bad += n_bad
        if not n_bad:
            mine[i] = to_uint8(images).cpu()
    # Every rank learns the total before the gather, so all of them raise together (none waits for the others).
    bad = round(float(mean_over_ranks({"bad": torch.tensor(float(bad), device=device)}, dist)["bad"]) * dist.world)
    if bad:
        raise NonFiniteError(f"{bad} of {labels.shape[0]} decoded samples hold NaN/inf")
    chunks = gather_to_main(mine, dist)
    return None if chunks is None else torch.cat([chunks[i] for i in sorted(chunks)])
