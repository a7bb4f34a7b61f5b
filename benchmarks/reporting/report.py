"""Stage 4b: report.md, curves.csv, convergence.png, per-run sample grids, the "× faster convergence"
table and the Δt sweep plot. Its command, `python -m benchmarks.report grid=NAME [results=DIR]` (benchmarks/report.py), works at any time.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.config.grid import GRID_COPY, find_yaml, grid_source_name, load_yaml
from benchmarks.reporting import plots, stats
from benchmarks.reporting.collect import constant_axes, group_name, load_curves, load_runs
from core.config import ConfigError, load_config_yaml
from core.rundir import atomic_write_text

FD_NAME = "FD-fdnet"   # Fréchet distance in the profile's FD classifier features (not Inception FID)


def faster_convergence(curves: pd.DataFrame, runs: pd.DataFrame, baseline: str,
                       constant: tuple[str, ...] = ()) -> pd.DataFrame:
    """Steps each group needs for its FD to first reach the baseline's final FD, as a ratio.

    Each group is compared with the baseline group that has the same labels except the method (e.g. the
    same backbone). target = mean over the baseline's seeds of their final FD; baseline steps = the eval
    step of that final FD. For each run: the first eval step s with FD ≤ target; speed-up = baseline
    steps / s. Resolution is the eval interval (no interpolation). Runs that never reach it say so.
    Mean, bootstrap 95 % CI and min–max are over the group's runs (seeds × builds) that reached it.
    """
    done = runs[runs["status"] == "done"]
    rows, per_seed = [], []                                     # per_seed: the × faster chart (plots.faster)
    for group, g in curves.groupby("group"):
        base = done[done["group"] == _baseline_group(runs[runs["group"] == group].iloc[0], baseline, constant)]
        if base.empty or base["final.fd"].isna().all():
            continue
        target, base_steps = float(base["final.fd"].mean()), int(base["final.step"].max())
        reached = []
        for run_id, c in g.groupby("run_id"):
            if run_id not in set(done["run_id"]):
                continue                                        # failed or unfinished runs have no say
            hit = c[(c["fd"] <= target) & (c["step"] > 0)].sort_values("step")
            reached.append(int(hit["step"].iloc[0]) if len(hit) else None)
            per_seed.append({"group": group, "run_id": run_id,
                             "ratio": base_steps / reached[-1] if reached[-1] else float("nan")})
        if not reached:
            continue
        ok = [s for s in reached if s is not None]
        ratios = [base_steps / s for s in ok]
        rows.append({"group": group, "target FD": round(target, 3), "baseline steps": base_steps,
                     "steps to reach (per run)": ", ".join(str(s) if s else "not reached" for s in reached),
                     "× faster (mean)": f"{np.mean(ratios):.2f}×" if len(ok) == len(reached) else "not reached"
                     if not ok else f"{np.mean(ratios):.2f}× ({len(ok)}/{len(reached)} runs)",
                     "× faster 95 % CI": stats.ratio_ci(ratios),
                     "× faster (min–max)": f"{min(ratios):.2f}–{max(ratios):.2f}" if ok else "–"})
    out = pd.DataFrame(rows)
    out.attrs["per_seed"] = pd.DataFrame(per_seed, columns=["group", "run_id", "ratio"])   # one row per finished run
    return out


def _baseline_group(row: pd.Series, baseline: str, constant: tuple[str, ...]) -> str:
    label = {c[len("label."):]: row[c] for c in row.index if c.startswith("label.") and pd.notna(row[c])}
    return group_name({**label, "method": baseline}, constant)


def final_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per group (and protocol): n runs = seeds × builds (or fewer, if some are unfinished), mean
    and sd of each metric, and for the final FD the 95 % t CI of the mean and the min–max (benchmarks/reporting/stats.py)."""
    done = runs[runs["status"] == "done"]
    if done.empty:
        return pd.DataFrame()
    agg = {"final.fd": ["mean", "std"], "final.kid": "mean", "final.sfid": "mean", "final.is": "mean",
           "final.precision": "mean", "final.recall": "mean", "final.class_acc": ["mean", "std"],
           "first.fd": "mean"}
    agg = {k: v for k, v in agg.items() if k in done and done[k].notna().any()}   # this metric's columns
    if "final.nfe" in done and done["final.nfe"].notna().any():
        agg["final.nfe"] = "max"
    keys = ["group", "protocol"] if "protocol" in done and done["protocol"].notna().any() else ["group"]
    t = done.groupby(keys, dropna=False).agg(agg)
    t.columns = [f"{a} {b}" if b not in ("mean",) else a for a, b in t.columns]
    if "final.fd" in t and "first.fd" in t:
        t["final/first FD"] = t["final.fd"] / t["first.fd"]
    if "stale" in done and done["stale"].fillna(False).astype(bool).any():
        t["stale runs †"] = done.groupby(keys, dropna=False)["stale"].apply(lambda s: int(s.fillna(False).astype(bool).sum()))
    spread = stats.final_fd_columns(done, keys)            # n, seeds, builds, CI, min–max
    t = spread[["n", "seeds", "builds"]].join(t.rename(columns={"final.nfe max": "NFE"}).round(4))
    at = list(t.columns).index("final.fd std") + 1 if "final.fd std" in t else len(t.columns)
    for i, col in enumerate(("final.fd 95 % CI", "final.fd min–max")):
        t.insert(at + i, col, spread[col])
    return t.reset_index()


