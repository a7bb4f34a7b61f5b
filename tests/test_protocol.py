"""Each run records its evaluation protocol (benchmarks/evaluation/protocol.py) and the report refuses to put runs of
different protocols in one comparison table unless allow_mixed_eval=true, then marks every row.

Run folders are written by hand (config.yaml, label.json, eval.jsonl, done.json, protocol.json): the
report reads only files, so no training is needed; the protocol of a built method is read from the
objects built by methods.compose."""
import json

import pytest
import yaml

from benchmarks.reporting import report
from benchmarks import report as report_cmd
from benchmarks.config.grid import load_yaml
from benchmarks.evaluation.protocol import (PROTOCOL_FILE, ProtocolChanged, eval_protocol, protocol_id, protocol_tag, record_protocol)


def _protocol(steps: int, nfe: int, solver: str = "euler") -> dict:
    return {"sampler": {"name": "ode", "solver": solver, "steps": steps, "shift": 0.0, "atol": 1e-6, "rtol": 1e-3},
            "nfe": nfe, "guidance": None, "num_samples": 100,
            "fd_network": {"metric": "fd-net", "reference": "fdref-abc"}, "image_size": 32}


def _run(root, run_id: str, method: str, fds: list[float], protocol: dict | None, nfe: int, seed: int = 0):
    d = root / run_id
    d.mkdir(parents=True)
    cfg = {"profile": "smoke", "seed": seed, "method": {"name": method}, "backbone": {"name": "lightningdit-tiny"},
           "train": {"steps": 6}, "eval": {"metric": "fd-net", "num_samples": 100}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "label.json").write_text(json.dumps({"method": method, "seed": seed}))
    steps = [0, 3, 6][: len(fds)]
    (d / "eval.jsonl").write_text("".join(json.dumps({"step": s, "fd": f, "class_acc": 0.5, "nfe": nfe}) + "\n"
                                          for s, f in zip(steps, fds)))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 6, "loss": 1.0}) + "\n")
    (d / "done.json").write_text(json.dumps({"step": 6}))
    if protocol is not None:
        (d / PROTOCOL_FILE).write_text(json.dumps(protocol))
    return d


def _grid(tmp_path, nfe_b: int, baseline: str = "sit"):
    root = tmp_path / "results" / "g"
    _run(root, "sit-a", "sit", [9.0, 6.0, 5.0], _protocol(4, 3), 3)
    _run(root, "plug-b", "plug", [9.0, 4.0, 3.0], _protocol(4 if nfe_b == 3 else 50, nfe_b), nfe_b)
    (root / "grid.yaml").write_text(f"description: two methods\naxes: {{method: [sit, plug]}}\nbaseline: {baseline}\n")
    return root


# ------------------------------------------------------------------------------------ the recorded protocol
def test_protocol_reads_the_built_sampler_not_the_yaml():
    """The method's YAML asks for sde-250 with CFG; the eval settings replace the sampler (ode euler 4) and
    turn guidance off: the protocol says what was built."""
    from core.types import Groups
    from methods.compose import build_method

    mcfg = load_yaml("method", "sit")["method"]
    groups = Groups(("texture",), (4,))
    m = build_method(mcfg, groups=groups, hidden_size=8, null_label=10,
                     sampler_overrides={"name": "ode", "solver": "euler", "steps": 4}, guidance=None)
    p = eval_protocol({"eval": {"num_samples": 100, "metric": "fd-net"}, "data": {"image_size": 32}}, m, None, 3)
    assert p["sampler"]["name"] == "ode" and p["sampler"]["solver"] == "euler" and p["sampler"]["steps"] == 4
    assert p["guidance"] is None and p["nfe"] == 3 and p["num_samples"] == 100 and p["image_size"] == 32
    guided = build_method(mcfg, groups=groups, hidden_size=8, null_label=10)     # the paper setting
    g = eval_protocol({"eval": {"num_samples": 100, "metric": "fd-net"}, "data": {"image_size": 32}}, guided, None, 500)
    assert g["sampler"] == {**g["sampler"], "name": "sde", "steps": 250}
    assert g["guidance"]["name"] == "cfg" and g["guidance"]["scale"] == 1.5 and "null_label" not in g["guidance"]
    assert protocol_id(p) != protocol_id(g)
    tag = protocol_tag(p)                      # every constructor argument of the sampler, then the rest
    assert tag.startswith("ode(solver=euler, steps=4, shift=0.0") and ") · unguided · N=100 · fd-net None · 32 px" in tag
    assert "unread" not in p                   # the suite's samplers keep every setting as an attribute


