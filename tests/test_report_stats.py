"""The report's statistics over training seeds × artifact builds (benchmarks/reporting/stats.py): n, sd, t CI of the
final FD, the × faster CI, the Welch comparisons and their wording, the Reproducibility paragraph.

Run folders are written by hand from fixed curves (as in tests/test_protocol.py): 2 seeds × 2 builds
(`prepare.seed`) for the baseline `sit` and two methods; the expected numbers are computed here with scipy
and numpy, independently of benchmarks/reporting/stats.py."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from benchmarks.reporting import collect
from benchmarks.reporting import plots
from benchmarks.reporting import report
from benchmarks.reporting import stats

# final FD per (seed, build): sfd and redi overlap each other, both are clearly below sit
FINAL = {"sit": [60.0, 62.0, 61.0, 63.0], "sfd": [50.0, 52.0, 51.5, 49.0], "redi": [51.0, 53.5, 48.0, 52.5]}
# FD at step 3: sfd reaches sit's mean final FD (61.5) there in 3 of 4 runs, redi in 1 of 4
MID = {"sit": [70.0, 72.0, 71.0, 73.0], "sfd": [60.0, 61.0, 70.0, 58.0], "redi": [65.0, 61.0, 66.0, 67.0]}
REPLICATES = [(0, 0), (1, 0), (0, 1), (1, 1)]          # (seed, prepare.seed)


def _run(root, method: str, seed: int, build: int, fds: list[float], label: dict | None = None, tag: str = ""):
    d = root / f"{method}{tag}-s{seed}-b{build}"
    d.mkdir(parents=True)
    cfg = {"profile": "smoke", "seed": seed, "prepare": {"seed": build}, "method": {"name": method},
           "backbone": {"name": "lightningdit-tiny"}, "train": {"steps": 6, "threads": 1, "device": "cpu"},
           "eval": {"metric": "fd-net", "num_samples": 100}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "label.json").write_text(json.dumps(label or {"method": method, "seed": seed, "prepare.seed": build}))
    (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "fd": f, "class_acc": 0.5, "nfe": 3}) + "\n"
                                          for s, f in zip([0, 3, 6], fds)))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 6, "loss": 1.0}) + "\n")
    (d / "done.json").write_text(json.dumps({"step": 6}))


@pytest.fixture
def grid(tmp_path):
    root = tmp_path / "results" / "g"
    for method in FINAL:
        for i, (seed, build) in enumerate(REPLICATES):
            _run(root, method, seed, build, [90.0, MID[method][i], FINAL[method][i]])
    (root / "grid.yaml").write_text("description: seeds x builds\naxes: {method: [sit, sfd, redi], seed: [0, 1], "
                                    "prepare.seed: [0, 1]}\nbaseline: sit\n")
    return root


def _table(md: str, section: str) -> pd.DataFrame:
    """The first markdown table under `## section` as strings."""
    lines = [ln for ln in md.split(f"## {section}")[1].split("\n## ")[0].splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return pd.DataFrame(cells[2:], columns=cells[0])


def _sentences(md: str) -> list[str]:
    return [ln[2:] for ln in md.split("## Comparisons")[1].split("\n## ")[0].splitlines() if ln.startswith("- ")]


def test_prepare_seed_is_a_replicate_axis_not_part_of_group_names(grid):
    assert collect.REPLICATE_AXES == ("seed", "prepare.seed")
    assert collect.group_name({"method": "sfd", "seed": 1, "prepare.seed": 1, "backbone": "b"}) == "sfd,backbone=b"
    runs = collect.load_runs(grid)
    assert sorted(runs["group"].unique()) == ["redi", "sfd", "sit"]      # 3 groups of 4 runs, not 12 of 1
    md = report.write_report("g", grid.parent).read_text()
    assert "prepare.seed=" not in md and "prepare.seed=" not in (grid / "runs.csv").read_text()


def test_final_table_has_n_seeds_builds_and_the_t_ci(grid):
    md = report.write_report("g", grid.parent).read_text()
    t = _table(md, "Final metrics").set_index("group")
    for method, fds in FINAL.items():
        row, x = t.loc[method], np.array(fds)
        assert (row["n"], row["seeds"], row["builds"]) == ("4", "2", "2")
        lo, hi = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
        assert row["final.fd 95 % CI"] == f"[{lo:.3f}, {hi:.3f}]"
        assert row["final.fd min–max"] == f"{x.min():.3f}–{x.max():.3f}"
        assert float(row["final.fd"]) == pytest.approx(x.mean(), abs=1e-4)
        assert float(row["final.fd std"]) == pytest.approx(x.std(ddof=1), abs=1e-4)
    assert "Student-t interval of the mean" in md


def test_comparison_wording_not_distinguishable_and_lower_by(grid):
    md = report.write_report("g", grid.parent).read_text()
    lines = _sentences(md)
    assert len(lines) == 3                               # redi vs sit, sfd vs sit, redi vs sfd
    for method in ("sfd", "redi"):
        res = sps.ttest_ind(FINAL[method], FINAL["sit"], equal_var=False).confidence_interval(0.95)
        d = np.mean(FINAL["sit"]) - np.mean(FINAL[method])          # the gap, sit above
        assert res.high < 0                                         # the fixture: clearly lower
        assert f"{method} is lower than sit by {d:.3f} (95 % CI [{-res.high:.3f}, {-res.low:.3f}], n = 4 / 4)" in lines
    res = sps.ttest_ind(FINAL["redi"], FINAL["sfd"], equal_var=False).confidence_interval(0.95)
    d = np.mean(FINAL["redi"]) - np.mean(FINAL["sfd"])
    assert res.low < 0 < res.high                                   # the fixture: overlapping
    assert (f"**redi and sfd are not distinguishable** at n = 4 / 4 runs (final FD difference {d:+.3f}, "
            f"95 % CI [{res.low:.3f}, {res.high:.3f}])") in lines


def test_faster_table_ci_is_the_charts_bootstrap_ci(grid, figures):
    md = report.write_report("g", grid.parent).read_text()
    t = _table(md, "× faster convergence").set_index("group")
    assert t.loc["sfd", "steps to reach (per run)"] == "3, 6, 3, 3"       # by run id: s0-b1 reaches it only at step 6
    assert t.loc["sfd", "× faster (mean)"] == "1.75×" and t.loc["sfd", "× faster (min–max)"] == "1.00–2.00"
    assert t.loc["redi", "steps to reach (per run)"] == "6, 6, 3, 6" and t.loc["redi", "× faster (mean)"] == "1.25×"
    ax = figures[-1].axes[0]                             # faster.png: seaborn's error bar per group
    ticks = [tk.get_text() for tk in ax.get_yticklabels()]
    i = ticks.index("sfd")
    (lo, hi), = [ln.get_xdata()[3:5] for ln in ax.get_lines() if len(ln.get_ydata()) == 8 and ln.get_ydata()[3] == i]
    assert t.loc["sfd", "× faster 95 % CI"] == f"{lo:.2f}–{hi:.2f}×"           # the table says what the chart draws
    assert 1.0 <= lo < 1.75 < hi <= 2.0
    assert np.isnan(stats.bootstrap_ci([2.0])).all() and stats.ratio_ci([2.0]) == "–"   # n = 1: no interval


def test_one_run_per_group_gets_no_ci_and_says_so(tmp_path):
    """One seed, one build, two backbones: sfd and sit are compared per backbone only, without a CI."""
    root = tmp_path / "results" / "g"
    for method, fd in (("sit", 61.0), ("sfd", 50.0)):
        for bb in ("a", "b"):
            _run(root, method, 0, 0, [90.0, 70.0, fd + (bb == "b")], label={"method": method, "backbone": bb,
                                                                           "seed": 0}, tag=bb)
    md = report.write_report("g", tmp_path / "results").read_text()
    t = _table(md, "Final metrics").set_index("group")
    assert (t["n"] == "1").all() and (t["final.fd 95 % CI"] == "–").all() and (t["final.fd std"] == "nan").all()
    lines = _sentences(md)
    assert len(lines) == 2
    assert ("sfd,backbone=a vs sit,backbone=a: one run each, no CI (a group of one run has no spread); the final FD "
            "difference -11.000 means something only if it is larger than the seed × build spread") in lines[0]
    assert not any("backbone=a" in ln and "backbone=b" in ln for ln in lines)      # other labels differ: no pair


def test_reproducibility_paragraph_states_seeds_builds_and_machine_facts(grid):
    md = report.write_report("g", grid.parent).read_text()
    para = md.split("## Reproducibility")[1].split("\n## ")[0]
    assert "2 training seed(s) (0, 1) × 2 artifact build(s) (prepare.seed 0, 1)" in para
    assert "byte-identical" in para and "scripts/prepare_twice.py" in para and "bit-identical when rerun" in para
    assert "train.device = cpu" in para and "train.threads = 1" in para and "machine(s): not recorded" in para
    assert re.search(r"Intel vs AMD", para)


def test_reproducibility_names_the_machines_and_warns_when_pooled(grid):
    runs = sorted(p for p in grid.iterdir() if (p / "config.yaml").exists())
    for i, run in enumerate(runs):
        cpu = "AMD EPYC 7B13" if i % 2 else "Intel(R) Xeon(R) Processor"
        (run / "machine.json").write_text(json.dumps([{"cpu": cpu, "cores": 2, "torch": "2.x", "accelerator": "none"}]))
    (runs[0] / "machine.json").write_text("{damaged")
    para = report.write_report("g", grid.parent).read_text().split("## Reproducibility")[1].split("\n## ")[0]
    assert "AMD EPYC 7B13 (2 cores)" in para and "Intel(R) Xeon(R) Processor (2 cores)" in para
    assert "more than one machine type are pooled" in para and "machine.json unreadable" in para


def test_welch_and_t_against_scipy_on_unequal_groups():
    a, b = [3.0, 4.5, 2.0, 5.0, 4.0], [6.0, 9.0, 7.5]
    diff = stats.welch(a, b)
    ci = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (diff.lo, diff.hi) == pytest.approx((ci.low, ci.high)) and diff.distinguishable
    s = stats.summarize(b)
    assert (s.lo, s.hi) == pytest.approx(sps.t.interval(0.95, 2, loc=np.mean(b), scale=sps.sem(b)))
    assert not stats.welch([1.0], b).has_ci and not stats.welch([1.0], b).distinguishable
