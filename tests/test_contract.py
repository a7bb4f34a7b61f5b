"""Contract over every method preset (the timm pattern): built from the real smoke-profile caches, one
training step gives a finite loss and a gradient on every trainable parameter, sampling gives finite
latents and images of the right shape, and a save/load round trip reproduces the outputs."""
import copy
import dataclasses
import io

import pytest
import torch

from benchmarks.api import presets
from benchmarks.components import build_run
from benchmarks.grid import resolve
from benchmarks.prepare import prepare_run
from host_traffic import HostTraffic

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def built(smoke_cache):
    cache = {}

    def get(name):
        if name not in cache:
            cfg = resolve("smoke", {"method": name, "backbone": "lightningdit-tiny", "seed": 0},
                          cli=[f"cache_dir={smoke_cache}"])
            cache[name] = (cfg, build_run(cfg, prepare_run(cfg, CPU), CPU))
        return cache[name]
    return get


@pytest.mark.parametrize("name", presets())
def test_preset_train_step_sample_and_roundtrip(name, built):
    cfg, parts = built(name)
    model, method = parts.model, parts.method
    params = [p for p in model.parameters()] + [p for p in method.loss.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(2):                      # step 2: zero-initialised output layers have moved
        torch.manual_seed(step)
        out = method.losses(model.train(), parts.feed.batch(step))
        assert torch.isfinite(out.total), (name, out.terms)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
    missing = [n for n, p in [*model.named_parameters(), *method.loss.named_parameters()]
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, (name, missing)
    assert sum(float(p.grad.abs().sum()) for p in params) > 0

    model.eval()
    noise, y = torch.randn(4, *parts.latent_shape), torch.arange(4)
    x1 = method.sample(model, noise, y, generator=torch.Generator().manual_seed(0))
    assert x1.shape == noise.shape and torch.isfinite(x1).all()
    img = parts.latent.decode(x1)
    assert img.shape == (4, 1, 32, 32) and torch.isfinite(img).all()

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "loss": method.loss.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_run(cfg, prepare_run(cfg, CPU), CPU)
    fresh.model.load_state_dict(state["model"])
    fresh.method.loss.load_state_dict(state["loss"])
    t = torch.rand(4, method.schedule.num_time_inputs)
    with torch.no_grad():
        assert torch.equal(fresh.model.eval()(noise, t, y).out, model(noise, t, y).out)


@pytest.mark.parametrize("name", presets())
def test_preset_phase_figure(name, built, tmp_path):
    """The end of every training job draws the per-phase sampling figure with the method's own sampler
    (DiT's DDPM chain included): it must work for every preset, not only the flow ones."""
    from benchmarks.phases import phase_figure

    _, parts = built(name)
    path = phase_figure(parts.method, parts.model.eval(), parts.latent, parts.latent_shape, tmp_path / "p.png", n=2)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("name", presets())
def test_preset_train_step_has_no_host_sync(name, built):
    """Every method's training step after the first, run on a non-host device (`meta`: shapes without
    data), reads no device value on the host and copies no host tensor to the device: the GPU path's promise of no host
    syncs per step (docs/performance.md), and what train.cuda_graph's capture needs (core/graphs.py)."""
    _, parts = built(name)
    meta = torch.device("meta")
    model, loss = copy.deepcopy(parts.model).to(meta), copy.deepcopy(parts.method.loss).to(meta)
    method = dataclasses.replace(parts.method, loss=loss)
    b = parts.feed.batch(0)
    batch = type(b)(b.x1.to(meta), b.y.to(meta), {k: v.to(meta) for k, v in b.aux.items()})
    method.losses(model.train(), batch).total.backward()       # the first step may move constants once
    rec = HostTraffic()
    with rec:
        out = method.losses(model, batch)
        out.total.backward()
    assert not rec.found, (name, sorted(rec.found))
