"""Fair by construction (issue 15): wrong sampler/schedule pairings, **kwargs constructors and eval
overrides fail or apply at build time, with messages that say what is wrong and the fix."""
from __future__ import annotations

import textwrap

import pytest
import torch

from benchmarks import run as cli
from benchmarks.config.grid import expand
from core.config import ConfigError, check_keys
from core.registry import SAMPLERS, SCHEDULES
from core.types import Groups
from methods.compose import build_method, sampler_config, samplers_for
from methods.samplers import ODESampler
from methods.schedules import Flow

G = Groups(("texture",), (4,))


def _method(schedule: dict, sampler: dict, name: str = "m") -> dict:
    return {"name": name, "latent": {"name": "vae"}, "schedule": schedule, "loss": {"name": "flow"},
            "sampler": sampler, "guidance": None}


@pytest.fixture
def registered():
    """Register test components and remove them afterwards (the registries are process-wide)."""
    added: list[tuple] = []

    def add(registry, name, obj):
        registry.register(name)(obj)
        added.append((registry, name))
        return obj
    yield add
    for registry, name in added:
        registry._items.pop(name, None)      # noqa: SLF001 - test cleanup only


def test_ddpm_schedule_with_the_ode_sampler_is_refused():
    m = {**_method({"name": "ddpm"}, {"name": "ode", "solver": "heun", "steps": 8}), "loss": {"name": "ddpm"}}
    with pytest.raises(ConfigError) as e:
        build_method(m, groups=G)
    assert str(e.value) == ("method.sampler 'ode' cannot integrate method.schedule 'ddpm' (family 'ddpm'; the sampler "
                            "integrates flow); valid samplers for family 'ddpm': ddpm")


def test_flow_schedule_with_the_ddpm_sampler_is_refused():
    with pytest.raises(ConfigError, match=r"^method.sampler 'ddpm' cannot integrate method.schedule 'flow' \(family "
                                          r"'flow'; the sampler integrates ddpm\); valid samplers for family 'flow': "
                                          r"ode, sde$"):
        build_method(_method({"name": "flow"}, {"name": "ddpm"}), groups=G)
    assert samplers_for("flow") == ["ode", "sde"] and samplers_for("ddpm") == ["ddpm"]


