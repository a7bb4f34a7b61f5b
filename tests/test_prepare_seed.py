"""prepare.seed: the artifact build as a replicate axis (issue 17; docs/grids.md, "Replicating over artifact builds").

Build b != 0 re-seeds every seeded artifact but the FD network; build 0 must leave every cache key and run id
exactly as it was before the key existed (existing caches and reference results stay valid).
"""
from pathlib import Path

import pytest

import benchmarks.data.prepare as prepare
import benchmarks.data.run_data as run_data
from benchmarks.config.grid import expand, resolve
from benchmarks.config.plugins import load_all
from benchmarks.data.prepare import FD_NET, artifact_plan, canonical_prepare, prepare_build, stream_cache_dirs
from core.config import ConfigError

load_all()

# Cache names of the hand-made config below, computed with the code before prepare.seed existed (commit
# a1ae555) and the data fingerprint pinned: build 0 must reproduce them byte for byte.
BEFORE = {
    "vae-semvae": {"texture-vae": "texture-vae-31e8158b50d5", "semantic-encoder": "semantic-encoder-7dc0abee840f",
                   "semvae": "semvae-439a74a14c22", "fd-net": "fd-net-f17a0e734f69"},
    "vae-pca": {"texture-vae": "texture-vae-31e8158b50d5", "semantic-encoder": "semantic-encoder-7dc0abee840f",
                "pca": "pca-808138330302", "fd-net": "fd-net-f17a0e734f69"},
}
LATENTS = {"vae-semvae": {"name": "vae-semvae"}, "vae-pca": {"name": "vae-pca", "rank": 8}}


@pytest.fixture(autouse=True)
def pinned_fingerprint(monkeypatch):
    """Cache keys hold a content fingerprint of the dataset; pin it so the names are literal and no data is read."""
    monkeypatch.setattr(run_data, "_fingerprint", lambda name, root: "fixed-fingerprint")


def hand_cfg(latent: str, build: int | None = None, **slots) -> dict:
    """A resolved-config stand-in with what artifact_plan reads; `build` None: no prepare.seed key at all."""
    prep = {"texture-vae": {"steps": 20}, "semantic-encoder": {"patch": 4, "train_half": 0},
            "semvae": {"steps": 10}, "pca": {"max_images": 500}, "fd-net": {"train_half": 1}, **slots}
    if build is not None:
        prep["seed"] = build
    return {"method": {"latent": dict(LATENTS[latent])}, "prepare": prep,
            "data": {"name": "fashion-mnist", "root": None, "image_size": 32, "limit_train": 2000,
                     "limit_test": 500, "flips": True, "stream": False},
            "eval": {"metric": "fd-net"}, "cache_dir": "unused"}


def names(cfg: dict) -> dict[str, str]:
    return {n.kind: n.name for n in artifact_plan(cfg)}


@pytest.mark.parametrize("latent", sorted(BEFORE))
def test_build_zero_keeps_every_cache_name_byte_for_byte(latent):
    assert names(hand_cfg(latent)) == BEFORE[latent]
    assert names(hand_cfg(latent, build=0)) == BEFORE[latent]
    plan = artifact_plan(hand_cfg(latent, build=0))
    assert all("seed" not in n.fit_cfg for n in plan)       # no seed written into any fit() call or key


def test_build_reseeds_every_seeded_artifact_but_the_fd_net():
    plan = {n.kind: n for n in artifact_plan(hand_cfg("vae-semvae", build=2))}
    assert plan["texture-vae"].fit_cfg["seed"] == 2000      # fit()'s default 0 + 1000 * 2
    assert plan["semantic-encoder"].fit_cfg["seed"] == 2000
    assert plan["semvae"].fit_cfg["seed"] == 2000
    assert "seed" not in plan[FD_NET].fit_cfg
    got, before = {k: n.name for k, n in plan.items()}, BEFORE["vae-semvae"]
    assert got[FD_NET] == before[FD_NET]
    assert all(got[k] != before[k] for k in before if k != FD_NET)


def test_a_configured_fit_seed_is_offset_not_replaced():
    cfg = hand_cfg("vae-semvae", build=1, **{"texture-vae": {"steps": 20, "seed": 7}})
    plan = {n.kind: n for n in artifact_plan(cfg)}
    assert plan["texture-vae"].fit_cfg == {"steps": 20, "seed": 1007}
    # build 1 of seed 7 is the same artifact as build 0 of seed 1007: one cache folder, content-addressed
    same = hand_cfg("vae-semvae", **{"texture-vae": {"steps": 20, "seed": 1007}})
    assert names(same)["texture-vae"] == plan["texture-vae"].name


def test_builds_give_their_own_latent_cache_and_share_the_fd_net_folder():
    def folders(build):
        cfg = hand_cfg("vae-semvae", build=build)
        dirs = {n.kind: Path("cache") / n.name for n in artifact_plan(cfg)}
        enc, latent = stream_cache_dirs(cfg, dirs)
        return dirs, enc, latent

    d0, e0, l0 = folders(0)
    d1, e1, l1 = folders(1)
    assert (d0, e0, l0) == folders(None)
    assert l0 != l1 and l0.name.startswith("latents-") and l1.name.startswith("latents-")
    assert e0["texture-vae"] != e1["texture-vae"] and e0["semantic-encoder"] != e1["semantic-encoder"]
    assert d0[FD_NET] == d1[FD_NET]


