"""docs/api.md's example runs as written, and the API builds every preset by name."""
import re
from pathlib import Path

import pytest
import torch

from benchmarks import api

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_docs_api_example_runs():
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)          # noqa: S102 - our own documentation
    assert ns["xt"].shape == (8, 48, 16, 16)
    assert set(ns["out"].terms) == {"mse", "cos", "repa"} and torch.isfinite(ns["out"].total)
    assert [round(t, 6) for t, _ in ns["traj"]] == [0.0, 0.3, 1.0, 1.3]
    assert torch.equal(ns["traj"][1][1][:, :32], ns["traj"][0][1][:, :32])   # texture frozen in phase I


@pytest.mark.parametrize("name", api.presets())
def test_every_preset_builds_by_name(name):
    m = api.method(name, groups=api.groups(texture=4, semantic=8), hidden_size=64, encoder_dim=16, profile="tiny")
    t = m.schedule.sample_t(5, device="cpu")
    tg = m.schedule.group_times(t * m.schedule.tau_max)
    assert tg.shape[0] == 5 and (tg >= 0).all() and (tg <= 1).all()
