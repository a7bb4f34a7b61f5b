"""Nothing non-finite is ever scored, append-only logs never lose a row, killed writes leave no temp files.

Unit tests on small tensors and files, plus smoke runs (the session `smoke_cache`) for the paths through
the training job: NaN samples fail the run at its evaluation, a damaged log row stops a resume without
touching the file, a killed checkpoint write is cleaned up when the run resumes."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from core.errors import CorruptFileError, NonFiniteError
from core.rundir import RunDir, read_jsonl
from core.types import check_finite, nonfinite_rows, to_uint8

ROWS = [{"step": 0, "fd": 9.0}, {"step": 4, "fd": 5.0}, {"step": 8, "fd": 3.0}]


def _write_rows(path, rows=ROWS):
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path.read_bytes()


# ------------------------------------------------------------------------------------------ non-finite values
def test_to_uint8_refuses_nan_instead_of_black_pixels():
    x = torch.zeros(4, 1, 2, 2)
    assert to_uint8(x).eq(128).all()
    x[1, 0, 0, 0], x[3, 0, 1, 1] = float("nan"), float("inf")
    with pytest.raises(NonFiniteError, match="2 of 4 images given to to_uint8 hold NaN/inf"):
        to_uint8(x)


def test_check_finite_counts_rows_of_tensors_and_arrays():
    a = np.ones((5, 3))
    a[2, 1] = np.nan
    assert nonfinite_rows(a) == 1 and nonfinite_rows(torch.from_numpy(a)) == 1
    assert nonfinite_rows(torch.full((3, 2), 255, dtype=torch.uint8)) == 0
    with pytest.raises(NonFiniteError, match=r"^1 of 5 features hold NaN/inf \(why\)$"):
        check_finite(a, "features", " (why)")
    check_finite(np.ones((2, 2)), "features")          # finite: no error


def _fdnet_and_images():
    from encoders.fdnet import FDNet

    torch.manual_seed(0)
    net = FDNet(1, 32, 10, width=8, feature_dim=16).eval()
    g = torch.Generator().manual_seed(1)
    ref = torch.randint(0, 256, (120, 1, 32, 32), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 256, (40, 1, 32, 32), generator=g, dtype=torch.uint8)
    return net, ref, images


def test_fidelity_checked_pipeline_equals_torch_fidelity(tmp_path):
    """The checked path calls torch-fidelity's own functions in its order: the same numbers, bit for bit
    (same computation, same shapes, same thread), and the same cache files."""
    import torch_fidelity

    from benchmarks.evaluation.scoring import REF_NAME, U8Images, fidelity
    from core.seed import generator
    from encoders.fdnet import make_fidelity_extractor

    net, ref, images = _fdnet_and_images()
    ours = fidelity(images, ref, net, tmp_path / "a", torch.device("cpu"))
    common = dict(input1=U8Images(images), cache_root=str(tmp_path / "b"), cache=True, verbose=False,
                  feature_extractor=make_fidelity_extractor(net)[0], cuda=False, save_cpu_ram=True,
                  batch_size=500, samples_shuffle=False)
    m = torch_fidelity.calculate_metrics(input2=U8Images(ref), input2_cache_name=REF_NAME, fid=True, kid=True,
                                         kid_subset_size=40, kid_subsets=50, **common)
    sub = torch.randperm(ref.shape[0], generator=generator(0))[:40]
    p = torch_fidelity.calculate_metrics(input2=U8Images(ref[sub]), input2_cache_name=f"{REF_NAME}-n40",
                                         prc=True, **common)
    assert ours == {"fd": m["frechet_inception_distance"], "kid": m["kernel_inception_distance_mean"],
                    "kid_std": m["kernel_inception_distance_std"], "precision": p["precision"],
                    "recall": p["recall"]}
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == sorted(f.name for f in (tmp_path / "b").iterdir())


def test_nan_fdnet_weights_are_refused_not_scored(tmp_path):
    from benchmarks.evaluation.scoring import fidelity

    net, ref, images = _fdnet_and_images()
    with torch.no_grad():
        net.embed[1].weight[0, 0] = float("nan")     # one weight: every feature vector turns NaN
    with pytest.raises(NonFiniteError, match=r"40 of 40 sample feature vectors .* hold NaN/inf"):
        fidelity(images, ref, net, tmp_path, torch.device("cpu"))


def test_nan_in_cached_reference_features_names_the_cache(tmp_path):
    from benchmarks.evaluation.scoring import fidelity

    net, ref, images = _fdnet_and_images()
    fidelity(images, ref, net, tmp_path, torch.device("cpu"))          # caches the reference features
    (feat,) = tmp_path.glob("fdref-fd-net-*-features-fd.pt")
    bad = torch.load(feat, weights_only=False)
    bad[:3] = float("inf")
    torch.save(bad, feat)
    for stat in tmp_path.glob("*-stat-fid-*.pt"):
        stat.unlink()                                # statistics recomputed from the damaged features
    with pytest.raises(NonFiniteError, match=rf"3 of 120 reference feature vectors .*{tmp_path}.*delete"):
        fidelity(images, ref, net, tmp_path, torch.device("cpu"))


def test_nan_in_cached_reference_statistics_is_refused(tmp_path):
    from benchmarks.evaluation.scoring import fidelity

    net, ref, images = _fdnet_and_images()
    fidelity(images, ref, net, tmp_path, torch.device("cpu"))
    (stat,) = tmp_path.glob("fdref-fd-net-*-stat-fid-fd.pt")
    st = torch.load(stat, weights_only=False)
    st["mu"][0] = np.nan
    torch.save(st, stat)
    with pytest.raises(NonFiniteError, match="1 of 16 entries of the reference feature mean hold NaN/inf"):
        fidelity(images, ref, net, tmp_path, torch.device("cpu"))


class _NaNMethod:
    """A method whose sampler returns NaN for the chunk starting at sample `bad_from` and after."""

    def __init__(self, bad_from):
        self.bad_from, self.seen = bad_from, 0

    def sample(self, model, x0, y, **_):
        out = x0.clone()
        if self.seen >= self.bad_from:
            out[:] = float("nan")
        self.seen += x0.shape[0]
        return out


class _Identity:
    def decode(self, x):
        return x.clamp(-1, 1) if torch.isfinite(x).all() else x


def test_generate_counts_every_nonfinite_sample():
    from benchmarks.evaluation.scoring import generate

    labels = torch.arange(10) % 2
    kw = dict(seed=0, batch_size=4, device=torch.device("cpu"))
    assert generate(_NaNMethod(99), None, _Identity(), (1, 2, 2), labels, **kw).dtype == torch.uint8
    with pytest.raises(NonFiniteError, match="^6 of 10 decoded samples hold NaN/inf$"):
        generate(_NaNMethod(4), None, _Identity(), (1, 2, 2), labels, **kw)


def test_paper_eval_refuses_a_nan_chunk_and_writes_nothing_of_it(tmp_path):
    from benchmarks.evaluation.paper import sample_npz

    labels = np.arange(6) % 2
    with pytest.raises(NonFiniteError, match=r"3 of 3 decoded samples hold NaN/inf in chunk 1 \(samples 3-5\)"):
        sample_npz(_NaNMethod(3), None, _Identity(), (3, 2, 2), labels, tmp_path, batch_size=3)
    assert [p.name for p in (tmp_path / "chunks").iterdir()] == ["samples_rank0.npz"]   # the finite chunk


# ------------------------------------------------------------------------------------------ append-only logs
def test_read_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    _write_rows(path)
    assert read_jsonl(path) == ROWS
    with open(path, "a") as f:
        f.write('{"step": 12, "fd"')                  # killed mid-append: no newline
    assert read_jsonl(path) == ROWS
    _write_rows(path)
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00\n")                    # a complete but unparseable last line is torn as well
    assert read_jsonl(path) == ROWS


@pytest.mark.parametrize("garbage", [b'{"step": 4, "fd"', b"\x00\x00", b"[1, 2]", b""])
def test_read_jsonl_refuses_a_damaged_middle_row(tmp_path, garbage):
    path = tmp_path / "eval.jsonl"
    lines = _write_rows(path).split(b"\n")
    lines[1] = garbage
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptFileError, match=rf"{path}:2: .*delete the run folder to retrain it, or repair "
                                               r"line 2$"):
        read_jsonl(path)


def test_truncate_after_keeps_damaged_files_byte_for_byte(tmp_path):
    rd = RunDir(tmp_path)
    before = _write_rows(tmp_path / "eval.jsonl").replace(b'"step": 4', b'"step" 4')
    (tmp_path / "eval.jsonl").write_bytes(before)
    with pytest.raises(CorruptFileError):
        rd.truncate_after("eval.jsonl", 4)
    assert (tmp_path / "eval.jsonl").read_bytes() == before


def test_truncate_after_drops_later_rows_and_the_torn_line_only(tmp_path):
    rd = RunDir(tmp_path)
    clean = _write_rows(tmp_path / "eval.jsonl")
    mtime = (tmp_path / "eval.jsonl").stat().st_mtime_ns
    rd.truncate_after("eval.jsonl", 8)                 # nothing to drop: the file is not rewritten
    assert (tmp_path / "eval.jsonl").stat().st_mtime_ns == mtime
    with open(tmp_path / "eval.jsonl", "a") as f:
        f.write('{"step": 12')
    rd.truncate_after("eval.jsonl", 8)
    assert (tmp_path / "eval.jsonl").read_bytes() == clean
    rd.truncate_after("eval.jsonl", 4)
    assert rd.rows("eval.jsonl") == ROWS[:2]


def test_status_board_lists_a_damaged_run_and_goes_on(tmp_path):
    from benchmarks.execution.status import snapshot

    bad, good = tmp_path / "bad", tmp_path / "good"
    for d in (bad, good):
        d.mkdir()
        _write_rows(d / "eval.jsonl")
    (bad / "eval.jsonl").write_bytes((bad / "eval.jsonl").read_bytes().replace(b'"fd": 5.0', b'"fd": 5.'))
    rows = snapshot([(bad, 8), (good, 8)])
    assert [r["status"] for r in rows] == ["unreadable", "running"] and rows[1]["fd"] == 3.0


# ------------------------------------------------------------------------------------------ stale temp files
def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_stale_tmp_keeps_live_writers(tmp_path):
    import os

    rd = RunDir(tmp_path)
    rd.ckpt_dir.mkdir()
    dead, own = _dead_pid(), os.getpid()
    stale = [rd.ckpt_dir / f".step_0000004.pt.tmp{dead}", tmp_path / f".done.json.tmp{dead}"]
    live = [rd.ckpt_dir / f".step_0000008.pt.tmp{own}", rd.ckpt_dir / "step_0000004.pt",
            tmp_path / "notes.tmp1"]
    for p in stale + live:
        p.write_bytes(b"x")
    assert sorted(rd.remove_stale_tmp()) == sorted(stale)
    assert all(p.exists() for p in live) and not any(p.exists() for p in stale)


# ------------------------------------------------------------------------------------------ the training job
def _smoke(smoke_cache, *extra):
    from benchmarks.config.grid import expand

    (spec,) = expand("smoke", [f"cache_dir={smoke_cache}", *extra]).runs
    return spec.cfg


def test_the_hint_names_nonfinite_settings():
    from benchmarks.execution.train import nonfinite_settings

    cfg = {"eval": {"guidance": {"name": "cfg", "scale": float("nan")}, "every": 0}, "train": {"lr": 1e-4}}
    assert [k for k, _ in nonfinite_settings(cfg)] == ["eval.guidance.scale"]


@pytest.mark.slow
def test_nan_samples_fail_the_run_and_are_not_scored(tmp_path, smoke_cache, monkeypatch):
    """NaN EMA weights (the sampling model) make every sample NaN at the step-0 evaluation: a cause the
    up-front config checks cannot see (`eval.guidance.scale=nan` did the same before they refused it)."""
    from benchmarks import run as cli
    from benchmarks.execution import train

    real_ema = train.make_ema

    def nan_ema(model):
        ema = real_ema(model)
        with torch.no_grad():
            for p in ema.parameters():
                p.fill_(float("nan"))
        return ema

    monkeypatch.setattr(train, "make_ema", nan_ema)
    code = cli.main(["grid=smoke", f"results={tmp_path / 'results'}", f"cache_dir={smoke_cache}", "launcher=inline",
                     "train.steps=2"])
    assert code == 1                                   # the grid finished, with a failed run
    (run,) = [p for p in (tmp_path / "results" / "smoke").iterdir() if (p / "config.yaml").exists()]
    fail = json.loads((run / "failed.json").read_text())
    assert fail["stage"] == "evaluation" and fail["step"] == 0
    assert fail["reason"] == ("evaluation: step 0: 100 of 100 decoded samples hold NaN/inf "
                              "(the EMA weights hold NaN/inf)")
    assert RunDir(run).rows("eval.jsonl") == [] and not (run / "done.json").exists()
    assert not list((run / "samples").glob("step_*.png"))
    report = (tmp_path / "results" / "smoke" / "report.md").read_text()
    assert "failed" in report and "100 of 100 decoded samples hold NaN/inf" in report


@pytest.mark.slow
def test_resume_with_a_damaged_log_row_fails_and_changes_nothing(tmp_path, smoke_cache, monkeypatch):
    from benchmarks.execution import train
    from benchmarks.execution.launch import guarded_run

    cfg = _smoke(smoke_cache, "eval.at=[0,2,4]")
    run = tmp_path / "run"
    real_step = train.Trainer.train_step

    def crash_at_6(self):
        if self.step == 5:
            raise RuntimeError("killed")
        return real_step(self)

    monkeypatch.setattr(train.Trainer, "train_step", crash_at_6)
    with pytest.raises(RuntimeError, match="killed"):
        train.run_job(cfg, str(run))
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    path = run / "eval.jsonl"
    lines = path.read_bytes().split(b"\n")
    assert len(lines) == 4                             # rows of steps 0, 2, 4 and the final newline
    lines[1] = lines[1][:-5]                           # the middle row garbled
    path.write_bytes(b"\n".join(lines))
    before = {p.name: p.read_bytes() for p in (run / "eval.jsonl", run / "metrics.jsonl")}
    out = guarded_run(cfg, str(run))
    assert out["status"] == "failed"
    fail = json.loads((run / "failed.json").read_text())
    assert f"{path}:2:" in fail["reason"] and "repair line 2" in fail["reason"]
    assert {p.name: p.read_bytes() for p in (run / "eval.jsonl", run / "metrics.jsonl")} == before
    assert not (run / "done.json").exists()


@pytest.mark.slow
def test_killed_checkpoint_write_is_cleaned_on_resume(tmp_path, smoke_cache, monkeypatch):
    from benchmarks.execution import train
    from core import rundir

    cfg = _smoke(smoke_cache)
    run = tmp_path / "run"
    real_write = rundir.atomic_write_stream
    dead = _dead_pid()

    def killed_at_step_4(path, write):
        if path.name == "step_0000004.pt":             # the process dies after writing half its temp file
            buf = io.BytesIO()
            write(buf)
            data = buf.getvalue()
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / f".{path.name}.tmp{dead}").write_bytes(data[: len(data) // 2])
            raise RuntimeError("killed")
        return real_write(path, write)

    monkeypatch.setattr(rundir, "atomic_write_stream", killed_at_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        train.run_job(cfg, str(run))
    assert [p.name for p in (run / "checkpoints").iterdir()] == [f".step_0000004.pt.tmp{dead}"]
    monkeypatch.setattr(rundir, "atomic_write_stream", real_write)
    assert train.run_job(cfg, str(run))["step"] == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000004.pt", "step_0000004.sha256", "step_0000006.pt", "step_0000006.sha256"]