def test_pretrained_slot_without_a_seed_is_the_same_in_every_build():
    cfg = lambda b: hand_cfg("vae-pca", build=b, **{"semantic-encoder": {"use": "dinov2"}})  # noqa: E731
    n0, n1 = names(cfg(0)), names(cfg(1))
    plan1 = {n.kind: n for n in artifact_plan(cfg(1))}
    assert "seed" not in plan1["semantic-encoder"].fit_cfg
    assert n0["semantic-encoder"] == n1["semantic-encoder"]
    assert n0["pca"] != n1["pca"]                              # PCA over its tokens is seeded: rebuilt
    assert n0[FD_NET] == n1[FD_NET]


@pytest.mark.parametrize("bad", [True, False, -1, 1.5, "one", None, 1_000_000])
def test_bad_build_values_fail_in_one_line(bad):
    cfg = hand_cfg("vae-pca")
    cfg["prepare"]["seed"] = bad
    with pytest.raises(ConfigError, match=r"^prepare\.seed must be an integer in \[0, 999999\].*got") as e:
        prepare_build(cfg)
    assert "\n" not in str(e.value)


def test_canonical_prepare_drops_only_build_zero():
    assert "seed" not in canonical_prepare(hand_cfg("vae-pca", build=0))["prepare"]
    assert canonical_prepare(hand_cfg("vae-pca", build=3))["prepare"]["seed"] == 3
    with pytest.raises(ConfigError):
        canonical_prepare(hand_cfg("vae-pca", build=False))     # false == 0, but it is no build index


# ----------------------------------------------------------------------------- through the grid
def test_resolve_with_build_zero_is_the_config_without_the_key():
    plain = resolve("smoke", {"method": "sfd", "seed": 0}, check_files=False)
    zero_axis = resolve("smoke", {"method": "sfd", "prepare.seed": 0, "seed": 0}, check_files=False)
    zero_cli = resolve("smoke", {"method": "sfd", "seed": 0}, cli=["prepare.seed=0"], check_files=False)
    assert plain == zero_axis == zero_cli and "seed" not in plain["prepare"]
    one = resolve("smoke", {"method": "sfd", "seed": 0}, cli=["prepare.seed=1"], check_files=False)
    assert one["prepare"]["seed"] == 1


@pytest.mark.parametrize("value", ["true", "-2", "0.5", "abc"])
def test_resolve_refuses_a_bad_build_in_one_line(value):
    with pytest.raises(ConfigError, match=r"^prepare\.seed must be an integer"):
        resolve("smoke", {"method": "sit", "seed": 0}, cli=[f"prepare.seed={value}"], check_files=False)


def test_grid_axis_gives_a_run_per_build_with_the_build_in_its_label(tmp_path):
    grid = tmp_path / "builds.yaml"
    grid.write_text("profile: smoke\naxes:\n  method: [sfd]\n  prepare.seed: [0, 1]\n  seed: [0, 1]\n")
    runs = expand(str(grid), check_files=False).runs
    assert len(runs) == 4 and len({r.run_id for r in runs}) == 4
    assert [(r.label["prepare.seed"], r.label["seed"]) for r in runs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len({r.group for r in runs}) == 1                # builds and seeds are replicates of one curve
    base = resolve("smoke", {"method": "sfd", "seed": 0}, check_files=False)
    assert runs[0].cfg == base                               # build 0 of the axis: today's config
    assert runs[2].cfg["prepare"]["seed"] == 1 and runs[2].cfg["seed"] == 0


def test_command_line_build_changes_the_run_id_and_is_recorded():
    base = expand("smoke", check_files=False).runs[0]
    zero = expand("smoke", ["prepare.seed=0"], check_files=False).runs[0]
    one = expand("smoke", ["prepare.seed=1"], check_files=False).runs[0]
    assert zero.run_id == base.run_id and zero.label == base.label and "prepare.seed" not in base.label
    assert one.run_id != base.run_id and one.label["prepare.seed"] == 1
    assert {n.kind: n.name for n in artifact_plan(one.cfg)}[FD_NET] == \
        {n.kind: n.name for n in artifact_plan(base.cfg)}[FD_NET]


class _Serial:
    """A stand-in for ThreadPoolExecutor that runs the calls one after the other, in order."""

    def __init__(self, max_workers=None):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, *iterables):
        return [fn(*args) for args in zip(*iterables)]


def test_latent_cache_splits_in_threads_are_bit_identical_to_serial(tmp_path, monkeypatch):
    """The images and their flips are composed in two threads; the cache must be byte for byte the serial one."""
    import shutil
    from core.cache import full_digest

    monkeypatch.undo()                                          # real data fingerprint: this test reads the data
    specs = [s for s in expand("sfd_vs_redi", ["profile=smoke", f"cache_dir={tmp_path / 'c'}"]).runs
             if s.cfg["method"]["name"] == "sfd"]
    cfg = specs[0].cfg
    threaded = prepare.prepare_run(cfg).latent_dir
    digest = full_digest(threaded / "train.safetensors")
    shutil.rmtree(threaded)
    monkeypatch.setattr(prepare, "ThreadPoolExecutor", _Serial)
    serial = prepare.prepare_run(cfg).latent_dir
    assert serial == threaded and full_digest(serial / "train.safetensors") == digest
