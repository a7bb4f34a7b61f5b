"""Every YAML loads and validates; grids expand to the expected counts; presets match the spec."""
import pytest

from benchmarks.api import preset, presets
from benchmarks.config.grid import available, expand, load_yaml
from core.config import ConfigError

EXPECTED = {"smoke": 1, "baseline": 4, "sfd_vs_redi": 6, "all_methods": 10, "sfd_delta_t": 6, "compositions": 4,
            "residual_precision": 8, "prior_strength": 12, "sfd_vs_redi_builds": 18,
            "sfd_vs_redi_long": 3}


@pytest.mark.parametrize("grid", sorted(EXPECTED))
def test_grid_expands(grid):
    g = expand(grid)
    assert len(g.runs) == EXPECTED[grid]
    assert len({r.run_id for r in g.runs}) == len(g.runs)
    assert expand(grid).runs[0].run_id == g.runs[0].run_id          # deterministic ids


def test_residual_precision_grid_pairs_the_two_streams():
    """Each (method, seed) runs once per residual precision, all else equal (issue 4's numerics study)."""
    runs = expand("residual_precision").runs
    by = {}
    for r in runs:
        by.setdefault((r.cfg["method"]["name"], r.cfg["seed"]), set()).add(r.cfg["train"]["precision"])
    assert len(by) == 4 and all(v == {"bf16", "bf16-residual"} for v in by.values())


def test_prior_strength_swaps_only_the_semantic_slot():
    """The strength ablation: each method once per class in the semantic-encoder slot, nothing else varies."""
    runs = expand("prior_strength").runs
    use = {(r.cfg["method"]["name"], r.cfg["prepare"]["semantic-encoder"]["use"]) for r in runs}
    assert use == {(m, u) for m in ("sit", "repa", "redi", "sfd")
                   for u in ("semantic-encoder", "supervised-encoder", "fdnet-oracle")}
    assert expand("sfd_vs_redi").runs[0].cfg["prepare"]["semantic-encoder"]["use"] == "supervised-encoder"   # default


def test_every_grid_is_tested():
    assert set(available("grid")) == set(EXPECTED)


@pytest.mark.parametrize("profile", ["tiny", "smoke"])
@pytest.mark.parametrize("name", presets())
def test_presets_resolve(name, profile):
    m = preset(name, profile)
    assert m["name"] == name


def test_sfd_preset_matches_spec():
    m = preset("sfd")                       # docs/methods.md §6.3-6.6
    assert m["schedule"] == {"name": "async-flow", "delta_t": {"texture": 0.3}, "time_dist": "logit-normal"}
    assert m["loss"]["group_weights"] == {"semantic": 2.0} and m["loss"]["cosine_weight"] == 1.0
    assert m["loss"]["repa"] == {"depth": 2, "weight": 1.0, "mode": "cos"}
    assert m["backbone"] == {"qk_norm": True, "time_embed_order": [1, 0]}
    assert preset("sfd", "tiny")["loss"]["repa"]["depth"] == 1


def test_repa_and_redi_presets_match_spec():
    repa, redi = preset("repa"), preset("redi")
    assert repa["loss"]["repa"] == {"depth": 8, "weight": 0.5, "mode": "neg-cos"}       # docs/methods.md §3
    assert repa["guidance"]["interval"] == [0.3, 1.0]                                  # t_REPA <= 0.7
    assert redi["latent"]["rank"] == 8 and redi["loss"]["drop"] == {"group": "semantic", "prob": 0.2}
    assert redi["guidance"]["channels"] == "0:4"                                       # cfg-vae


def test_delta_t_sweep_values():
    g = expand("sfd_delta_t")
    dts = [r.cfg["method"]["schedule"]["delta_t"]["texture"] for r in g.runs]
    assert dts == [0.0, 0.1, 0.2, 0.3, 0.5, 0.7] and g.sweep


def test_grid_with_empty_axis_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "empty.yaml").write_text("profile: smoke\naxes: {method: []}\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="no runs"):
        expand("empty")


def test_unknown_method_in_grid_lists_presets(tmp_path, monkeypatch):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "bad.yaml").write_text("profile: smoke\naxes: {method: [sdf]}\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="unknown method 'sdf'; valid: .*sfd"):
        expand("bad")


def test_misspelled_component_key_names_valid_keys():
    with pytest.raises(ConfigError, match="unknown key 'delta'.*time_dist"):
        expand("smoke", ["method.schedule.delta=0.3"])


def test_yaml_is_loaded_safely(tmp_path, monkeypatch):
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "evil.yaml").write_text("axes: !!python/object/apply:os.system ['true']\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(tmp_path))
    with pytest.raises(Exception, match="(?i)could not determine a constructor|constructor"):
        load_yaml("grid", "evil")
