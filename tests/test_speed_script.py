"""benchmarks.speed is a script, not a timed test; this only checks it still runs and writes its table."""
import pandas as pd

from benchmarks.execution import speed
from benchmarks import speed as speed_cmd


def test_speed_script_runs(tmp_path):
    assert speed_cmd.main(["backbones=lightningdit-tiny", "methods=sfd", "batch=2", "steps=1", "warmup=0",
                       f"out={tmp_path}"]) == 0
    row = pd.read_csv(tmp_path / "speed.csv").iloc[0]
    assert row["method"] == "sfd" and row["img_per_s"] > 0 and row["GFLOP_per_img"] > 0


def test_speed_script_option_lists_make_one_row_each(tmp_path):
    """Comma lists of options expand to one row per combination, each row naming its settings."""
    assert speed_cmd.main(["backbones=lightningdit-tiny", "methods=sit", "batch=2", "steps=1", "warmup=0",
                       "layout=bhsd,bshd", "sdpa=auto,math", "sample=0", f"out={tmp_path}"]) == 0
    df = pd.read_csv(tmp_path / "speed.csv")
    assert sorted(zip(df["layout"], df["sdpa"])) == [("bhsd", "auto"), ("bhsd", "math"), ("bshd", "auto"),
                                                     ("bshd", "math")]
    assert (df["timing"] == "wall").all() and df["sample_fwd_img_per_s"].isna().all()


def test_timing_mode_is_checked():
    import pytest
    import torch

    with pytest.raises(ValueError, match="valid: stream, sync"):
        speed._time(lambda: None, 1, 0, torch.device("cpu"), "async")


def test_speed_script_graph_rows(tmp_path, monkeypatch):
    """graph=0,1 makes a row each (on the CPU the capture is emulated, as in tests/test_graphs.py)."""
    import core.graphs

    monkeypatch.setattr(core.graphs, "EMULATE_ON_CPU", True)
    assert speed_cmd.main(["backbones=lightningdit-tiny", "methods=sfd", "batch=2", "steps=1", "warmup=0",
                       "graph=0,1", "sample=0", f"out={tmp_path}"]) == 0
    df = pd.read_csv(tmp_path / "speed.csv")
    assert list(df["graph"]) == [0, 1] and (df["img_per_s"] > 0).all()


def test_a_failing_configuration_is_a_row_and_the_others_run(tmp_path):
    """graph=1 on the CPU is refused by the trainer: that row records the error, graph=0 still runs."""
    assert speed_cmd.main(["backbones=lightningdit-tiny", "methods=sit", "batch=2", "steps=1", "warmup=0",
                       "graph=1,0", "sample=0", f"out={tmp_path}"]) == 1
    df = pd.read_csv(tmp_path / "speed.csv")
    assert "needs a CUDA device" in df["error"][0] and df["img_per_s"][1] > 0