def _faster_with_protocols(fc: pd.DataFrame, runs: pd.DataFrame, plain: pd.DataFrame, mixed: bool) -> pd.DataFrame:
    """With mixed protocols allowed, each × faster row names the protocol(s) of its group."""
    if fc.empty or not mixed:
        return fc
    by_group = plain.assign(protocol=runs["protocol"].values).groupby("group")["protocol"].apply(
        lambda p: "+".join(sorted({x for x in p if isinstance(x, str)})) or "–")
    return fc.assign(protocol=fc["group"].map(by_group))


def _per_seed_marked(per_seed: pd.DataFrame, runs: pd.DataFrame, mixed: bool) -> pd.DataFrame:
    """The × faster chart's rows with each group marked by its run's protocol (" [P2]") when protocols are mixed."""
    if not mixed or per_seed.empty:
        return per_seed
    group = runs.set_index("run_id")["group"]             # already marked by _mark_groups
    return per_seed.assign(group=[group.get(r, g) for r, g in zip(per_seed["run_id"], per_seed["group"])])


def metric_text(runs: pd.DataFrame) -> tuple[str, str, str]:
    """(name of the `fd` column, the second convergence panel's metric, the report's metric paragraph)."""
    if "cfg.eval.metric" in runs and (runs["cfg.eval.metric"] == "adm").any():
        n = int(runs["cfg.eval.num_samples"].iloc[0])
        name = f"FID-{n // 1000}K" if n >= 1000 else f"FID-{n}"
        return name, "is", (f"**Metric.** {name}: Inception FID of {n} EMA samples against the ADM reference batch "
                            "(its precomputed statistics), with sFID, Inception Score and precision/recall, computed "
                            "as ADM's evaluator does through torch-fidelity's Inception (benchmarks/adm_eval.py, "
                            "docs/paper_scale.md). Samples are unguided unless the profile sets eval.guidance.")
    return FD_NAME, "class_acc", (
        f"**Metric.** {FD_NAME} is the Fréchet distance between sample and test-split features of the profile's "
        "own FD network (a small CNN classifier trained with labels on the training split), computed by "
        "torch-fidelity with that network registered as its feature extractor. It is *not* Inception FID and is "
        "not comparable with paper numbers; see docs/metrics.md. Samples are unguided (the papers' convergence "
        "metric) unless the profile sets eval.guidance; class accuracy is the FD classifier's accuracy on "
        "class-conditional samples (chance = 0.1).")


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _prepare_section(grid_root: Path) -> list[str]:
    path = grid_root / "prepare.json"
    if not path.exists():
        return ["(prepare summary not found)"]
    info = json.loads(path.read_text())
    lines = ["| artifact | summary |", "|---|---|"]
    for kind, summ in sorted(info.get("artifacts", {}).items()):
        lines.append(f"| {kind} | " + ", ".join(f"{k}={v}" for k, v in summ.items()) + " |")
    lines += _probe_lines(info.get("artifacts", {}))
    floor = info.get("real_data_floor")
    if floor:
        lines += ["", f"Real-data floor: {len(floor) and ''}{FD_NAME} of {info.get('num_samples')} real training "
                      f"images against the test split = **{floor['fd']:.3f}** (KID {floor['kid']:.4f}, precision "
                      f"{floor['precision']:.3f}, recall {floor['recall']:.3f}, class acc {floor['class_acc']:.3f}). "
                      "A perfect generator scores about this."]
    return lines


