"""core/: registry, config schema errors, run folder checkpoints (checksums, atomicity), cache, EMA."""
import json
import threading

import pytest
import torch

from core.cache import MARKER, cached_dir
from core.config import ConfigError, check_keys, structured, to_dict
from core.ema import ema_decay, make_ema, update_ema
from core.registry import Registry
from core.rundir import RunDir, read_jsonl
from core.types import Groups


def test_registry_errors_list_names():
    reg = Registry("thing")
    reg.register("a")(dict)
    with pytest.raises(ValueError):
        reg.register("a")(dict)
    with pytest.raises(KeyError, match="valid: a"):
        reg.get("b")


def test_unknown_top_level_key_is_one_line_with_valid_keys():
    with pytest.raises(ConfigError) as e:
        structured({"train": {"stepz": 3}})
    msg = str(e.value)
    assert "\n" not in msg and "stepz" in msg and "steps" in msg


def test_wrong_type_fails_at_load():
    with pytest.raises(ConfigError, match="steps"):
        structured({"train": {"steps": "many"}})


def test_check_keys_names_valid_keywords():
    def ctor(groups, *, scale: float = 1.0, steps: int = 3):
        return None
    check_keys("x", ctor, {"name": "x", "scale": 2.0}, deps=("groups",))
    with pytest.raises(ConfigError, match="scale, steps"):
        check_keys("x", ctor, {"scael": 2.0}, deps=("groups",))


def test_groups_slices_and_expand():
    g = Groups(("texture", "semantic"), (4, 2))
    assert g.channels == 6 and g.slice_of("semantic") == slice(4, 6)
    e = g.expand(torch.tensor([[1.0, 2.0]]))
    assert e.shape == (1, 6, 1, 1) and e.flatten().tolist() == [1, 1, 1, 1, 2, 2]
    with pytest.raises(KeyError, match="texture, semantic"):
        g.index("colour")


def test_checkpoint_checksum_falls_back_to_previous(tmp_path):
    rd = RunDir(tmp_path)
    rd.save_checkpoint(10, {"w": torch.ones(3)}, keep=3)
    rd.save_checkpoint(20, {"w": torch.full((3,), 2.0)}, keep=3)
    path = rd.checkpoints()[-1][1]
    path.write_bytes(path.read_bytes()[:-7])      # truncated write
    st = rd.load_latest()
    assert torch.equal(st["w"], torch.ones(3))


def test_checkpoint_keep_prunes_by_step_name(tmp_path):
    rd = RunDir(tmp_path)
    for s in (5, 10, 15, 20):
        rd.save_checkpoint(s, {"s": torch.tensor(s)}, keep=2)
    assert [s for s, _ in rd.checkpoints()] == [15, 20]


def test_jsonl_ignores_truncated_line(tmp_path):
    rd = RunDir(tmp_path)
    rd.append("eval.jsonl", {"step": 0, "fd": 1.0})
    with open(tmp_path / "eval.jsonl", "a") as f:
        f.write('{"step": 5, "fd"')
    assert read_jsonl(tmp_path / "eval.jsonl") == [{"step": 0, "fd": 1.0}]


def test_cache_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(d):
        calls.append(1)
        (d / "x.txt").write_text("hello")

    outs = []
    threads = [threading.Thread(target=lambda: outs.append(cached_dir(tmp_path, "k", {"a": 1}, build)))
               for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1 and len(set(outs)) == 1 and (outs[0] / MARKER).exists()
    assert cached_dir(tmp_path, "k", {"a": 2}, build) != outs[0] and len(calls) == 2


def test_cache_rebuilds_incomplete(tmp_path):
    def bad(d):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cached_dir(tmp_path, "k", {"a": 1}, bad)
    out = cached_dir(tmp_path, "k", {"a": 1}, lambda d: (d / "ok").write_text("1"))
    assert (out / "ok").exists()


def test_ema_init_exact_and_update():
    m = torch.nn.Linear(3, 2)
    ema = make_ema(m)
    for a, b in zip(ema.parameters(), m.parameters()):
        assert torch.equal(a, b)      # docs/methods.md §11.17
    with torch.no_grad():
        m.weight.add_(1.0)
    before = ema.weight.clone()
    update_ema(ema, m, 0.9)
    assert torch.allclose(ema.weight, 0.9 * before + 0.1 * m.weight)
    assert ema_decay(0.999, 0, True) == pytest.approx(0.1) and ema_decay(0.999, 10**6, True) == 0.999


def test_to_dict_resolves_defaults():
    cfg = to_dict(structured({"method": {"name": "m"}}))
    assert cfg["train"]["steps"] > 0 and json.dumps(cfg)


def _build_slowly(root, counter):
    import time as _t

    def build(d):
        with open(counter, "a") as f:
            f.write("built\n")
        _t.sleep(0.5)
        (d / "payload.txt").write_text("ok")

    return str(cached_dir(root, "k", {"same": True}, build))


def test_two_processes_preparing_the_same_cache_build_it_once(tmp_path):
    import multiprocessing as mp

    counter = tmp_path / "builds.txt"
    with mp.get_context("fork").Pool(2) as pool:
        outs = pool.starmap(_build_slowly, [(tmp_path / "cache", counter)] * 2)
    assert len(set(outs)) == 1 and counter.read_text() == "built\n"
    assert (tmp_path / "cache").joinpath(outs[0].split("/")[-1], "payload.txt").read_text() == "ok"


def test_seeded_init_is_not_disturbed_by_another_thread():
    """prepare trains artifacts in threads that share torch's global RNG: a seeded initialisation must
    draw the same numbers whatever another thread seeds meanwhile (core/seed.py seeded_init)."""
    import time

    from core.seed import seeded_init

    def draw(seed, started=None, hold=0.0):
        with seeded_init(seed):
            first = torch.randn(4)
            if started is not None:
                started.set()
            time.sleep(hold)              # a: the other thread is seeded meanwhile; b: keeps its seed set
            return torch.cat([first, torch.randn(4)])

    started, got = threading.Event(), {}
    a = threading.Thread(target=lambda: got.setdefault("a", draw(1, started, hold=0.1)))
    b = threading.Thread(target=lambda: (started.wait(), got.setdefault("b", draw(2, hold=0.3))))
    before = torch.random.get_rng_state()
    a.start(); b.start(); a.join(); b.join()
    assert torch.equal(got["a"], draw(1)) and torch.equal(got["b"], draw(2))
    assert torch.equal(torch.random.get_rng_state(), before)      # the caller's RNG state is untouched
