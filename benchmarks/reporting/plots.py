"""Plots from DataFrames only (never checkpoints), drawn with seaborn: the convergence curves with seed
bands, the "× faster convergence" chart with its confidence intervals, the Δt sweep.

Seed bands and error bars come from seaborn's error-bar machinery (`errorbar=`): the convergence band is
the min–max range over seeds (`("pi", 100)`, the honest summary of 2–3 seeds); the × faster bars are
bootstrap 95 % confidence intervals of the mean over runs (seeds × builds; report.md's × faster table shows
the same interval, benchmarks/reporting/stats.py bootstrap_ci); the sweep's bars are ± one standard deviation.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from benchmarks.reporting import stats  # noqa: E402   # the × faster CI: the table's resamples

SECOND_PANEL = {"class_acc": "class accuracy of samples", "is": "Inception Score"}
SEED_BAND = ("pi", 100)               # min–max over seeds
LOG_DECADES = 2.0                      # a log step axis once the evaluated steps span this many decades


def step_scale(steps: Sequence[float]) -> tuple[str, dict]:
    """The x scale for training steps: ("linear", {}) when the evaluated steps are on one or two decades
    (e.g. 0, 100, ..., 1200: a log axis would cram 300–1200 into the right third), ("symlog",
    {"linthresh": first nonzero step}) when they span ≥ LOG_DECADES decades (e.g. 0, 10, 100, ..., 100 000),
    so step 0 (the untrained model) stays on the axis."""
    nonzero = sorted(float(s) for s in steps if s > 0)
    if not nonzero or math.log10(nonzero[-1] / nonzero[0]) < LOG_DECADES:
        return "linear", {}
    return "symlog", {"linthresh": nonzero[0]}


def fd_scale(values: Sequence[float]) -> str:
    """The FD axis: "log" when the values span a factor ≥ 3 (an early FD of 400 next to a final 50), else
    "linear" (a log axis over 95–110 would show one tick)."""
    v = [float(x) for x in values if x == x and x > 0]
    return "log" if v and max(v) / min(v) >= 3 else "linear"


def _set_step_axis(ax: plt.Axes, steps: Sequence[float]) -> None:
    scale, kw = step_scale(steps)
    ax.set_xscale(scale, **kw)
    if scale == "linear":               # from 0, the first and last markers inside the frame
        top = max([float(s) for s in steps] + [1.0])
        ax.set_xlim(-0.02 * top, 1.02 * top)
    ax.set_xlabel("training step" + (" (log scale past the first eval)" if scale == "symlog" else ""))


def _styled(fn):
    """Draw inside seaborn's whitegrid style and notebook context, leaving the global settings alone."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
            return fn(*args, **kwargs)
    return wrapper


def _plain(v: float, _pos: object = None) -> str:
    """A log axis tick as a plain number (60, 100, 300) instead of 6×10¹."""
    return f"{v:g}"


def _lead(v: float) -> int:
    """The leading digit of v > 0 (which minor ticks of a log axis get a label)."""
    return round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0


def _palette(groups: Sequence[str]) -> dict[str, tuple]:
    return dict(zip(groups, sns.color_palette("tab10" if len(groups) <= 10 else "husl", len(groups))))


@_styled
def convergence(curves: pd.DataFrame, out: Path, fd_name: str, second: str = "class_acc") -> Path:
    """FD (left, log y) and class accuracy of conditional samples (right; `second="is"`: Inception Score at
    paper scale) against training step.

    One line per group (method/backbone/axes, full names), the mean over seeds, the band between the min
    and the max over seeds. The step axis is linear or log by `step_scale`.
    """
    groups = sorted(curves["group"].unique())
    seeds = curves.groupby("group")["run_id"].nunique()
    labels = {g: f"{g} (n={int(seeds[g])})" for g in groups}
    data = curves.assign(run=curves["group"].map(labels))
    palette = {labels[g]: c for g, c in _palette(groups).items()}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for metric, ax, ylabel in (("fd", axes[0], fd_name), (second, axes[1], SECOND_PANEL[second])):
        if metric not in data or data[metric].isna().all():
            ax.set_visible(False)
            continue
        sns.lineplot(data=data, x="step", y=metric, hue="run", hue_order=[labels[g] for g in groups],
                     palette=palette, estimator="mean", errorbar=SEED_BAND, marker="o", markersize=5, ax=ax,
                     legend=metric == "fd")
        _set_step_axis(ax, data["step"].unique())
        ax.set_ylabel(ylabel)
        ax.ticklabel_format(axis="y", useOffset=False)      # 105.41, not "+1.054e2" above the axis
    if axes[0].get_visible() and fd_scale(data["fd"]) == "log":
        axes[0].set_yscale("log")
        axes[0].yaxis.set_major_formatter(FuncFormatter(_plain))
        axes[0].yaxis.set_minor_formatter(FuncFormatter(lambda v, _: _plain(v) if _lead(v) in (2, 3, 5) else ""))
    if second == "class_acc" and axes[1].get_visible():
        axes[1].axhline(0.1, color="grey", ls=":", lw=1.2)
        axes[1].annotate("chance", (axes[1].get_xlim()[1], 0.1), xytext=(-4, 3), textcoords="offset points",
                         ha="right", color="grey", fontsize=9)
    fig.suptitle("Convergence: mean over seeds, band = min–max over seeds")
    fig.tight_layout()
    if axes[0].get_legend() is not None:      # one legend under both panels (full group names need the width)
        handles, names = axes[0].get_legend_handles_labels()
        axes[0].get_legend().remove()
        ncol = 1 if max(map(len, names)) > 60 else 2 if max(map(len, names)) > 30 else min(len(names), 4)
        fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, frameon=False,
                   fontsize=10)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


