"""benchmarks/reporting/plots.py (seaborn) and the phase figure's labels: the step-axis rule, seed bands from
seaborn's error bars, the × faster chart, the Δt sweep, full group names."""
import numpy as np
import pandas as pd
import pytest

from benchmarks.evaluation import phases
from benchmarks.reporting import plots

GROUPS = ("sfd,method.schedule.delta_t.texture=0.2", "sit,backbone=lightningdit-tiny")


@pytest.mark.parametrize("steps, scale", [
    ([0, 100, 200, 300], ("linear", {})),                     # a 300-step run: linear, not 100-300 in a third
    ([0, 100, 300, 600, 900, 1200], ("linear", {})),
    ([0, 250, 500, 24_750], ("linear", {})),                  # < 2 decades
    ([0, 10, 100, 1000, 10_000], ("symlog", {"linthresh": 10.0})),
    ([0, 1000, 100_000, 400_000], ("symlog", {"linthresh": 1000.0})),
    ([0], ("linear", {})),
])
def test_step_scale_is_linear_on_short_ranges_and_log_across_decades(steps, scale):
    assert plots.step_scale(steps) == scale


@pytest.mark.parametrize("values, scale", [([400.0, 200.0, 60.0], "log"), ([110.0, 95.0, float("nan")], "linear"),
                                           ([], "linear")])
def test_fd_axis_is_log_only_over_a_wide_range(values, scale):
    assert plots.fd_scale(values) == scale


def _curves(steps=(0, 100, 200, 300)):
    rng = np.random.default_rng(0)
    rows = []
    for g, base in zip(GROUPS, (300.0, 200.0)):
        for seed in range(3):
            for s in steps:
                rows.append({"group": g, "run_id": f"{g}-s{seed}", "step": s,
                             "fd": base / (1 + s / 50) * (1 + 0.1 * rng.standard_normal()),
                             "class_acc": min(1.0, 0.1 + s / 400 + 0.02 * seed)})
    return pd.DataFrame(rows)


def test_convergence_band_is_the_seed_range_full_names_linear_axis(tmp_path, figures):
    curves = _curves()
    out = plots.convergence(curves, tmp_path / "c.png", "FD-fdnet")
    assert out.stat().st_size > 10_000
    (fig,) = figures
    fd_ax, acc_ax = fig.axes[:2]
    assert fd_ax.get_xscale() == acc_ax.get_xscale() == "linear" and fd_ax.get_yscale() == "log"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [f"{g} (n=3)" for g in GROUPS]
    # seaborn's band (errorbar=("pi", 100)): for each group, from the min to the max over seeds at every step
    for g, band in zip(GROUPS, fd_ax.collections):
        ys = band.get_paths()[0].vertices[:, 1]
        per_step = curves[curves["group"] == g].groupby("step")["fd"]
        assert np.isclose(ys.max(), per_step.max().max()) and np.isclose(ys.min(), per_step.min().min())
    line = fd_ax.get_lines()[0]
    assert np.allclose(line.get_ydata(), curves[curves["group"] == GROUPS[0]].groupby("step")["fd"].mean())


def test_convergence_of_a_long_run_spanning_decades_is_log(tmp_path, figures):
    plots.convergence(_curves((0, 10, 100, 1000, 10_000)), tmp_path / "c.png", "FD-fdnet")
    assert figures[0].axes[0].get_xscale() == "symlog"


def test_faster_chart_has_ci_per_group_and_names_unreached_seeds(tmp_path, figures):
    per_seed = pd.DataFrame({"group": ["sfd"] * 3 + ["dit"] * 3, "run_id": list("abcdef"),
                             "ratio": [2.0, 2.2, 2.4, 0.5, 0.7, np.nan]})
    plots.faster(per_seed, tmp_path / "f.png", "sit")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sfd", "dit\n(1/3 seeds never reached it)"]
    bars = sorted(p.get_width() for p in ax.patches)
    assert np.allclose(bars, [0.6, 2.2])                       # means over the seeds that reached it
    # seaborn's error bar with caps: one line per group, [cap, nan, bar from lo to hi, nan, cap]
    (lo, hi), = [ln.get_xdata()[3:5] for ln in ax.get_lines() if len(ln.get_ydata()) == 8 and ln.get_ydata()[3] == 0]
    assert 2.0 <= lo < 2.2 < hi <= 2.4                              # the bootstrap CI of the mean of 2.0, 2.2, 2.4


def test_sweep_marks_the_best_value(tmp_path, figures):
    runs = pd.DataFrame({"label.delta_t": [0.0, 0.0, 0.1, 0.1, 0.3, 0.3],
                         "final.fd": [66.0, 68.0, 60.0, 61.0, 63.0, 64.0]})
    plots.sweep(runs, "delta_t", tmp_path / "s.png", "FD-fdnet")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.texts] == ["best: 0.1 (60.5)"]
    assert ax.get_title() == "Sweep over delta_t: mean ± sd over seeds (n=2)"


def test_phase_titles_use_full_group_names():
    assert phases.title(0.5, ("texture", "semantic"), [0.0, 0.5]) == "τ=0.50\ntexture=0.00\nsemantic=0.50"
