"""Grids from anywhere: grid=path/to/grid.yaml, the grid schema (docs/grids.md) checked with file:line,
two files with one stem never share a results folder silently, and the report reads the grid copy kept
in the results folder (no SEMPRIOR_CONFIG_PATH needed)."""
import json
import re
from pathlib import Path

import pytest
import yaml

from benchmarks.reporting import report
from benchmarks.config.grid import (GRID_COPY, GRID_SOURCE, Grid, check_grid_folder, grid_source, grid_source_name, key_lines, load_grid, record_grid_file)
from core.config import ConfigError

GOOD = "description: d\nprofile: smoke\naxes:\n  method: [sit, sfd]\n  seed: [0]\nbaseline: sit\n"


def _file(tmp_path, text, name="my_grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_by_path_or_by_name(tmp_path):
    path = _file(tmp_path, GOOD)
    assert grid_source(str(path)) == ("my_grid", path.resolve())
    assert grid_source("smoke")[0] == "smoke" and grid_source("smoke")[1].name == "smoke.yaml"
    assert grid_source_name(str(path)) == "my_grid" and grid_source_name("smoke") == "smoke"
    name, src, data = load_grid(str(path))
    assert (name, src, data["baseline"]) == ("my_grid", path.resolve(), "sit")
    with pytest.raises(ConfigError, match=r"^grid file .*nope.yaml not found \(.*\); give an existing .yaml file or "
                                          r"a grid name \(.*smoke"):
        grid_source(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"^grid=.*/grid.txt: a grid file must end in .yaml or .yml"):
        grid_source(str(_file(tmp_path, GOOD, "grid.txt")))
    with pytest.raises(ConfigError, match=r"^unknown grid 'smok'; valid: .*smoke.* \(or a path to a grid file"):
        grid_source("smok")


@pytest.mark.parametrize("text, key, line, needle", [
    (GOOD + "baselin: sit\n", "baselin", 7, "unknown grid key; valid: allow_mixed_eval, axes, baseline, by_profile"),
    ("profile: smoke\naxes:\n  method: sit\n", "axes.method", 3, "every axis needs a non-empty list of values .*, got 'sit'"),
    ("axes:\n  method: []\n", "axes.method", 2, "every axis needs a non-empty list of values \\(an empty one gives the grid no runs\\), got \\[\\]"),
    ("axes: [method, sit]\n", "axes", 1, "must be a mapping of key: \\[values\\]"),
    (GOOD.replace("baseline: sit", "baseline: redi"), "baseline", 6, "'redi' is not a value of the method axis "
                                                                    "\\(sfd, sit\\)"),
    (GOOD + "sweep: train.lr\n", "sweep", 7, "'train.lr' is not an axis key \\(axes: method, seed\\)"),
    (GOOD + "overrides: train.steps=5\n", "overrides", 7, "must be a list of \"key=value\" strings"),
    ("profile: huge\naxes: {method: [sit]}\n", "profile", 1, "unknown profile 'huge'; valid: imagenet256, smoke, tiny"),
    ("profile: 3\naxes: {method: [sit]}\n", "profile", 1, "must be a profile name, got 3"),
    (GOOD + "allow_mixed_eval: yes please\n", "allow_mixed_eval", 7, "must be true or false, got 'yes please'"),
    (GOOD + "by_profile:\n  tiny:\n    axes: {seed: [0, 1]}\n    overides: [a=1]\n", "by_profile.tiny.overides", 10,
     "unknown key; valid: axes, overrides"),
    (GOOD + "by_profile:\n  tiny: [seed]\n", "by_profile.tiny", 8, "must be a mapping with axes and/or overrides"),
])
def test_schema_errors_name_file_line_and_key(tmp_path, text, key, line, needle):
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_grid(str(path))
    assert re.match(rf"^{re.escape(str(path.resolve()))}:{line}: {re.escape(key)}:? {needle}", str(e.value)), str(e.value)


def test_every_shipped_grid_passes_the_schema():
    from benchmarks.config.grid import available

    for name in available("grid"):
        load_grid(name)


def test_key_lines_of_nested_keys(tmp_path):
    lines = key_lines(_file(tmp_path, GOOD + "by_profile:\n  tiny: {axes: {seed: [1]}}\n"))
    assert lines["axes"] == 3 and lines["axes.method"] == 4 and lines["by_profile.tiny.axes.seed"] == 8


def test_two_grid_files_with_one_stem_do_not_share_a_results_folder(tmp_path):
    a = _file(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path, GOOD, "exp.yaml")
    b = _file(tmp_path / "b" if (tmp_path / "b").mkdir() is None else tmp_path, GOOD + "# other\n", "exp.yaml")
    results = tmp_path / "results"
    ga, gb = Grid("exp", "smoke", [], source=a.resolve()), Grid("exp", "smoke", [], source=b.resolve())
    check_grid_folder(ga, results)                         # nothing recorded yet
    record_grid_file(ga, results)
    assert (results / "exp" / GRID_COPY).read_text() == GOOD
    assert json.loads((results / "exp" / GRID_SOURCE).read_text())["path"] == str(a.resolve())
    with pytest.raises(ConfigError, match=r"holds the runs of grid file .*a/exp.yaml, and .*b/exp.yaml is another file "
                                          r"with the same name 'exp' and other content: give this grid its own results "
                                          r"folder \(results=OTHER_DIR\) or rename the file"):
        check_grid_folder(gb, results)
    a.write_text(GOOD + "# edited in place\n")             # the same file, edited: fine, and the copy follows
    check_grid_folder(ga, results)
    record_grid_file(ga, results)
    assert (results / "exp" / GRID_COPY).read_text().endswith("# edited in place\n")
    b.write_text(a.read_text())                            # another file with the same content: fine
    check_grid_folder(gb, results)


def test_report_reads_the_grid_copy_without_the_config_path(tmp_path, monkeypatch):
    """A grid that lived in a plugin's config folder: the report finds its description and baseline in the
    copy benchmarks.run left in the results folder, with SEMPRIOR_CONFIG_PATH unset."""
    monkeypatch.delenv("SEMPRIOR_CONFIG_PATH", raising=False)
    root = tmp_path / "results" / "plugin_grid"
    for run_id, method, fds in (("a", "sit", [9.0, 5.0]), ("b", "sfd", [9.0, 3.0])):
        d = root / run_id
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"profile": "smoke", "seed": 0, "method": {"name": method},
                                                       "backbone": {"name": "x"}, "train": {"steps": 6}}))
        (d / "label.json").write_text(json.dumps({"method": method, "seed": 0}))
        (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "fd": f, "nfe": 3}) + "\n"
                                              for s, f in zip((0, 6), fds)))
        (d / "done.json").write_text("{}")
    out = report.write_report("plugin_grid", tmp_path / "results")
    assert "× faster" not in out.read_text()               # no grid description anywhere: no baseline
    (root / GRID_COPY).write_text("description: from the copy\naxes: {method: [sit, sfd]}\nbaseline: sit\n")
    md = report.write_report(str(Path("somewhere") / "plugin_grid.yaml"), tmp_path / "results").read_text()
    assert "from the copy" in md and "× faster convergence (vs `sit`)" in md


def test_a_grid_without_axes_has_no_runs(tmp_path):
    from benchmarks.config.grid import expand

    path = _file(tmp_path, "description: nothing to run\nprofile: smoke\n")
    with pytest.raises(ConfigError, match=r"^grid 'my_grid' has no runs: it needs axes: with at least one key: "
                                          r"\[values\] \(.*my_grid.yaml; docs/grids.md\)$"):
        expand(str(path), check_files=False)