@_styled
def faster(per_seed: pd.DataFrame, out: Path, baseline: str) -> Path:
    """The "× faster convergence" chart: per group, the mean over seeds of baseline steps / steps to reach
    the baseline's final FD, with a bootstrap 95 % CI, every seed as a dot; 1× (the baseline) marked.

    per_seed: one row per finished run, columns group, ratio (NaN: never reached; listed under the bar).
    """
    reached = per_seed.dropna(subset=["ratio"])
    order = sorted(per_seed["group"].unique(), key=lambda g: -reached.loc[reached["group"] == g, "ratio"].mean()
                   if (reached["group"] == g).any() else math.inf)
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(order) + 1.8))
    palette = _palette(order)
    if not reached.empty:
        sns.barplot(data=reached, y="group", x="ratio", order=order, hue="group", palette=palette,
                    estimator="mean", errorbar=("ci", stats.LEVEL), n_boot=stats.N_BOOT, seed=stats.BOOT_SEED,
                    capsize=0.2, alpha=0.75, ax=ax, legend=False, err_kws={"linewidth": 1.5})
        sns.stripplot(data=reached, y="group", x="ratio", order=order, color="black", size=5, jitter=0.1, ax=ax)
    ax.axvline(1.0, color="grey", ls="--", lw=1.2)
    ax.set_xlim(0, max(1.15, ax.get_xlim()[1]))
    ticks = []
    for g in order:                     # seeds that never reached the target are named under the group
        n_all, n_hit = int((per_seed["group"] == g).sum()), int((reached["group"] == g).sum())
        ticks.append(g if n_hit == n_all else f"{g}\n({n_all - n_hit}/{n_all} seeds never reached it)")
    ax.set_yticks(range(len(order)), ticks)
    ax.set_xlabel(f"× faster than {baseline} (steps to reach {baseline}'s final FD)")
    ax.set_ylabel("")
    ax.set_title("Convergence speed-up: mean over runs (seeds × builds), 95 % bootstrap CI, dots = runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)


@_styled
def sweep(runs: pd.DataFrame, axis: str, out: Path, fd_name: str) -> Path:
    """Final FD against a swept axis value (e.g. SFD's Δt): mean ± one standard deviation over seeds, every
    seed as a dot, the best value marked."""
    col = f"label.{axis}"
    data = runs.dropna(subset=["final.fd"])
    numeric = pd.api.types.is_numeric_dtype(data[col])
    agg = data.groupby(col)["final.fd"].agg(["mean", "count"]).reset_index().sort_values(col)
    best = agg.loc[agg["mean"].idxmin()]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if numeric:
        sns.lineplot(data=data, x=col, y="final.fd", estimator="mean", errorbar="sd", err_style="bars",
                     marker="o", markersize=7, err_kws={"capsize": 4}, ax=ax)
        sns.scatterplot(data=data, x=col, y="final.fd", color="black", s=14, alpha=0.6, ax=ax, zorder=3)
        ax.set_xticks(agg[col])
        xy = (best[col], best["mean"])
    else:
        sns.pointplot(data=data, x=col, y="final.fd", estimator="mean", errorbar="sd", capsize=0.15, ax=ax)
        xy = (list(agg[col]).index(best[col]), best["mean"])
    ax.annotate(f"best: {best[col]} ({best['mean']:.1f})", xy, textcoords="offset points", xytext=(6, 10),
                fontsize=9, arrowprops={"arrowstyle": "-", "color": "grey"})
    ax.set_xlabel(axis)
    ax.set_ylabel(f"final {fd_name}")
    n = int(agg["count"].max())
    ax.set_title(f"Sweep over {axis}: mean ± sd over seeds (n={n})" if n > 1 else f"Sweep over {axis} (one seed)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)
