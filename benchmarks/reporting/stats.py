"""The report's statistics over replicate runs (training seeds × artifact builds): mean, spread and 95 %
confidence intervals, and the comparison wording (docs/grids.md, "Statistics in the report").

A group is every run that differs only by a replicate axis (collect.REPLICATE_AXES: `seed`, the training
seed, and `prepare.seed`, the artifact-build index). Its n runs are treated as independent draws of the
method's final FD: the seed and the build both change the result, and pooling them is what a reader of
"method A vs method B" wants to know (is the difference larger than what reseeding either would do?).

- Final FD: mean, sd, min–max, and the Student-t 95 % CI of the mean (n − 1 dof). n = 1 has no CI ("–"),
  never a made-up one.
- "× faster": mean ratio with a bootstrap 95 % CI over the group's runs, computed exactly as the chart
  (plots.faster, seaborn: 2000 resamples, seed 0, percentile interval), so table and faster.png show the
  same interval and the report is deterministic. Why not t on the log ratio: the chart is seaborn's mean
  with its bootstrap CI, and two different intervals for one number would be read as a contradiction.
  The price: with n ≤ 3 a bootstrap CI is at most the min–max range of the runs and understates the
  uncertainty, so the per-run spread is shown next to it.
- Comparisons: the difference of mean final FD of two groups with a Welch 95 % CI (unequal variances,
  Welch–Satterthwaite dof); "not distinguishable" when that CI contains 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from benchmarks.reporting.collect import REPLICATE_AXES

LEVEL = 95                 # every interval in the report is a 95 % one
N_BOOT, BOOT_SEED = 2000, 0   # the same as plots.faster's seaborn barplot (n_boot=2000, seed=0)
NO_CI = "–"
# The report's explanations under the final table and above the comparisons (docs/grids.md,
# "Statistics in the report", says the same at length).
STATS_NOTE = ("n = runs (training seeds × artifact builds, `prepare.seed`) of the group that finished; "
              "`final.fd std` and `final.fd min–max` are their spread, `final.fd 95 % CI` the Student-t interval of "
              "the mean (n − 1 dof; – for n = 1). docs/grids.md, \"Statistics in the report\".")
COMPARE_NOTE = ("Each group against the baseline's group with the same other labels and protocol, then every pair of "
                "other groups alike: the difference of mean final FD with a Welch 95 % CI. \"Not distinguishable\" "
                "means that CI contains 0 at this n: more seeds or builds could still separate them.")


@dataclass(frozen=True)
class Summary:
    """Mean, spread and the t CI of the mean of n values; sd, lo, hi are NaN when n < 2."""
    n: int
    mean: float
    sd: float
    lo: float
    hi: float
    min: float
    max: float


def summarize(values: Sequence[float]) -> Summary:
    """values: (n,) finite numbers, n ≥ 1. CI = mean ± t(0.975, n−1) · sd / √n."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        raise ValueError("summarize needs at least one finite value")
    mean = float(x.mean())
    if len(x) < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan, mean, mean)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + LEVEL / 200, len(x) - 1)) * sd / math.sqrt(len(x))
    return Summary(len(x), mean, sd, mean - half, mean + half, float(x.min()), float(x.max()))


def bootstrap_ci(values: Sequence[float]) -> tuple[float, float]:
    """(lo, hi) percentile bootstrap 95 % CI of the mean of `values` (n,), exactly seaborn's for the
    × faster chart; (NaN, NaN) for n < 2."""
    from seaborn.algorithms import bootstrap   # heavy (seaborn loads matplotlib): only for a chart's CI

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return math.nan, math.nan
    boots = bootstrap(x, func="mean", n_boot=N_BOOT, seed=BOOT_SEED)
    edge = (100 - LEVEL) / 2
    lo, hi = np.nanpercentile(boots, (edge, 100 - edge))
    return float(lo), float(hi)


def ratio_ci(ratios: list[float]) -> str:
    """The bootstrap 95 % CI of the mean ratio over the runs that reached the target, as faster.png draws
    it (bootstrap_ci: the same resamples, so table and chart agree); "–" below 2 runs."""
    lo, hi = bootstrap_ci(ratios)
    return "–" if math.isnan(lo) else f"{lo:.2f}–{hi:.2f}×"


