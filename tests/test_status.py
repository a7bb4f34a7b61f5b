"""The live table (benchmarks/execution/status.py) and the progress of long stages (core/progress.py)."""
import json
import logging

import pytest
from rich.console import Console

from benchmarks.execution import status
from core import progress
from core.rundir import RunDir
from core.runlock import RunLock

IDS = ["sit-lightningdit-tiny-s0-1a2b3c4d", "sit-lightningdit-tiny-s1-5e6f7a8b", "sfd-lightningdit-tiny-s0-9c0d1e2f"]


def _runs(tmp_path):
    runs = []
    for i, name in enumerate(IDS):
        rd = RunDir(tmp_path / name)
        rd.path.mkdir(parents=True)
        rd.append("metrics.jsonl", {"step": 10 * (i + 1), "loss": 0.5, "sec_per_step": 0.1})
        rd.append("eval.jsonl", {"step": 0, "fd": 12.5, "class_acc": 0.3})
        runs.append((rd.path, 100))
    return runs


@pytest.mark.parametrize("width", [80, 120, 200])
def test_the_table_shows_every_full_run_id(tmp_path, width):
    """Two seeds of one method differ only in the tail of the id ("-s0-…", "-s1-…"): never cut."""
    console = Console(width=width, record=True)
    console.print(status.table(status.snapshot(_runs(tmp_path)), "grid smoke"))
    text = console.export_text()
    for name in IDS:
        assert name in text, (width, text)
    assert "…" not in text


def test_the_line_without_a_terminal_names_every_full_run_id(tmp_path):
    line = status.compact_line(status.snapshot(_runs(tmp_path)))
    assert line.split(" | ")[1].startswith("sit-lightningdit-tiny-s1-5e6f7a8b running 20/100 FD 12.5")
    assert all(name in line for name in IDS)


def test_a_job_still_preparing_shows_its_stage(tmp_path):
    runs = _runs(tmp_path)
    empty = tmp_path / IDS[0] / "metrics.jsonl"
    empty.unlink()
    (tmp_path / IDS[0] / "eval.jsonl").unlink()
    with RunLock(runs[0][0]), progress.publish(runs[0][0] / status.PROGRESS_FILE), \
            progress.Progress("semantic-encoder training", 400, every_s=0) as p:
        p.update(100, {"loss": 2.5})
        row = status.snapshot(runs)[0]
        assert row["status"].startswith("preparing semantic-encoder training: 100/400 steps (25%)"), row
        assert "loss=2.5" in row["status"]
        console = Console(width=200, record=True)
        console.print(status.table(status.snapshot(runs), "g", progress.active()))
        assert "(prepare) semantic-encoder training" in console.export_text()
    assert not (runs[0][0] / status.PROGRESS_FILE).exists()          # removed when the job moves on
    assert status.snapshot(runs)[0]["status"] == "pending" and progress.active() == {}


def test_a_stage_file_left_by_a_killed_job_is_ignored(tmp_path):
    runs = _runs(tmp_path)
    (runs[0][0] / "metrics.jsonl").unlink()
    (runs[0][0] / "eval.jsonl").unlink()
    (runs[0][0] / status.PROGRESS_FILE).write_text(json.dumps(
        {"fd-net training": {"done": 3, "total": 9, "unit": "steps", "rate": None, "eta_s": None, "values": {}}}))
    assert status.snapshot(runs)[0]["status"] == "pending"            # no live lock holder
    with RunLock(runs[0][0]):
        assert status.snapshot(runs)[0]["status"] == "preparing fd-net training: 3/9 steps (33%)"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_lines_are_rate_limited_and_values_computed_only_when_due(monkeypatch, caplog):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    calls = []

    def values():
        calls.append(clock.t)
        return {"loss": 1.0}

    with caplog.at_level(logging.INFO, logger="progress"):
        items = []
        for i in progress.track("x training", range(1000), values=values, every_s=5.0):
            clock.t += 0.1                   # 100 s in all: one line per 5 s, plus start and end
            items.append(i)
    assert items == list(range(1000))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "x training: started, 1000 steps"
    assert lines[-1] == "x training: done, 1000/1000 steps in 100.0s"
    assert len(lines) == 2 + 19 and len(calls) == 20        # 19 lines at 5, 10, ..., 95 s; the last update at 100 s
    assert lines[1] == "x training: 50/1000 steps (5%), 10 steps/s, ETA 95s loss=1"
    assert progress.active() == {}


def test_a_failing_stage_leaves_the_table(tmp_path):
    with pytest.raises(RuntimeError):
        for i in progress.track("boom", range(10)):
            assert "boom" in progress.active()
            raise RuntimeError("x")
    assert progress.active() == {}


def test_two_threads_with_one_stage_name_get_two_rows():
    with progress.Progress("enc", 2) as a, progress.Progress("enc", 2) as b:
        assert (a.key, b.key) == ("enc", "enc [2]") and set(progress.active()) == {"enc", "enc [2]"}
    assert json.dumps(progress.active()) == "{}"


def test_the_board_of_the_prepare_stage_shows_the_stages_of_this_process():
    board = status.StatusBoard([], "grid g: preparing caches")
    with progress.Progress("texture-vae training", 20, every_s=0) as p:
        p.update(5)
        console = Console(width=120, record=True)
        console.print(board.render())
    text = console.export_text()
    assert "(prepare) texture-vae training" in text and "5/20 steps (25%)" in text
    assert status.compact_line(status.snapshot([])) == ""
