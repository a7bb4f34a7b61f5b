"""Cache folders verified by content (core/cache.py): the manifest, the quick and the full check, damaged
folders rebuilt once under the lock or refused with CorruptFileError, truncated safetensors files named,
folders of an older version adopted, the full check after a crash, and end to end: a smoke run on a
damaged latent cache rebuilds it and scores exactly as the undamaged run."""
import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from core import cache
from core.cache import (LEGACY, MANIFEST, cached_dir, check_folder, full_verification, read_safetensors,
                        sample_spans, verify_dir, verify_level)
from core.config import ConfigError
from core.errors import CorruptFileError

BIG = 4 << 20          # 4 MiB: larger than the 33 sampled blocks, so the quick digest skips some bytes


def _payload(d, calls=None):
    """A cache build: one big binary file, one safetensors file, one JSON file (deterministic content)."""
    if calls is not None:
        calls.append(1)
    (d / "big.bin").write_bytes(torch.arange(BIG // 4, dtype=torch.int32).numpy().tobytes())
    save_file({"x": torch.arange(1000, dtype=torch.float32)}, str(d / "t.safetensors"))
    (d / "info.json").write_text(json.dumps({"a": 1}))


def _build(root, calls=None, **kw):
    return cached_dir(root, "k", {"a": 1}, lambda d: _payload(d, calls), **kw)


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _unsampled_offset(size):
    """A byte offset that no block of the quick digest reads."""
    covered = sorted(sample_spans(size))
    for (a, n), (b, _) in zip(covered, covered[1:]):
        if a + n < b:
            return a + n
    raise AssertionError("every byte is sampled")


# ----------------------------------------------------------------------------- the manifest
def test_manifest_lists_every_file_and_a_fresh_folder_passes_both_checks(tmp_path):
    out = _build(tmp_path)
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(files) == ["big.bin", "info.json", "key.json", "t.safetensors"]
    assert files["big.bin"]["size"] == BIG
    assert check_folder(out, "quick") is None and check_folder(out, "full") is None


def test_sample_spans_cover_head_and_tail_and_small_files_whole():
    assert sample_spans(1000) == [(0, 1000)]
    spans = sample_spans(BIG)
    assert len(spans) == 1 + cache.SAMPLES and spans[0] == (0, cache.BLOCK)
    assert spans[-1][0] + spans[-1][1] == BIG                  # the last block ends at EOF


def test_a_flipped_byte_in_a_sampled_block_fails_the_quick_check(tmp_path):
    out = _build(tmp_path)
    offset, _ = sample_spans(BIG)[7]
    _flip(out / "big.bin", offset + 5)
    assert "big.bin fails its quick digest" in check_folder(out, "quick")


def test_a_flipped_byte_outside_the_samples_passes_quick_and_fails_full(tmp_path):
    out = _build(tmp_path)
    _flip(out / "big.bin", _unsampled_offset(BIG))
    assert check_folder(out, "quick") is None
    assert "big.bin fails its sha256" in check_folder(out, "full")


def test_a_truncated_file_fails_by_size_and_a_reader_is_told_the_folder_and_the_fix(tmp_path):
    out = _build(tmp_path)
    with open(out / "t.safetensors", "r+b") as f:
        f.truncate(100)
    assert "t.safetensors is 100 bytes" in check_folder(out, "quick")
    with pytest.raises(CorruptFileError, match=rf"{out}.*t.safetensors is 100 bytes.*size.*delete {out} and rerun"):
        verify_dir(out)


def test_an_unlisted_or_a_missing_file_fails(tmp_path):
    out = _build(tmp_path)
    (out / "stray.bin").write_bytes(b"x")
    assert check_folder(out) == "unlisted file stray.bin"
    (out / "stray.bin").unlink()
    (out / "info.json").unlink()
    assert check_folder(out) == "missing file info.json"


# ----------------------------------------------------------------------------- rebuild or refuse
def test_a_damaged_cache_is_rebuilt_with_one_warning(tmp_path, caplog):
    calls = []
    out = _build(tmp_path, calls)
    _flip(out / "big.bin", sample_spans(BIG)[3][0])
    with caplog.at_level(logging.WARNING, logger="core.cache"):
        again = _build(tmp_path, calls)
    assert again == out and len(calls) == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(out) in warnings[0] and "big.bin fails its quick digest" in warnings[0]
    assert check_folder(out, "full") is None
    assert not [p for p in tmp_path.iterdir() if "damaged" in p.name]      # the damaged copy is gone


def _open_damaged(root, counter):
    import time as _t

    def build(d):
        with open(counter, "a") as f:
            f.write("built\n")
        _t.sleep(0.5)                                  # a slow rebuild: the other job must wait, not read it
        _payload(d)

    out = cached_dir(root, "k", {"a": 1}, build)
    return check_folder(out, "full")


def test_two_jobs_opening_the_same_damaged_cache_rebuild_it_once(tmp_path):
    import multiprocessing as mp

    _build(tmp_path / "cache")
    (out,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("k-")]
    _flip(out / "big.bin", 0)
    counter = tmp_path / "builds.txt"
    with mp.get_context("fork").Pool(2) as pool:
        problems = pool.starmap(_open_damaged, [(tmp_path / "cache", counter)] * 2)
    assert problems == [None, None] and counter.read_text() == "built\n"


def test_a_full_check_is_asked_for_by_argument_environment_or_context(tmp_path, monkeypatch):
    calls = []
    out = _build(tmp_path, calls)
    hidden = _unsampled_offset(BIG)
    _flip(out / "big.bin", hidden)
    assert _build(tmp_path, calls) == out and len(calls) == 1          # quick: not seen
    assert _build(tmp_path, calls, verify="full") == out and len(calls) == 2
    _flip(out / "big.bin", hidden)
    monkeypatch.setenv(cache.ENV, "full")
    _build(tmp_path, calls)
    assert len(calls) == 3
    monkeypatch.delenv(cache.ENV)
    _flip(out / "big.bin", hidden)
    cache._FULL_OK.clear()                                              # (verified in full by this process)
    with full_verification():
        _build(tmp_path, calls)
    assert len(calls) == 4


def test_a_bad_verify_setting_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, "fast")
    with pytest.raises(ConfigError, match="SEMPRIOR_VERIFY_CACHE='fast': choose one of quick, full"):
        _build(tmp_path / "root")
    assert not (tmp_path / "root").exists()
    monkeypatch.delenv(cache.ENV)
    with pytest.raises(ConfigError, match="verify='all'"):
        verify_level("all")


def test_a_stale_build_folder_makes_the_process_verify_that_root_in_full(tmp_path):
    calls = []
    root = tmp_path / "root"
    out = _build(root, calls)
    _flip(out / "big.bin", _unsampled_offset(BIG))
    cache._FULL_OK.clear()
    (root / ".other-123.building").mkdir()                              # a build killed mid-way (lock free)
    _build(root, calls)
    assert len(calls) == 2 and check_folder(out, "full") is None


def test_a_resumed_run_opens_its_caches_in_full(tmp_path, monkeypatch):
    """benchmarks.execution.train.run_job is the hook: with a checkpoint in the run folder, prepare runs inside
    full_verification(); a fresh run does not."""
    from benchmarks.execution import train
    from benchmarks.config.grid import expand
    from core.rundir import RunDir

    seen = []

    def fake_prepare(cfg, device):
        seen.append(verify_level())
        raise RuntimeError("stop here")

    monkeypatch.setattr(train, "prepare_run", fake_prepare)
    (spec,) = expand("smoke", [f"cache_dir={tmp_path / 'cache'}"]).runs
    for name, resumed in (("fresh", False), ("resumed", True)):
        if resumed:
            RunDir(tmp_path / name).save_checkpoint(4, {"step": 4})
        with pytest.raises(RuntimeError, match="stop here"):
            train.run_job(spec.cfg, str(tmp_path / name))
    assert seen == ["quick", "full"]


# ----------------------------------------------------------------------------- older folders, file readers
def _legacy(root, calls, damage=None):
    out = _build(root, calls)
    (out / MANIFEST).unlink()
    if damage:
        damage(out)
    assert check_folder(out) is LEGACY
    return out


def test_a_folder_of_an_older_version_is_adopted_after_a_full_read(tmp_path):
    calls = []
    out = _legacy(tmp_path, calls)
    assert _build(tmp_path, calls) == out and len(calls) == 1            # no rebuild
    assert check_folder(out, "full") is None                             # manifest written


def test_a_truncated_folder_of_an_older_version_is_rebuilt(tmp_path):
    calls = []

    def truncate(out):
        with open(out / "t.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(out / "t.safetensors") - 8)

    out = _legacy(tmp_path, calls, truncate)
    assert _build(tmp_path, calls) == out and len(calls) == 2
    assert check_folder(out, "full") is None
    out = _legacy(tmp_path / "ro", calls, truncate)
    with pytest.raises(CorruptFileError, match=r"t.safetensors is \d+ bytes, its header says"):
        verify_dir(out)


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_safetensors_file_is_a_corrupt_file_error_with_its_path(tmp_path, damage):
    path = tmp_path / "c" / "x.safetensors"
    path.parent.mkdir()
    save_file({"x": torch.ones(100)}, str(path))
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(60)
    else:
        _flip(path, 10)                                                  # inside the JSON header
    with pytest.raises(CorruptFileError, match=rf"{path}: not a readable safetensors file.*delete {path.parent}"):
        read_safetensors(path)


def test_artifact_weights_and_shards_truncated_are_corrupt_file_errors(tmp_path):
    from benchmarks.data.shards import ShardWriter, open_sharded, write_index
    from encoders.base import read_artifact, write_artifact

    write_artifact(tmp_path / "art", {}, {}, torch.nn.Linear(30, 30).state_dict())
    with open(tmp_path / "art" / "weights.safetensors", "r+b") as f:
        f.truncate(50)
    with pytest.raises(CorruptFileError, match="weights.safetensors: not a readable safetensors file"):
        read_artifact(tmp_path / "art")
    folder = tmp_path / "sharded"
    folder.mkdir()
    w = ShardWriter(folder / "train-00000.safetensors", {"x1": (torch.float32, (4,))}, 10, {"start": "0", "stop": "10"})
    w.write(0, {"x1": torch.ones(10, 4)})
    w.commit()
    write_index(folder, "train", [(0, 10)])
    with open(folder / "train-00000.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(folder / "train-00000.safetensors") - 16)
    with pytest.raises(CorruptFileError, match="train-00000.safetensors: not a readable shard"):
        open_sharded(folder)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_damaged_latent_cache_is_detected_rebuilt_and_scores_the_same(tmp_path, caplog, smoke_cache):
    """A smoke run to the end; half of its latent cache's train.safetensors overwritten: a second copy of the
    grid warns, rebuilds the cache and writes the same eval.jsonl; then the file truncated: prepare warns and
    rebuilds it byte for byte."""
    import shutil

    from benchmarks import run as cli

    def run(name, cache_root):
        args = ["grid=smoke", f"results={tmp_path / name}", f"cache_dir={cache_root}"]
        with caplog.at_level(logging.WARNING, logger="core.cache"):
            caplog.clear()
            assert cli.main(args) == 0
        (run_dir,) = [p for p in (tmp_path / name / "smoke").iterdir() if (p / "eval.jsonl").exists()]
        rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "sec"} for r in rows], \
            [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]

    ref, warnings = run("undamaged", smoke_cache)     # the session's cache (its artifacts train once)
    assert ref and not warnings
    cache_root = tmp_path / "cache"                    # a copy of this test's own, since it damages it
    shutil.copytree(smoke_cache, cache_root)
    (latents,) = [p for p in cache_root.iterdir() if p.name.startswith("latents-")]
    train_file = latents / "train.safetensors"
    size = train_file.stat().st_size
    original = json.loads((latents / MANIFEST).read_text())["files"]["train.safetensors"]["sha256"]
    with open(train_file, "r+b") as f:                 # keep the header: the damage is in the data
        f.seek(size // 2)
        f.write(os.urandom(size - size // 2))
    rows, warnings = run("overwritten", cache_root)
    assert len(warnings) == 1 and str(latents) in warnings[0] and "train.safetensors" in warnings[0], warnings
    assert rows == ref and cache.full_digest(train_file) == original
    with open(train_file, "r+b") as f:
        f.truncate(size // 2)
    # the rebuilt cache is byte-identical (so a run on it scores as above): prepare alone, no second run
    from benchmarks.config.grid import expand
    from benchmarks.data.prepare import prepare_run

    (spec,) = expand("smoke", [f"cache_dir={cache_root}"]).runs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="core.cache"):
        assert prepare_run(spec.cfg).latent_dir == latents
    assert any(str(latents) in r.getMessage() and "train.safetensors is" in r.getMessage() for r in caplog.records)
    assert cache.full_digest(train_file) == original


def test_the_check_command_reports_each_folder_and_fails_on_damage(tmp_path, capsys):
    out = _build(tmp_path)
    assert cache.main(["full", str(out)]) == 0
    assert f"{out}: full check ok" in capsys.readouterr().out
    _flip(out / "big.bin", _unsampled_offset(BIG))
    assert cache.main(["full", str(out)]) == 2
    assert "big.bin fails its sha256" in capsys.readouterr().out
    assert cache.main([]) == 2 and capsys.readouterr().err.startswith("error: give cache folders")