def test_resumed_run_checks_its_protocol(tmp_path):
    record_protocol(tmp_path, _protocol(4, 3))
    record_protocol(tmp_path, _protocol(4, 3))                       # the same: fine
    record_protocol(tmp_path, _protocol(4, 5))                       # the NFE alone is measured, not a setting
    with pytest.raises(ProtocolChanged, match=r"^the evaluation protocol changed since this run's first evaluation "
                                              r"\(sampler.steps: 4 -> 50\): its curve would mix protocols\. Rerun "
                                              r"the grid with stale=rerun"):
        record_protocol(tmp_path, _protocol(50, 49))
    assert json.loads((tmp_path / PROTOCOL_FILE).read_text())["nfe"] == 3   # the first one stays
    (tmp_path / "x").mkdir()                 # a sampler that did not show a setting: its NFE stands in for it
    record_protocol(tmp_path / "x", {**_protocol(4, 3), "unread": ["sampler.n_steps"]})
    with pytest.raises(ProtocolChanged, match=r"\(nfe: 3 -> 49\)"):
        record_protocol(tmp_path / "x", {**_protocol(4, 49), "unread": ["sampler.n_steps"]})


def test_unread_settings_put_the_nfe_in_the_identity():
    class Hidden:                            # keeps its setting under another name
        def __init__(self, n_steps: int = 50) -> None:
            self.n = n_steps

    from benchmarks.evaluation.protocol import component_args

    assert component_args(Hidden(8)) == ({}, ["n_steps"])
    assert protocol_id(_protocol(4, 3)) == protocol_id(_protocol(4, 7))
    assert protocol_id({**_protocol(4, 3), "unread": ["x"]}) != protocol_id({**_protocol(4, 7), "unread": ["x"]})


# ------------------------------------------------------------------------------------ the report
def test_runs_with_different_eval_nfe_are_not_put_in_one_table(tmp_path, capsys):
    root = _grid(tmp_path, nfe_b=99)
    out = report.write_report("g", tmp_path / "results")
    md = out.read_text()
    assert "## Mixed evaluation protocols: no comparison tables" in md
    assert "## Final metrics" not in md and "× faster" not in md.split("## Mixed")[0] and "## Convergence" not in md
    assert "**P1**: ode(solver=euler, steps=4, shift=0.0) · unguided · N=100 · fd-net fdref-abc · 32 px — runs " \
           "(measured NFE per sample): `sit-a` (3)" in md
    assert "**P2**: ode(solver=euler, steps=50, shift=0.0) · unguided" in md and "`plug-b` (99)" in md
    assert "allow_mixed_eval=true" in md and not (root / "convergence.png").exists()
    msg = report.refused_mix(root)
    assert msg.startswith("grid 'g': the runs were evaluated with 2 different protocols") and "plug-b" in msg
    assert report_cmd.main(["grid=g", f"results={tmp_path / 'results'}"]) == 1
    err = capsys.readouterr().err
    assert "error: grid 'g': the runs were evaluated with 2 different protocols" in err and "sit-a" in err