def _probe_lines(artifacts: dict) -> list[str]:
    """Each semantic stand-in's linear probe next to the same probe on raw pixels: the prior must beat pixels
    to test what the methods assume (docs/proxy.md)."""
    rows = [(kind, s) for kind, s in sorted(artifacts.items())
            if isinstance(s, dict) and "linear_probe_acc" in s and "pixel_probe_acc" in s]
    if not rows:
        return []
    lines = ["", "| semantic stand-in | linear probe | raw pixels | difference |", "|---|---:|---:|---:|"]
    for kind, s in rows:
        name = f"{kind} ({s.get('kind', '?')}{', ORACLE: upper bound' if s.get('oracle') else ''})"
        diff = 100 * (s["linear_probe_acc"] - s["pixel_probe_acc"])
        lines.append(f"| {name} | {s['linear_probe_acc']:.3f} | {s['pixel_probe_acc']:.3f} | {diff:+.1f} points |")
    return lines


def _unreadable_section(bad: pd.DataFrame) -> list[str]:
    """The runs left out because a file of theirs cannot be read, each with the file and the problem."""
    if bad.empty:
        return []
    return ["## Unreadable runs", "", "Left out of every table below; fix or delete the file named, then run "
            "`python -m benchmarks.report` again.", "",
            *[f"- `{r}`: {why}" for r, why in zip(bad["run_id"], bad["unreadable"])], ""]


def unreadable_runs(grid_root: Path) -> dict[str, str]:
    """run_id -> reason for the runs the last report listed as unreadable (from its runs.csv)."""
    path = Path(grid_root) / "runs.csv"
    if not path.exists():
        return {}
    runs = pd.read_csv(path)
    if "unreadable" not in runs:
        return {}
    bad = runs[runs["status"] == "unreadable"]
    return dict(zip(bad["run_id"], bad["unreadable"]))


PROTOCOLS_FILE = "protocols.json"    # the report's protocols: {"mixed", "allowed", "protocols": {P1: {tag, runs}}}


def grid_meta(grid_name: str, grid_root: Path) -> dict:
    """The grid description (description, baseline, sweep): the copy benchmarks.run keeps in the results
    folder (the grid file actually used), else the grid of that name under the config folders, else {}."""
    copy = grid_root / GRID_COPY
    if copy.exists():
        data = load_config_yaml(copy, "grid file")
        return data if isinstance(data, dict) else {}
    return load_yaml("grid", grid_name) if find_yaml("grid", grid_name) else {}


def protocol_names(runs: pd.DataFrame, baseline: str | None = None) -> dict[str, str]:
    """protocol_id -> "P1", "P2", ...: the baseline method's protocol first, then in the order of the runs
    table (runs never evaluated have none)."""
    col = "label.method" if "label.method" in runs else "method"
    order = runs if baseline is None or col not in runs else \
        pd.concat([runs[runs[col] == baseline], runs[runs[col] != baseline]])
    ids = [p for p in order.get("protocol_id", pd.Series(dtype=object)).tolist() if isinstance(p, str)]
    return {p: f"P{i + 1}" for i, p in enumerate(dict.fromkeys(ids))}