@dataclass(frozen=True)
class Difference:
    """mean(a) − mean(b) with its Welch 95 % CI; lo = hi = NaN when either side has one value."""
    d: float
    lo: float
    hi: float
    na: int
    nb: int

    @property
    def has_ci(self) -> bool:
        return not math.isnan(self.lo)

    @property
    def distinguishable(self) -> bool:
        """The CI excludes 0 (False also without a CI: nothing to say)."""
        return self.has_ci and (self.lo > 0 or self.hi < 0)


def welch(a: Sequence[float], b: Sequence[float]) -> Difference:
    """a: (na,), b: (nb,) values. d = mean(a) − mean(b); CI = d ± t(0.975, ν) · se with
    se² = sa²/na + sb²/nb and ν the Welch–Satterthwaite dof. Zero spread on both sides: CI = [d, d]."""
    sa, sb = summarize(a), summarize(b)
    d = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Difference(d, math.nan, math.nan, sa.n, sb.n)
    va, vb = sa.sd ** 2 / sa.n, sb.sd ** 2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(d, d, d, sa.n, sb.n)
    dof = (va + vb) ** 2 / (va ** 2 / (sa.n - 1) + vb ** 2 / (sb.n - 1))
    half = float(sps.t.ppf(0.5 + LEVEL / 200, dof)) * se
    return Difference(d, d - half, d + half, sa.n, sb.n)


def num(x: float) -> str:
    """A number in the report's sentences: 3 decimals (FD values run from ~1 to a few hundred)."""
    return f"{x:.3f}"


def interval(lo: float, hi: float) -> str:
    """"[lo, hi]", or "–" where there is no interval (n = 1)."""
    return NO_CI if math.isnan(lo) else f"[{num(lo)}, {num(hi)}]"


def compare_sentence(a: str, b: str, diff: Difference, metric: str = "final FD") -> str:
    """The one-line verdict on group `a` against group `b` (names as in the tables), lower is better.

    CI contains 0: "**a and b are not distinguishable** at n = na / nb runs (...)"; otherwise "a is
    lower/higher than b by |d| (95 % CI [lo, hi] of that gap, ...)"; a group of one run: no CI, said so."""
    if not diff.has_ci:
        runs = "one run each" if diff.na == diff.nb == 1 else f"n = {diff.na} / {diff.nb} runs"
        return (f"{a} vs {b}: {runs}, no CI (a group of one run has no spread); the {metric} difference "
                f"{diff.d:+.3f} means something only if it is larger than the seed × build spread measured "
                "elsewhere (the sd of groups with n ≥ 2 in this report, or docs/results.md)")
    if not diff.distinguishable:
        return (f"**{a} and {b} are not distinguishable** at n = {diff.na} / {diff.nb} runs ({metric} "
                f"difference {diff.d:+.3f}, 95 % CI {interval(diff.lo, diff.hi)})")
    word, lo, hi = ("lower", -diff.hi, -diff.lo) if diff.d < 0 else ("higher", diff.lo, diff.hi)
    return (f"{a} is {word} than {b} by {num(abs(diff.d))} (95 % CI {interval(lo, hi)}, "
            f"n = {diff.na} / {diff.nb})")


# ------------------------------------------------------------------------------ over a grid's runs table
def build_index(runs: pd.DataFrame) -> pd.Series:
    """The artifact-build index of each run (len(runs),): its `prepare.seed` axis value, else its config's
    prepare.seed, else 0 (runs made before builds had an index all used build 0)."""
    out = pd.Series(0, index=runs.index, dtype=object)
    for col in ("cfg.prepare.seed", "label.prepare.seed"):      # the label wins: it is what the grid varied
        if col in runs:
            out = runs[col].astype(object).where(runs[col].notna(), out)
    # a column with gaps (build 0 is left out of configs and labels) reads as floats: 1.0 is build 1
    return out.map(lambda b: int(b) if isinstance(b, float) and b.is_integer() else b)


