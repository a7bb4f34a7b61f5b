"""benchmarks.speed is a script, not a timed test; this only checks it still runs and writes its table."""
import pandas as pd

from benchmarks import speed


def test_speed_script_runs(tmp_path):
    assert speed.main(["backbones=lightningdit-tiny", "methods=sfd", "batch=2", "steps=1", "warmup=0",
                       f"out={tmp_path}"]) == 0
    row = pd.read_csv(tmp_path / "speed.csv").iloc[0]
    assert row["method"] == "sfd" and row["img_per_s"] > 0 and row["GFLOP_per_img"] > 0