def _protocol_list(runs: pd.DataFrame, names: dict[str, str]) -> list[str]:
    """One line per protocol: its name, its description and the runs under it."""
    lines = []
    for pid, name in names.items():
        sub = runs[runs["protocol_id"] == pid]
        nfe = sub["final.nfe"] if "final.nfe" in sub else pd.Series([None] * len(sub), index=sub.index)
        lines.append(f"- **{name}**: {sub['protocol_tag'].iloc[0]} — runs (measured NFE per sample): "
                     + ", ".join(f"`{r}` ({int(n) if pd.notna(n) else '?'})" for r, n in zip(sub["run_id"], nfe)))
    return lines


def mixed_message(grid_name: str, protocols: dict) -> str:
    """The one-paragraph refusal: the protocols, the runs under each, and the two ways on."""
    listed = "; ".join(f"{name} = {p['tag']} (runs: {', '.join(p['runs'])})" for name, p in protocols.items())
    return (f"grid {grid_name!r}: the runs were evaluated with {len(protocols)} different protocols, so they are not "
            f"put in one comparison table: {listed}. Either make the protocols agree (one eval.sampler / "
            f"eval.guidance / eval.num_samples for every run; a sampler that ignores an eval override shows here "
            f"with its own NFE) and rerun, or compare them anyway, each row marked with its protocol: "
            f"`python -m benchmarks.report grid={grid_name} allow_mixed_eval=true` "
            f"(benchmarks.run: report.allow_mixed_eval=true; a grid whose protocols differ by design: "
            f"allow_mixed_eval: true in the grid file)")


def refused_mix(grid_root: Path) -> str | None:
    """The refusal message when the last report found mixed protocols without allow_mixed_eval, else None."""
    path = Path(grid_root) / PROTOCOLS_FILE
    if not path.exists():
        return None
    info = json.loads(path.read_text())
    if not info.get("mixed") or info.get("allowed"):
        return None
    return mixed_message(Path(grid_root).name, info["protocols"])


def _protocol_sections(grid_name: str, runs: pd.DataFrame, names: dict[str, str], refuse: bool) -> list[str]:
    if not names:
        return []
    if refuse:
        return ["## Mixed evaluation protocols: no comparison tables", "",
                "The runs below were evaluated with different protocols (sampler settings, guidance, number of "
                "samples, FD network or image size), so their numbers are not comparable and no final table, "
                "× faster table or convergence plot is drawn.", "", *_protocol_list(runs, names), "",
                "To go on: make the protocols agree (one `eval.sampler` / `eval.guidance` / `eval.num_samples` "
                "for every run; a sampler that ignores an eval override shows here with its own NFE) and rerun; "
                f"or compare them anyway, each row marked with its protocol: `python -m benchmarks.report "
                f"grid={grid_name} allow_mixed_eval=true` (`python -m benchmarks.run ... "
                "report.allow_mixed_eval=true`; a grid whose protocols differ by design, such as DiT's DDPM sampler "
                "next to flow samplers, says `allow_mixed_eval: true` in its file, docs/grids.md).", ""]
    head = "## Evaluation protocol" if len(names) == 1 else \
        "## Evaluation protocols (mixed, allowed by allow_mixed_eval: rows are marked)"
    return [head, "", "Recorded by each run at its first evaluation (`protocol.json`): the sampler as built, the "
            "measured NFE per sample, guidance, number of samples, scoring network and image size.", "",
            *_protocol_list(runs, names), ""]


def _stale_section(runs: pd.DataFrame) -> list[str]:
    if "stale" not in runs or not runs["stale"].fillna(False).astype(bool).any():
        return []
    st = runs[runs["stale"].fillna(False).astype(bool)]
    return ["## Stale runs", "", "Kept with `stale=keep` although the source of their components changed after "
            "they started (benchmarks/execution/fingerprint.py); their numbers come from the older code. Marked † below.", "",
            *[f"- `{r}`: changed {m}" for r, m in zip(st["run_id"], st["stale_modules"])], ""]


