"""docs/adding_a_method.md's worked examples run: each ```python block starting with `# docs-example: <name>`
is executed, and the component it registers is used (a new loss, prediction type, sampler and latent)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from core.registry import LATENTS, LOSSES, PREDICTIONS, SAMPLERS
from core.types import BackboneOut, Batch, Groups
from methods.compose import build_method

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
BLOCK = re.compile(r"```python\n(# docs-example: (\w+)\n.*?)```", flags=re.S)
G2 = Groups(("texture", "semantic"), (3, 2))
REGISTERED = {"loss": (LOSSES, "flow-ramped-doc"), "prediction": (PREDICTIONS, "score-doc"),
              "sampler": (SAMPLERS, "midpoint-doc"), "latent": (LATENTS, "vae-blur-doc")}


@pytest.fixture(scope="module")
def examples():
    """Run every example once (registering its component); unregister afterwards."""
    blocks = {name: code for code, name in BLOCK.findall(DOC.read_text())}
    assert sorted(blocks) == sorted(REGISTERED), sorted(blocks)
    spaces = {}
    for name, code in blocks.items():
        ns: dict = {"__name__": f"docs_example_{name}"}
        exec(compile(code, f"{DOC}:{name}", "exec"), ns)        # noqa: S102 - the repository's own docs
        spaces[name] = ns
    yield spaces
    for reg, key in REGISTERED.values():
        reg._items.pop(key, None)                                 # noqa: SLF001 - test cleanup only


def _method(**over) -> dict:
    m = {"name": "doc", "latent": {"name": "vae"}, "schedule": {"name": "flow"}, "loss": {"name": "flow"},
         "sampler": {"name": "ode", "solver": "heun", "steps": 9}, "guidance": None}
    return {**m, **over}


def _train_and_sample(method, groups: Groups) -> torch.Tensor:
    c = groups.channels
    net = torch.nn.Conv2d(c, c, 1)
    batch = Batch(torch.randn(4, c, 4, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(4, dtype=torch.long), {})
    out = method.losses(lambda xt, tm, y, hidden_at=(): BackboneOut(net(xt)), batch, torch.Generator().manual_seed(1))
    assert torch.isfinite(out.total)
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.no_grad():
        return method.sampler(lambda xt, tm, y: net(xt), torch.randn(2, c, 4, 4), torch.zeros(2), schedule=method.schedule)


def test_loss_example(examples):
    m = build_method(_method(loss={"name": "flow-ramped-doc"}), groups=G2)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(5, 5, 1)
    batch = Batch(torch.randn(4, 5, 4, 4), torch.zeros(4, dtype=torch.long), {})
    out = m.losses(lambda xt, tm, y, hidden_at=(): BackboneOut(net(xt)), batch, torch.Generator().manual_seed(1))
    assert set(out.terms) == {"mse", "ramp"} and torch.isfinite(out.total)
    torch.testing.assert_close(out.total, out.terms["mse"] + out.terms["ramp"])


def test_prediction_example_matches_the_exact_gaussian_velocity(examples):
    p = PREDICTIONS.get("score-doc")(t_eps=1e-3)
    x = torch.randn(8, 5, 2, 2, dtype=torch.float64)
    t = torch.rand(8, 1, 1, 1, dtype=torch.float64) * 0.8 + 0.1
    mu, s2 = 0.3, 0.5                                           # x1 ~ N(0.3, 0.5)
    st2 = t ** 2 * s2 + (1 - t) ** 2
    x1, x0 = mu + t * s2 * (x - t * mu) / st2, (1 - t) * (x - t * mu) / st2
    score = -x0 / (1 - t)
    torch.testing.assert_close(p.to_velocity(score, x, t), x1 - x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.from_velocity(x1 - x0, x, t), score, rtol=1e-10, atol=1e-10)
    m = build_method(_method(schedule={"name": "flow", "prediction": "score-doc", "loss_target": "velocity"}), groups=G2)
    assert m.schedule.singular_at == 0.0
    assert torch.isfinite(_train_and_sample(m, G2)).all()


def test_sampler_example_integrates_any_prediction(examples):
    s = SAMPLERS.get("midpoint-doc")(steps=33)
    mu, s2 = 0.3, 0.5

    def data_oracle(x, t, y):
        t = t[:, :, None, None].to(x)
        return mu + t * s2 * (x - t * mu) / (t ** 2 * s2 + (1 - t) ** 2)

    m = build_method(_method(schedule={"name": "flow", "prediction": "data", "t_eps": 1e-3},
                             sampler={"name": "midpoint-doc", "steps": 33}), groups=G2)
    noise = torch.randn(16, 5, 2, 2, dtype=torch.float64)
    x = s(data_oracle, noise, torch.zeros(16), schedule=m.schedule)
    assert (x - (mu + s2 ** 0.5 * noise)).abs().max() < 0.01 and s.last_nfe == 64
    assert torch.isfinite(_train_and_sample(m, G2)).all()


def test_latent_example(examples):
    class Tok:
        latent_channels = 3

        def encode(self, images, generator=None):
            return images[:, :3, ::2, ::2]

        def decode(self, z):
            return z.repeat_interleave(2, -1).repeat_interleave(2, -2)

    lat = LATENTS.build({"name": "vae-blur-doc"}, artifacts={"texture-vae": Tok()})
    assert lat.groups == Groups(("texture", "semantic"), (3, 3)) and lat.requires == ("texture-vae",)
    x1 = lat.encode(torch.randn(2, 3, 8, 8))["x1"]
    assert x1.shape == (2, 6, 4, 4)
    torch.testing.assert_close(x1[:, 3:, :2, :2], x1[:, :3, :2, :2].mean(dim=(2, 3), keepdim=True).expand(-1, -1, 2, 2))
    lat.set_stats(*lat.stats_from(x1))
    assert lat.decode(lat.normalize(x1)).shape == (2, 3, 8, 8)
    m = build_method(_method(latent={"name": "vae-blur-doc"}, loss={"name": "flow", "group_weights": {"semantic": 2.0}}),
                     groups=lat.groups)
    assert torch.isfinite(_train_and_sample(m, lat.groups)).all()