def final_fd_columns(done: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per group (index: keys): n runs, distinct seeds and builds, final FD 95 % t CI and min–max spread."""
    done = done.assign(_build=build_index(done).astype(str))
    rows = {}
    for key, g in done.groupby(keys, dropna=False):
        fd = g["final.fd"].dropna().tolist() if "final.fd" in g else []
        s = summarize(fd) if fd else None
        rows[key] = {"n": len(g), "seeds": g["seed"].nunique(), "builds": g["_build"].nunique(),
                     "final.fd 95 % CI": interval(s.lo, s.hi) if s else NO_CI,
                     "final.fd min–max": f"{num(s.min)}–{num(s.max)}" if s else NO_CI}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=keys) if len(keys) > 1 else \
        pd.Index([k[0] if isinstance(k, tuple) else k for k in out.index], name=keys[0])
    return out


def _others(row: pd.Series) -> str:
    """The labels of a run that are neither the method nor a replicate axis, as a sortable key."""
    skip = {f"label.{k}" for k in ("method", *REPLICATE_AXES)}
    return json.dumps({c: str(row[c]) for c in sorted(row.index)
                       if c.startswith("label.") and c not in skip and pd.notna(row[c])})


def comparisons(runs: pd.DataFrame, baseline: str | None) -> list[str]:
    """One sentence per compared pair of groups (compare_sentence), on final FD of finished runs.

    Groups are compared only with groups of the same other labels (all labels but the method and the
    replicate axes) and the same protocol: each group against the baseline method's group, then every
    pair of non-baseline groups. runs: the report's runs table (group, protocol, label.*, final.fd)."""
    done = runs[(runs["status"] == "done") & runs.get("final.fd", pd.Series(index=runs.index)).notna()]
    if done.empty:
        return []
    method = done["label.method"].fillna(done["method"]) if "label.method" in done else done["method"]
    proto = done["protocol"].fillna("") if "protocol" in done else pd.Series("", index=done.index)
    key = pd.Series([_others(r) for _, r in done.iterrows()], index=done.index) + "|" + proto.astype(str)
    lines = []
    for _, idx in sorted(done.groupby(key).groups.items()):
        part = done.loc[idx]
        groups = sorted(part["group"].unique())
        base = [g for g in groups if (method.loc[part.index][part["group"] == g] == baseline).any()]
        others = [g for g in groups if g not in base]
        pairs = [(g, b) for b in base for g in others] + \
                [(a, b) for i, a in enumerate(others) for b in others[i + 1:]]
        for a, b in pairs:
            fa, fb = part.loc[part["group"] == a, "final.fd"], part.loc[part["group"] == b, "final.fd"]
            lines.append("- " + compare_sentence(a, b, welch(fa.tolist(), fb.tolist())))
    return lines


def reproducibility(runs: pd.DataFrame) -> list[str]:
    """The report's "Reproducibility" paragraph: what is bit-identical where, with the facts the runs
    record (seeds, builds, device and thread count from their configs, the machine from machine.json)."""
    seeds = sorted({int(s) for s in runs["seed"].dropna()}) if "seed" in runs else []
    builds = sorted({str(b) for b in build_index(runs)})
    threads = sorted({str(t) for t in runs.get("cfg.train.threads", pd.Series(dtype=object)).dropna()})
    device = sorted({str(d) for d in runs.get("cfg.train.device", pd.Series(dtype=object)).dropna()})
    recorded = ", ".join(x for x in (f"train.device = {'/'.join(device)}" if device else "",
                                     f"train.threads = {'/'.join(threads)} (0: torch's default)" if threads else "")
                         if x) or "nothing about the threads"
    machines = sorted({str(m) for m in runs.get("machine", pd.Series(dtype=object)).dropna()})
    return [
        f"This grid has {len(seeds)} training seed(s) ({', '.join(map(str, seeds)) or '–'}) × {len(builds)} "
        f"artifact build(s) (prepare.seed {', '.join(builds)}); the CIs above are over those runs.",
        "",
        "- **Same machine** (same CPU model, same intra-op thread count, same library versions): prepared artifacts "
        "and latent caches are byte-identical when built again (`python scripts/prepare_twice.py` checks it), and a "
        "run's curve is bit-identical when rerun or resumed after a kill (every random draw is seeded).",
        "- **Across machines** (Intel vs AMD, other instruction sets, another thread count, GPU vs CPU): PyTorch, "
        "MKL and oneDNN pick other kernels, floats round differently, so artifacts, latent caches and FDs differ; "
        "expect the difference to be within the seed × build spread above, not zero. Compare numbers from two "
        "machines only through their CIs (docs/results.md, \"Reproducibility: what is bit-identical where\").",
        f"- **What these runs recorded:** {recorded}; machine(s): " + ("; ".join(machines) if machines else
            "not recorded (runs made before machine.json existed; docs/results.md names the reference machines)")
        + (". **Runs from more than one machine type are pooled here**: their differences include the "
           "machines' arithmetic." if len(machines) > 1 else "."),
        "",
    ]
