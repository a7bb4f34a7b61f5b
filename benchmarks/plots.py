"""Plots from DataFrames only (never checkpoints): convergence curves, the Δt sweep."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _spread(curves: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, min and max over seeds of `metric` per (group, step)."""
    return curves.groupby(["group", "step"])[metric].agg(["mean", "min", "max", "count"]).reset_index()


SECOND_PANEL = {"class_acc": "class accuracy of samples", "is": "Inception Score"}


def convergence(curves: pd.DataFrame, out: Path, fd_name: str, second: str = "class_acc") -> Path:
    """FD (left) and class accuracy of conditional samples (right; `second="is"`: Inception Score at paper
    scale) against training step, log-x.

    One line per group (method/backbone/axes), the mean over seeds, shaded between min and max.
    Step 0 (the untrained model) sits on the linear part of a symlog axis.
    """
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for metric, ax, ylabel in (("fd", axes[0], fd_name), (second, axes[1], SECOND_PANEL[second])):
        if metric not in curves:
            continue
        agg = _spread(curves, metric)
        for group, g in agg.groupby("group"):
            line, = ax.plot(g["step"], g["mean"], marker="o", ms=3, label=f"{group} (n={int(g['count'].max())})")
            ax.fill_between(g["step"], g["min"], g["max"], color=line.get_color(), alpha=0.2)
        nonzero = curves.loc[curves["step"] > 0, "step"]
        ax.set_xscale("symlog", linthresh=float(nonzero.min()) if len(nonzero) else 1.0)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    if second == "class_acc":
        axes[1].axhline(0.1, color="grey", ls=":", lw=1, label="chance")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.suptitle("Convergence (mean over seeds, shaded min–max)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def sweep(runs: pd.DataFrame, axis: str, out: Path, fd_name: str) -> Path:
    """Final FD against a swept axis value (e.g. SFD's Δt), mean ± std over seeds."""
    col = f"label.{axis}"
    agg = runs.groupby(col)["final.fd"].agg(["mean", "std", "count"]).reset_index().sort_values(col)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.errorbar(agg[col], agg["mean"], yerr=agg["std"].fillna(0), marker="o", capsize=3)
    best = agg.loc[agg["mean"].idxmin()]
    ax.annotate(f"best {best[col]}", (best[col], best["mean"]), textcoords="offset points", xytext=(5, 8))
    ax.set_xlabel(axis)
    ax.set_ylabel(f"final {fd_name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
