"""A method from an external package: an entry point registers a new loss, SEMPRIOR_CONFIG_PATH adds its
preset and grid, and the grid runs end to end (docs/adding_a_method.md)."""
import sys
import textwrap

import pytest

from benchmarks import run as cli
from core.plugins import load_plugins
from core.registry import LOSSES

pytestmark = pytest.mark.slow

PLUGIN = '''
import torch
from core.registry import LOSSES
from core.types import LossOut
from methods.losses import FlowLoss


@LOSSES.register("flow-ramped-test")
class RampedFlowLoss(FlowLoss):
    """Velocity MSE plus the texture error weighted by the texture time."""

    def forward(self, out, target, ctx):
        base = super().forward(out, target, ctx)
        tex = self.groups.slice_of("texture")
        t_tex = ctx.t_groups[:, self.groups.index("texture")]
        err = (out.out[:, tex] - target[:, tex]).pow(2).mean(dim=(1, 2, 3))
        extra = (t_tex * err).mean()
        return LossOut(base.total + extra, {**base.terms, "ramp": extra.detach()})
'''


def test_entry_point_plugin_runs_a_grid(tmp_path, monkeypatch, smoke_cache):
    site = tmp_path / "site"
    (site / "ramped_plugin").mkdir(parents=True)
    (site / "ramped_plugin" / "__init__.py").write_text(PLUGIN)
    dist = site / "ramped_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ramped-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[semprior_bench.plugins]\nramped = ramped_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    configs = tmp_path / "configs"
    (configs / "method").mkdir(parents=True)
    (configs / "grid").mkdir()
    (configs / "method" / "ramped.yaml").write_text(textwrap.dedent("""
        method:
          name: ramped
          latent: {name: vae}
          schedule: {name: flow, time_dist: logit-normal}
          loss: {name: flow-ramped-test}
          sampler: {name: ode, solver: euler, steps: 10}
    """))
    (configs / "grid" / "ramped_grid.yaml").write_text(
        "profile: smoke\naxes: {method: [ramped], backbone: [lightningdit-tiny], seed: [0]}\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(configs))

    assert "ramped" in load_plugins() or "flow-ramped-test" in LOSSES
    assert "flow-ramped-test" in LOSSES
    code = cli.main(["grid=ramped_grid", f"results={tmp_path / 'results'}", f"cache_dir={smoke_cache}",
                     "launcher=inline"])
    assert code == 0
    metrics = (next((tmp_path / "results" / "ramped_grid").glob("ramped-*")) / "metrics.jsonl").read_text()
    assert '"loss/ramp"' in metrics
    sys.modules.pop("ramped_plugin", None)
