"""FID-50K of a model at paper scale: sample with the method's own sampler and settings (docs/methods.md §9), decode with
the model's tokenizer, pack the ADM npz (balanced labels, shuffled with seed 42) and score it with the ADM
protocol (benchmarks/adm_eval.py). The entry point is `python -m benchmarks.evaluate checkpoint=...`.

Sampling is sharded over the processes of a torchrun / multi-task SLURM job: chunk k of `batch_size`
samples is drawn by rank k mod world with noise seeded by (seed, k), so the images do not depend on the
number of GPUs; each chunk is written as it finishes (a killed job redoes only missing chunks), and rank 0
merges them into one npz.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.evaluation.adm import evaluate as adm_evaluate, resolve_inception_weights
from benchmarks.evaluation.adm_npz import balanced_labels, merge_shards, write_shard
from benchmarks.evaluation.importers import attach_guide, load_official
from core.dist import Dist, barrier, setup
from core.registry import ENCODERS
from core.seed import generator
from core.types import check_finite, to_uint8
from encoders.pretrained import LDMVAE, load_latent_stats
from methods.latents import VAELatent

log = logging.getLogger(__name__)

# Each official model's tokenizer (docs/methods.md §1-§6): the one whose latents it was trained on.
TOKENIZER = {"dit": "sd-vae-ft-ema", "repa": "sd-vae-ft-ema", "vavae": "vavae-f16d32", "sfd": "ldm-f16d32"}
SD_VAE_SCALE = 0.18215      # DiT/SiT/REPA scale SD-VAE latents by one global factor, not per-channel stats


def build_decoder(method: str, tokenizer: str | None, stats: str | None, device: torch.device | str) -> Any:
    """A latent builder that decodes the model's samples: the method's pretrained tokenizer (`tokenizer`: a
    local file / folder, or None for the hub cache) and its latent statistics (`stats`: the released
    latents_stats.pt of the f16d32 tokenizers; SD-VAE models use mean 0, std 1/0.18215)."""
    if method not in TOKENIZER:
        raise ValueError(f"no paper tokenizer for method {method!r}; known: {', '.join(TOKENIZER)}")
    cls = ENCODERS.get(TOKENIZER[method])
    source = ({"weights": tokenizer, "trust_pickle": False} if issubclass(cls, LDMVAE)
              else {"source": tokenizer or cls.hub_id, "subfolder": None})
    tok = cls.from_source(source, device)
    latent = VAELatent({"texture-vae": tok})
    c = tok.latent_channels
    if stats is not None:
        mean, std = load_latent_stats(stats, channels=c)
    elif TOKENIZER[method].startswith("sd-vae"):
        mean, std = torch.zeros(1, c, 1, 1), torch.full((1, c, 1, 1), 1 / SD_VAE_SCALE)
    else:
        raise ValueError(f"{TOKENIZER[method]} latents are normalised per channel: pass stats=<latents_stats.pt> "
                         f"(docs/paper_scale.md says where it comes from)")
    latent.set_stats(mean, std)
    return latent


def sample_npz(method: Any, model: torch.nn.Module, latent: Any, shape: tuple[int, ...], labels: np.ndarray,
               out_dir: str | Path, *, seed: int = 0, batch_size: int = 125, device: torch.device | str = "cpu",
               guidance: Any = "default", dist: Dist = Dist()) -> Path | None:
    """Sample len(labels) images into out_dir/chunks/ (one file per chunk, resumable) and, on rank 0, the
    merged and shuffled out_dir/samples.npz (ADM layout). Returns its path on rank 0, None elsewhere."""
    out_dir, device = Path(out_dir), torch.device(device)
    chunks = out_dir / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    t0, done = time.time(), 0
    for k, i in enumerate(range(0, len(labels), batch_size)):
        path = chunks / f"samples_rank{k}.npz"
        if k % dist.world != dist.rank or path.exists():
            continue
        y = torch.as_tensor(labels[i:i + batch_size], dtype=torch.long)
        noise = torch.randn((len(y), *shape), generator=generator(seed * 1_000_003 + k))
        with torch.no_grad():
            x1 = method.sample(model, noise.to(device), y.to(device), guidance=guidance,
                               generator=generator(seed * 1_000_003 + k + 1, device))
            decoded = latent.decode(x1.float())
            # NaN/inf would become black pixels that get scored: refuse before this chunk is written
            check_finite(decoded, "decoded samples", f" in chunk {k} (samples {i}-{i + len(y) - 1}); nothing of "
                         "it was written (check guidance=, sampler.* and the checkpoint)")
            images = to_uint8(decoded).permute(0, 2, 3, 1).cpu().numpy()     # (n, H, W, 3)
        write_shard(images, y.numpy(), chunks, rank=k, index=np.arange(i, i + len(y)))       # atomic
        done += len(y)
        log.info("rank %d: chunk %d (%d images, %.1f img/s)", dist.rank, k, len(y), done / (time.time() - t0))
    barrier(dist)
    if not dist.main:
        return None
    return merge_shards(chunks, out_dir / "samples.npz", shuffle_seed=42, expected=len(labels))


def parse_guidance(text: str) -> Any:
    """"method" (the preset's paper guidance), "none", or "<name>:<scale>" (cfg, autoguidance: the SFD
    headline is autoguidance:1.5 with guide=<the B/1 guide checkpoint>)."""
    if text in ("method", "none"):
        return None if text == "none" else "method"
    name, _, scale = text.partition(":")
    if name not in ("cfg", "autoguidance") or not scale:
        raise ValueError(f"guidance={text!r}: valid: method, none, cfg:<scale>, autoguidance:<scale>")
    return {"name": name, "scale": float(scale)}


def evaluate_checkpoint(checkpoint: str, kind: str, *, ref: str, inception: str | None, tokenizer: str | None,
                        stats: str | None, out: str, num_samples: int = 50_000, batch_size: int = 125,
                        seed: int = 0, guidance: str = "method", guide: str | None = None,
                        sampler: dict | None = None, device: str | None = None, fd: str = "scipy",
                        num_classes: int | None = None, overrides: list[str] | None = None) -> dict | None:
    """Import an official checkpoint (benchmarks/evaluation/importers.py), sample `num_samples` balanced-label images with
    the kind's method preset (its paper sampler; `sampler` overrides keys), decode, pack and score them.
    num_classes: draw labels from the first N classes only (quick checks; the protocol uses all 1000).
    overrides: a dotlist on the method preset (`method.KEY=VALUE`)."""
    if not Path(ref).is_file():       # fail before loading a 2.7 GB model and sampling for hours
        raise FileNotFoundError(f"ADM reference batch {ref} does not exist (docs/paper_scale.md: where to get it)")
    resolve_inception_weights(inception)
    dist = setup()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        dev = torch.device("cuda", dist.local_rank)
    imp = load_official(checkpoint, kind, device=dev)
    method = imp.build_method(overrides=overrides or (), sampler_overrides=sampler, guidance=parse_guidance(guidance))
    if guide is not None:
        attach_guide(method, load_official(guide, "sfd-guide-b-1", device=dev))
    latent = build_decoder(imp.kind.method, tokenizer, stats, dev)
    labels = balanced_labels(num_samples, num_classes or imp.model.num_classes)
    npz = sample_npz(method, imp.model, latent, imp.latent_shape, labels, out, seed=seed, batch_size=batch_size,
                     device=dev, dist=dist)
    if npz is None:
        return None
    return adm_evaluate(npz, ref, inception, device=dev, fd=fd)