def _mark_groups(runs: pd.DataFrame, curves: pd.DataFrame, names: dict[str, str], mixed: bool
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Add the `protocol` column (P1, ...) to runs; with mixed protocols allowed, suffix every group with
    its protocol (" [P2]") in runs and curves so no table row or curve hides which protocol it has."""
    runs = runs.copy()
    runs["protocol"] = runs.get("protocol_id", pd.Series(index=runs.index, dtype=object)).map(names)
    if mixed:
        tag = runs.set_index("run_id")["protocol"]
        runs["group"] = [f"{g} [{p}]" if isinstance(p, str) else g for g, p in zip(runs["group"], runs["protocol"])]
        if not curves.empty:
            curves = curves.copy()
            curves["group"] = [f"{g} [{tag.get(r)}]" if isinstance(tag.get(r), str) else g
                               for g, r in zip(curves["group"], curves["run_id"])]
    return runs, curves


def write_report(grid_name: str, results_root: Path = Path("results"), allow_mixed_eval: bool = False) -> Path:
    """report.md and its tables for results/<grid>. Runs evaluated with different protocols are put in one
    comparison table only with allow_mixed_eval (then every row is marked with its protocol); otherwise
    the report lists the protocols and their runs instead of the comparison tables (refused_mix)."""
    grid_name = grid_source_name(grid_name)
    grid_root = Path(results_root) / grid_name
    if not grid_root.exists():
        raise ConfigError(f"no results for grid {grid_name!r} under {grid_root}; run `python -m benchmarks.run grid={grid_name}` first")
    meta = grid_meta(grid_name, grid_root)
    runs, curves = load_runs(grid_root), load_curves(grid_root)
    if runs.empty:
        raise ConfigError(f"no run folders under {grid_root}")
    bad = runs[runs["status"] == "unreadable"]
    runs = runs[runs["status"] != "unreadable"]           # the tables below are about readable runs
    if runs.empty:
        raise ConfigError(f"no readable run under {grid_root}: " + "; ".join(
            f"{r}: {why}" for r, why in zip(bad["run_id"], bad["unreadable"])))
    fd_name, second, paragraph = metric_text(runs)
    names = protocol_names(runs, meta.get("baseline"))
    mixed = len(names) > 1
    allow_mixed_eval = bool(allow_mixed_eval) or meta.get("allow_mixed_eval") is True   # asked here or in the grid file
    refuse = mixed and not allow_mixed_eval            # different protocols: no comparison table unless asked
    atomic_write_text(grid_root / PROTOCOLS_FILE, json.dumps({"mixed": mixed, "allowed": allow_mixed_eval,
        "protocols": {n: {"tag": runs.loc[runs["protocol_id"] == pid, "protocol_tag"].iloc[0],
                          "runs": runs.loc[runs["protocol_id"] == pid, "run_id"].tolist()} for pid, n in names.items()}},
        indent=2))
    plain_runs, plain_curves = runs, curves            # group names without protocol marks (the × faster lookup)
    runs, curves = _mark_groups(runs, curves, names, mixed)
    if not curves.empty:
        curves.to_csv(grid_root / "curves.csv", index=False)
    if not curves.empty and not refuse:
        plots.convergence(curves, grid_root / "convergence.png", fd_name, second)
    listed = pd.concat([runs, bad]) if not bad.empty else runs
    listed.drop(columns=[c for c in listed.columns if c.startswith("cfg.")]).to_csv(grid_root / "runs.csv", index=False)
    samples = grid_root / "samples"
    samples.mkdir(exist_ok=True)
    for run in runs["path"]:
        pngs = sorted((Path(run) / "samples").glob("step_*.png"))
        if pngs:
            shutil.copyfile(pngs[-1], samples / f"{Path(run).name}.png")
        if (Path(run) / "samples" / "phases.png").exists():
            shutil.copyfile(Path(run) / "samples" / "phases.png", samples / f"{Path(run).name}_phases.png")
    md = [f"# Grid `{grid_name}`", "", f"{meta.get('description', '')}", "",
          f"Profile `{runs['cfg.profile'].iloc[0]}`, {len(runs) + len(bad)} runs "
          f"({(runs['status'] == 'done').sum()} done, {(runs['status'] == 'failed').sum()} failed"
          f"{f', {len(bad)} unreadable' if len(bad) else ''}), "
          f"written {time.strftime('%Y-%m-%d %H:%M')} at git {_git_sha()}.", "",
          *_unreadable_section(bad), paragraph, "", "## Prepared artifacts", "", *_prepare_section(grid_root), "",
          *_protocol_sections(grid_name, runs, names, refuse), *_stale_section(runs)]
    if not refuse:
        ft = final_table(runs)
        md += ["## Final metrics (mean over seeds × builds)", "",
               ft.to_markdown(index=False) if not ft.empty else "(no finished runs)", "", stats.STATS_NOTE,
               "", *(["Protocols (P1, ...): see *Evaluation protocols* above; rows of different protocols are not "
                      "comparable.", ""] if mixed else [])]
        pairs = stats.comparisons(runs, meta.get("baseline"))
        if pairs:
            md += ["## Comparisons (final FD, lower is better)", "", stats.COMPARE_NOTE, "", *pairs, ""]
    if meta.get("baseline") and not curves.empty and not refuse:
        raw = faster_convergence(plain_curves, plain_runs, meta["baseline"], constant_axes(grid_root))
        fc = _faster_with_protocols(raw, runs, plain_runs, mixed)
        md += [f"## × faster convergence (vs `{meta['baseline']}`)", "",
               "Steps at which each group's FD first reaches the baseline's final FD; ratio = baseline steps / "
               "those steps. Resolution is the eval interval.", "", fc.to_markdown(index=False) if not fc.empty else "(baseline not finished)", ""]
        if not raw.attrs["per_seed"].empty:
            plots.faster(_per_seed_marked(raw.attrs["per_seed"], runs, mixed), grid_root / "faster.png", meta["baseline"])
            md += ["![× faster](faster.png)", ""]
    if meta.get("sweep") and f"label.{meta['sweep']}" in runs and runs["final.fd"].notna().any() and not refuse:
        plots.sweep(runs[runs["status"] == "done"], meta["sweep"], grid_root / "sweep.png", fd_name)
        md += [f"## Sweep over `{meta['sweep']}`", "", "![sweep](sweep.png)", ""]
    if not curves.empty and not refuse:
        md += ["## Convergence", "", "![convergence](convergence.png)", "", "Data: `curves.csv`.", ""]
    phase_pngs = {g: f"samples/{r}_phases.png" for g, r in runs.sort_values("seed").groupby("group")["run_id"].first().items()
                  if (samples / f"{r}_phases.png").exists()}
    if phase_pngs:
        md += ["## Sampling, phase by phase", "", "The state at a few global times τ for 4 class-conditional samples "
               "(first seed of each group, last EMA weights): the texture group decoded, other groups as the mean "
               "of their channels. An asynchronous schedule (SFD) moves only the semantic channels first "
               "(τ < Δt), then both, then only the texture (τ > 1).", ""]
        md += [f"**{g}**\n\n![{g}]({p})\n" for g, p in phase_pngs.items()]
    md += ["## Reproducibility", "", *stats.reproducibility(runs)]
    cols = ["run_id", "group", "seed", "build", "status", "step", "final.step", "protocol", "final.nfe", "first.fd", "final.fd",
            "final.class_acc", "sec_per_step", "failure"]
    if refuse:                                         # no metric side by side across protocols
        cols = [c for c in cols if c not in ("first.fd", "final.fd", "final.class_acc")]
    shown = runs.assign(build=stats.build_index(runs), run_id=[f"{r} †" if pd.notna(s) and bool(s) else r
                                for r, s in zip(runs["run_id"], runs.get("stale", [False] * len(runs)))])
    md += ["## Runs", "", shown[[c for c in cols if c in shown]].round(4).to_markdown(index=False), "",
           "Samples at each run's last eval: `samples/<run_id>.png` (rows sorted by class).", ""]
    out = grid_root / "report.md"
    atomic_write_text(out, "\n".join(md))
    return out
