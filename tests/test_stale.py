"""Code in the run's identity: a run records the fingerprint of its components' source when it starts
(benchmarks/execution/fingerprint.py); after a plugin's code changes, rerunning the grid names the stale run and the
changed module, and reruns it (stale=rerun) or keeps and marks it (stale=keep) only when asked.

One smoke run of a tiny plugin method (an entry-point package written to tmp_path, as in test_plugins.py),
run from a grid given by its path; the shared `smoke_cache` keeps it to seconds."""
import json
import sys
import textwrap

import pytest

from benchmarks import run as cli
from benchmarks.execution.fingerprint import fingerprint, modules_of
from plugin_util import install_plugin

pytestmark = pytest.mark.slow

PLUGIN = '''
from core.registry import LOSSES
from methods.losses import FlowLoss


@LOSSES.register("flow-stale-test")
class StaleTestLoss(FlowLoss):
    """The velocity MSE, unchanged: the test edits this file to make its run stale."""
'''


def _plugin(tmp_path, monkeypatch):
    site = install_plugin(tmp_path, monkeypatch, "stale_plugin", PLUGIN, "staletest")
    configs = tmp_path / "configs"
    (configs / "method").mkdir(parents=True)
    (configs / "method" / "stalem.yaml").write_text(textwrap.dedent("""
        method:
          name: stalem
          latent: {name: vae}
          schedule: {name: flow, time_dist: uniform}
          loss: {name: flow-stale-test}
          sampler: {name: ode, solver: euler, steps: 10}
    """))
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(configs))
    grid = tmp_path / "elsewhere" / "stale_grid.yaml"        # a grid from a path, not a config folder
    grid.parent.mkdir()
    grid.write_text("description: a plugin method made stale\nprofile: smoke\n"
                    "axes: {method: [stalem], backbone: [lightningdit-tiny], seed: [0]}\nbaseline: stalem\n")
    return site / "stale_plugin" / "__init__.py", grid


def test_modules_of_a_class_include_its_bases_outside_torch():
    from methods.losses import FlowLoss

    mods = modules_of(FlowLoss)
    assert "methods.losses" in mods and "methods.base" in mods
    assert not any(m.startswith("torch") or m in ("builtins", "abc") for m in mods)


def test_changed_plugin_makes_its_run_stale(tmp_path, monkeypatch, smoke_cache, capsys):
    plugin, grid = _plugin(tmp_path, monkeypatch)
    args = [f"grid={grid}", f"results={tmp_path / 'results'}", f"cache_dir={smoke_cache}", "launcher=inline"]
    try:
        assert cli.main(args) == 0
        root = tmp_path / "results" / "stale_grid"
        (run,) = [p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").exists()]
        recorded = json.loads((run / "fingerprint.json").read_text())
        assert "stale_plugin" in recorded["roles"]["loss"] and "methods.losses" in recorded["roles"]["loss"]
        # the protocol as built: the smoke profile's eval sampler, its measured NFE in every eval row
        proto = json.loads((run / "protocol.json").read_text())
        nfes = {json.loads(line)["nfe"] for line in (run / "eval.jsonl").read_text().splitlines()}
        assert proto["sampler"]["name"] == "ode" and proto["sampler"]["steps"] == 4 and nfes == {proto["nfe"]}
        assert proto["fd_network"]["artifact"].startswith("fd-net-") and proto["guidance"] is None
        # the grid file actually used travels with the results: the report finds its baseline without it
        assert (root / "grid.yaml").read_text() == grid.read_text()
        md = (root / "report.md").read_text()
        assert "a plugin method made stale" in md and "× faster convergence (vs `stalem`)" in md

        metrics = (run / "metrics.jsonl").read_text()
        assert cli.main(args) == 0                               # the same code: reused, nothing redone
        plugin.write_text(PLUGIN + "\n# a bug fixed after the run finished\n")
        capsys.readouterr()
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert f"1 run(s) were made with other code than the source now on disk (stale): {run.name} " \
               f"(changed: stale_plugin)" in err
        assert "stale=rerun" in err and "stale=keep" in err
        assert (run / "metrics.jsonl").read_text() == metrics

        assert cli.main(args + ["stale=keep"]) == 0              # reused as it is, and marked
        assert (run / "metrics.jsonl").read_text() == metrics
        md = (root / "report.md").read_text()
        assert "## Stale runs" in md and f"- `{run.name}`: changed stale_plugin" in md and f"{run.name} †" in md

        assert cli.main(args + ["stale=rerun"]) == 0             # moved aside and trained again
        (old,) = root.glob(f"{run.name}.stale-*")
        assert (old / "done.json").exists() and (old / "metrics.jsonl").read_text() == metrics
        assert (run / "done.json").exists() and not (run / "stale.json").exists()
        import benchmarks.config.grid as grid_mod
        cfg = grid_mod.expand(str(grid), [f"cache_dir={smoke_cache}"], check_files=False).runs[0].cfg
        assert json.loads((run / "fingerprint.json").read_text())["hash"] == fingerprint(cfg)["hash"]
        assert "## Stale runs" not in (root / "report.md").read_text()
        assert cli.main(args) == 0                               # no longer stale
    finally:
        sys.modules.pop("stale_plugin", None)