def test_wrong_pairing_fails_the_dry_run(tmp_path, monkeypatch, capsys):
    """The silent case of issue 15: a preset with `schedule: ddpm` + `sampler: ode` passed --dry-run and ran."""
    (tmp_path / "method").mkdir()
    (tmp_path / "grid").mkdir()
    (tmp_path / "method" / "mixed.yaml").write_text(textwrap.dedent("""
        method:
          name: mixed
          latent: {name: vae}
          schedule: {name: ddpm}
          loss: {name: ddpm}
          sampler: {name: ode, solver: heun, steps: 8}
    """))
    (tmp_path / "grid" / "mixed_grid.yaml").write_text("profile: smoke\naxes: {method: [mixed]}\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="method.sampler 'ode' cannot integrate method.schedule 'ddpm'"):
        expand("mixed_grid")
    assert cli.main(["grid=mixed_grid", f"results={tmp_path / 'r'}", "--dry-run"]) != 0
    assert "cannot integrate method.schedule 'ddpm'" in capsys.readouterr().err


def test_kwargs_sampler_is_refused(registered):
    class LooseSampler(ODESampler):
        families = ("flow",)

        def __init__(self, **kwargs) -> None:
            super().__init__(solver="heun", steps=50)

    registered(SAMPLERS, "loose-test", LooseSampler)
    with pytest.raises(ConfigError) as e:
        build_method(_method({"name": "flow"}, {"name": "loose-test"}), groups=G)
    assert str(e.value) == (
        f"method.sampler 'loose-test': its constructor {LooseSampler.__module__}.test_kwargs_sampler_is_refused."
        "<locals>.LooseSampler takes **kwargs, so its config keys cannot be checked and evaluation overrides "
        "cannot reach them; declare every parameter by name (docs/adding_a_method.md, 'Fair by construction')")


def test_kwargs_schedule_and_loss_are_refused(registered):
    class LooseFlow(Flow):
        def __init__(self, groups, **kw) -> None:
            super().__init__(groups)

    registered(SCHEDULES, "loose-flow-test", LooseFlow)
    with pytest.raises(ConfigError, match=r"^method.schedule 'loose-flow-test': its constructor .*LooseFlow takes \*\*kw,"):
        build_method(_method({"name": "loose-flow-test"}, {"name": "ode"}), groups=G)


def test_check_keys_refuses_var_keyword_unless_allowed():
    def ctor(a: int = 1, **extra) -> None: ...
    with pytest.raises(ConfigError, match=r"^thing: its constructor .*ctor takes \*\*extra"):
        check_keys("thing", ctor, {"a": 2})
    check_keys("thing", ctor, {"zzz": 2}, allow_var_keyword=True)         # the backbone presets' opt-out


def test_sampler_without_families_is_refused(registered):
    class Bare:
        def __init__(self, steps: int = 4) -> None:
            self.steps = steps

    registered(SAMPLERS, "bare-test", Bare)
    with pytest.raises(ConfigError, match=r"^method.sampler 'bare-test' declares no `families`; set e.g. "):
        build_method(_method({"name": "flow"}, {"name": "bare-test"}), groups=G)


def test_eval_override_reaches_every_sampler_parameter_by_name():
    """Replacing: every key of the override is a constructor parameter of the new sampler. Merging (a
    family the override's sampler cannot integrate): exactly the keys the method's sampler declares."""
    over = {"name": "ode", "solver": "heun", "steps": 8, "last_step": "euler"}
    m = build_method(_method({"name": "flow", "prediction": "data"}, {"name": "sde", "steps": 250}),
                     groups=G, sampler_overrides=over)
    assert isinstance(m.sampler, ODESampler)
    assert (m.sampler.solver, m.sampler.steps, m.sampler.last_step) == ("heun", 8, "euler")
    assert sampler_config({"name": "ddpm", "steps": 250}, over, "ddpm") == {"name": "ddpm", "steps": 8}
    ddpm = {**_method({"name": "ddpm"}, {"name": "ddpm", "steps": 250}), "loss": {"name": "ddpm"}}
    assert build_method(ddpm, groups=G, sampler_overrides=over).sampler.steps == 8


def test_replacing_sampler_scores_an_x_prediction_method_through_its_conversion():
    """The profile's eval sampler (tiny: ode heun 8) replaces JiT's Heun-50; it integrates the converted
    velocity, so an exact x̂1 oracle gives the same sample as the exact velocity oracle."""
    mu, s2 = 0.7, 0.25

    def data_oracle(x, t, y):
        t = t[:, :, None, None].to(x)
        return mu + t * s2 * (x - t * mu) / (t ** 2 * s2 + (1 - t) ** 2)

    def vel_oracle(x, t, y):
        t = t[:, :, None, None].to(x)
        return mu + (t * s2 - (1 - t)) / (t ** 2 * s2 + (1 - t) ** 2) * (x - t * mu)

    over = {"name": "ode", "solver": "heun", "steps": 41}
    jit = build_method(_method({"name": "flow", "prediction": "data", "t_eps": 1e-3},
                               {"name": "ode", "solver": "heun", "steps": 51}), groups=G, sampler_overrides=over)
    sit = build_method(_method({"name": "flow"}, {"name": "sde"}), groups=G, sampler_overrides=over)
    noise = torch.randn(32, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xj = jit.sampler(data_oracle, noise, torch.zeros(32), schedule=jit.schedule)
    xs = sit.sampler(vel_oracle, noise, torch.zeros(32), schedule=sit.schedule)
    exact = mu + s2 ** 0.5 * noise
    assert (xs - exact).abs().max() < 0.01 and (xj - exact).abs().max() < 0.01
    assert jit.sampler.last_nfe == sit.sampler.last_nfe - 1            # JiT skips the model call at t = 1


def test_dopri5_with_a_prediction_singular_at_the_end_is_refused():
    """dopri5 evaluates t = 1; for x-prediction that call goes through the floor and is wrong: refused at build."""
    m = _method({"name": "flow", "prediction": "data"}, {"name": "ode", "solver": "dopri5"})
    with pytest.raises(ConfigError) as e:
        build_method(m, groups=G)
    assert str(e.value) == ("method.sampler 'ode' with method.schedule 'flow': ode solver 'dopri5' evaluates the model "
                            "at t = 1, where prediction 'data' is singular; use solver heun or euler (last_step auto "
                            "makes no call there)")
    build_method(_method({"name": "flow"}, {"name": "ode", "solver": "dopri5"}), groups=G)       # velocity: fine
    sfd = _method({"name": "async-flow", "delta_t": {"semantic": 0.3}, "prediction": "data"}, {"name": "sde"})
    build_method(sfd, groups=Groups(("texture", "semantic"), (3, 2)), sampler_overrides={"name": "ode", "solver": "heun"})
    with pytest.raises(ConfigError, match="dopri5"):
        build_method(sfd, groups=Groups(("texture", "semantic"), (3, 2)), sampler_overrides={"name": "ode", "solver": "dopri5"})
