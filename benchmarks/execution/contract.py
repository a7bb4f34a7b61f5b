"""The suite's contract for one method preset, callable by a plugin author (docs/adding_a_method.md):
built from a profile's real caches, a training step gives a finite loss and a finite gradient on every
trainable parameter, sampling gives finite latents and decodable images of the right shape, and a
save/load round trip reproduces the model's outputs. tests/test_contract.py checks every built-in preset
the same way; tests/test_plugins.py runs this on the example plugin under examples/.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from benchmarks.build.components import build_run
from benchmarks.config.grid import resolve
from benchmarks.data.prepare import prepare_run

CPU = torch.device("cpu")


class ContractError(AssertionError):
    """A method preset broke the contract; the message names the preset and what failed."""


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ContractError(f"method {name!r}: {what}")


def check_method(name: str, *, cache_dir: str | Path, profile: str = "smoke", backbone: str = "lightningdit-tiny",
                 steps: int = 2, n_samples: int = 4) -> dict[str, Any]:
    """Run the contract on the preset `name` (a method YAML found in benchmarks/configs/method/ or in a
    SEMPRIOR_CONFIG_PATH folder; its components registered, e.g. by an entry-point plugin).

    Args:
        cache_dir: where the profile's shared artifacts and latent caches live (built on first use)
        steps: optimizer steps before the gradient check (2: zero-initialised output layers have moved)
    Returns: {"loss": last total loss, "nfe": the sampler's model calls, "sample_shape": (N, C, H, W) latents,
        "image_shape": (N, C, H, W) decoded images}.
    Raises: ContractError naming the preset and the broken promise.
    """
    cfg = resolve(profile, {"method": name, "backbone": backbone, "seed": 0}, cli=[f"cache_dir={cache_dir}"])
    parts = build_run(cfg, prepare_run(cfg, CPU), CPU)
    model, method = parts.model, parts.method
    params = [*model.parameters(), *method.loss.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(steps):
        torch.manual_seed(step)
        out = method.losses(model.train(), parts.feed.batch(step))
        _check(bool(torch.isfinite(out.total)), name, f"training loss is not finite at step {step}: {out.terms}")
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
    bad = [n for n, p in [*model.named_parameters(), *method.loss.named_parameters()]
           if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    _check(not bad, name, f"no finite gradient for {bad}")
    _check(sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0, name, "every gradient is zero")

    model.eval()
    noise, y = torch.randn(n_samples, *parts.latent_shape), torch.arange(n_samples)
    x1 = method.sample(model, noise, y, generator=torch.Generator().manual_seed(0))
    _check(x1.shape == noise.shape and bool(torch.isfinite(x1).all()), name,
           f"sample has shape {tuple(x1.shape)} (want {tuple(noise.shape)}) or non-finite values")
    img = parts.latent.decode(x1)
    _check(img.shape[0] == n_samples and bool(torch.isfinite(img).all()), name, "decoded images are not finite")

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "loss": method.loss.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_run(cfg, prepare_run(cfg, CPU), CPU)
    fresh.model.load_state_dict(state["model"])
    fresh.method.loss.load_state_dict(state["loss"])
    t = torch.rand(n_samples, method.schedule.num_time_inputs)
    with torch.no_grad():
        _check(torch.equal(fresh.model.eval()(noise, t, y).out, model(noise, t, y).out), name,
               "a save/load round trip changes the model's outputs")
    return {"loss": float(out.total.detach()), "nfe": method.last_nfe,
            "sample_shape": tuple(x1.shape), "image_shape": tuple(img.shape)}