def test_allow_mixed_eval_puts_them_in_one_table_marked(tmp_path, monkeypatch):
    root = _grid(tmp_path, nfe_b=99)
    charted = []
    monkeypatch.setattr(report.plots, "faster", lambda per_seed, *a, **k: charted.append(per_seed))
    assert report_cmd.main(["grid=g", f"results={tmp_path / 'results'}", "allow_mixed_eval=true"]) == 0
    md = (root / "report.md").read_text()
    assert "## Evaluation protocols (mixed, allowed by allow_mixed_eval: rows are marked)" in md
    final = md.split("## Final metrics")[1].split("##")[0]
    rows = [line for line in final.splitlines() if line.startswith("| sit") or line.startswith("| plug")]
    assert len(rows) == 2 and "sit [P1]" in rows[0] + rows[1] and "plug [P2]" in rows[0] + rows[1]
    assert "Protocols (P1, ...)" in final
    faster = md.split("## × faster convergence")[1].split("##")[0]
    assert "P1" in faster and "P2" in faster
    assert sorted(charted[0]["group"]) == ["plug [P2]", "sit [P1]"]    # the × faster chart: groups marked too
    curves = (root / "curves.csv").read_text()
    assert "sit [P1]" in curves and "plug [P2]" in curves
    assert report.refused_mix(root) is None


def test_one_protocol_one_table_with_protocol_and_nfe(tmp_path):
    root = _grid(tmp_path, nfe_b=3)
    report.write_report("g", tmp_path / "results")
    md = (root / "report.md").read_text()
    assert "## Evaluation protocol\n" in md and "**P1**" in md and "**P2**" not in md
    final = md.split("## Final metrics")[1].split("##")[0]
    assert "| protocol |" in final.replace("  ", " ") or " protocol " in final.splitlines()[2]
    assert " NFE " in final.splitlines()[2] and "[P1]" not in final
    assert "× faster convergence (vs `sit`)" in md and report.refused_mix(root) is None


def test_same_settings_other_nfe_share_a_table(tmp_path):
    """SFD's phase cuts add grid points: the same sampler settings cost more NFE. One protocol, one table,
    and the NFE column shows each group's measured NFE."""
    root = tmp_path / "results" / "g"
    _run(root, "sit-a", "sit", [9.0, 5.0], _protocol(4, 3), 3)
    _run(root, "sfd-b", "sfd", [9.0, 4.0], _protocol(4, 5), 5)
    report.write_report("g", tmp_path / "results")
    md = (root / "report.md").read_text()
    assert report.refused_mix(root) is None and "**P2**" not in md and "`sfd-b` (5), `sit-a` (3)" in md
    final = md.split("## Final metrics")[1].split("##")[0]
    header, _, *rows = [line for line in final.splitlines() if line.startswith("|")]
    nfe = [c.strip() for c in header.split("|")].index("NFE")
    assert sorted(r.split("|")[nfe].strip() for r in rows) == ["3", "5"]


def test_a_grid_file_may_allow_mixed_protocols(tmp_path):
    """DiT's DDPM sampler next to flow samplers: different by design, said once in the grid file."""
    root = _grid(tmp_path, nfe_b=99)
    (root / "grid.yaml").write_text("axes: {method: [sit, plug]}\nbaseline: sit\nallow_mixed_eval: true\n")
    md = report.write_report("g", tmp_path / "results").read_text()
    assert report.refused_mix(root) is None and "sit [P1]" in md and "plug [P2]" in md


def test_runs_without_a_protocol_file_are_compared_by_nfe(tmp_path):
    """Run folders made before protocols were recorded: their NFE decides (equal NFE: one table)."""
    root = tmp_path / "results" / "g"
    _run(root, "a", "sit", [9.0, 5.0], None, 3)
    _run(root, "b", "plug", [9.0, 4.0], None, 7)
    report.write_report("g", tmp_path / "results")
    assert "unrecorded (run evaluated before protocols were recorded) · NFE 7" in (root / "report.md").read_text()
    assert report.refused_mix(root) is not None


def test_benchmarks_run_passes_allow_mixed_eval_to_the_report():
    """`report.allow_mixed_eval=true` on benchmarks.run is the command's own key (not a config override) and
    reaches the write_report call at the end of run.main."""
    import inspect

    from benchmarks import run

    meta, dotlist, _ = run.parse(["grid=smoke", "report.allow_mixed_eval=true", "train.steps=3"])
    assert meta["report.allow_mixed_eval"] == "true" and dotlist == ["train.steps=3"]
    assert 'write_report(grid.name, results, allow_mixed_eval=meta.get("report.allow_mixed_eval") == "true")' \
        in inspect.getsource(run.main)
