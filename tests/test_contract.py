"""Contract over every method preset (the timm pattern): the public check (benchmarks/execution/contract.py: built
from the real smoke-profile caches, training steps give a finite loss and a gradient on every trainable
parameter, sampling gives finite latents and images of the right shape, a save/load round trip reproduces
the outputs), plus the phase figure and the no-host-sync promise of every preset."""
import copy
import dataclasses
import math

import pytest
import torch

from benchmarks.api import presets
from benchmarks.build.components import build_run
from benchmarks.execution.contract import check_method
from benchmarks.config.grid import resolve
from benchmarks.data.prepare import prepare_run
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
def test_preset_train_step_sample_and_roundtrip(name, smoke_cache):
    """The public contract (benchmarks/execution/contract.py, the same check a plugin author runs) on every preset."""
    out = check_method(name, cache_dir=smoke_cache, n_samples=4)
    assert out["image_shape"] == (4, 1, 32, 32) and out["sample_shape"][0] == 4
    assert math.isfinite(out["loss"])


@pytest.mark.parametrize("name", presets())
def test_preset_phase_figure(name, built, tmp_path):
    """The end of every training job draws the per-phase sampling figure with the method's own sampler
    (DiT's DDPM chain included): it must work for every preset, not only the flow ones."""
    from benchmarks.evaluation.phases import phase_figure

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
