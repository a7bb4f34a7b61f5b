"""Test-wide settings: offline hubs, small thread counts, deterministic algorithms where cheap."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models on 2 shared cores: one intra-op thread is several times faster than two under load
# (measured while other processes ran), and tests are dominated by small ops.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """One prepare cache shared by every end-to-end test of the session (artifacts train once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def figures(monkeypatch):
    """The figures benchmarks/reporting/plots.py closes, kept for inspection (closed at teardown)."""
    from benchmarks.reporting import plots

    kept = []
    real_close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: kept.append(fig))
    yield kept
    for fig in kept:
        real_close(fig)
