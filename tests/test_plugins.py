"""A method from an external package: an entry point registers a new loss, SEMPRIOR_CONFIG_PATH adds its
preset and grid, and the grid runs end to end (docs/adding_a_method.md)."""
import sys
import textwrap

import pytest

from benchmarks import run as cli
from core.plugins import load_plugins
from core.registry import LOSSES
from plugin_util import install_plugin

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
    install_plugin(tmp_path, monkeypatch, "ramped_plugin", PLUGIN, "ramped")
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


# ----------------------------------------------------------------------------------------------
# The example plugin package under examples/ (issue 15): a new prediction type in <= 40 lines
# ----------------------------------------------------------------------------------------------
import ast  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "semprior_xpred_plugin"


def _install_example(tmp_path, monkeypatch) -> None:
    """What `pip install -e examples/semprior_xpred_plugin` gives: the package importable and its entry
    points (read from its pyproject.toml) in a dist-info; then the documented mechanism loads it."""
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    eps = meta["project"]["entry-points"]["semprior_bench.plugins"]
    dist = tmp_path / "site" / "semprior_xpred_plugin-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['project']['name']}\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[semprior_bench.plugins]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(EXAMPLE / "configs"))
    load_plugins()


def test_example_plugin_is_small_and_public_only():
    files = sorted((EXAMPLE / "src").rglob("*.py"))
    assert sum(len(f.read_text().splitlines()) for f in files) <= 40
    assert len(list((EXAMPLE / "configs").rglob("*.yaml"))) == 1
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            private = [n for n in names for part in n.split(".")
                       if part.startswith("_") and not (part.startswith("__") and part.endswith("__"))]
            assert not private, (f.name, private)


def test_example_plugin_adds_a_prediction_type_that_trains_and_samples(tmp_path, monkeypatch):
    from benchmarks.api import preset
    from core.registry import PREDICTIONS
    from core.types import BackboneOut, Batch, Groups
    from methods.compose import build_method

    _install_example(tmp_path, monkeypatch)
    assert "displacement" in PREDICTIONS
    disp = PREDICTIONS.get("displacement")(t_eps=1e-3)
    x, t = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.full((4, 3, 1, 1), 0.4, dtype=torch.float64)
    x1 = 0.5 + 0.4 * 0.25 * (x - 0.2) / (0.16 * 0.25 + 0.36)       # exact E[x1|x_t] for x1 ~ N(0.5, 0.25)
    x0 = 0.6 * (x - 0.2) / (0.16 * 0.25 + 0.36)
    torch.testing.assert_close(disp.to_velocity(x1 - x, x, t), x1 - x0, rtol=1e-12, atol=1e-12)

    m = preset("xpred_displacement")
    groups = Groups(("texture",), (3,))
    method = build_method(m, groups=groups, null_label=10)
    assert method.schedule.prediction.name == "displacement" and method.schedule.singular_at == 1.0

    net = torch.nn.Conv2d(3, 3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    batch = Batch(torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(8, dtype=torch.long), {})
    for step in range(3):
        loss = method.losses(lambda xt, tm, y, hidden_at=(): BackboneOut(net(xt)), batch,
                             torch.Generator().manual_seed(step)).total
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.no_grad():
        sample = method.sampler(lambda xt, tm, y: net(xt), torch.randn(2, 3, 4, 4), torch.zeros(2), schedule=method.schedule)
    assert sample.shape == (2, 3, 4, 4) and torch.isfinite(sample).all()
    assert method.sampler.last_nfe == 2 * 20 - 1                    # no model call at t = 1


def test_example_plugin_passes_the_contract(tmp_path, monkeypatch, smoke_cache):
    from benchmarks.execution.contract import check_method

    _install_example(tmp_path, monkeypatch)
    info = check_method("xpred_displacement", cache_dir=smoke_cache)
    assert info["nfe"] == 3 and info["sample_shape"][0] == 4      # the smoke profile's eval sampler: ode euler, 4 points
