"""The one command-line layer (benchmarks/config/cli.py): every entry point answers `--help` with its purpose, keys,
accepted names and examples (exit 0), and every bad argument with one `error:` line and exit 2.

The decorated `main([...])` is called in-process (fast); two real subprocesses check the `python -m` and
script wiring."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import adm_eval
from benchmarks.config import cli
from benchmarks import evaluate
from benchmarks import extract
from benchmarks import report
from benchmarks import run
from benchmarks import speed
from benchmarks.config.grid import available
from core import cache
from core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# name -> (the module's main, the keys its help must name)
COMMANDS = {
    "run": (lambda: run.main, ["grid", "profile", "launcher", "slurm", "parallel", "results", "stale",
                               "report.allow_mixed_eval"]),
    "report": (lambda: report.main, ["grid", "results", "allow_mixed_eval"]),
    "evaluate": (lambda: evaluate.main, ["checkpoint", "kind", "ref", "inception", "tokenizer", "stats",
                                         "num_samples", "batch_size", "seed", "guidance", "guide", "out", "device",
                                         "fd", "num_classes"]),
    "extract": (lambda: extract.main, ["grid", "config", "profile", "rank", "world", "device", "workers",
                                       "batch_size", "shard_images"]),
    "speed": (lambda: speed.main, ["backbones", "methods", "batch", "precision", "compile", "sdpa", "layout",
                                   "kernels", "graph", "steps", "warmup", "threads", "small", "peak_tflops", "tune",
                                   "profile", "sample", "timing", "out", "device"]),
    "adm_eval": (lambda: adm_eval.main, ["samples", "ref", "inception", "out", "device", "batch_size", "fd"]),
    "prepare_twice": (lambda: _script("prepare_twice").main, ["grid", "keep"]),
    "adm_pr_variants": (lambda: _script("adm_pr_variants").main, ["n", "seeds", "threads"]),
    "core.cache": (lambda: cache.main, []),
}


def _spec(main) -> cli.Spec:
    """A command's spec (core.cache builds its own at call time: core does not import benchmarks)."""
    return cache.cli_spec() if main is cache.main else main.spec


def _one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), (pattern, err)
    return err


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_names_purpose_keys_flags_and_two_examples(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                   # --help runs nothing: nothing may be written here
    main, keys = COMMANDS[name][0](), COMMANDS[name][1]
    spec = _spec(main)
    for argv in (["--help"], ["-h"], ["x=1", "not-key-value", "--help"]):    # anywhere, before any other check
        assert main(argv) == 0, argv
        out, err = capsys.readouterr()
        assert err == ""
        assert out.startswith(f"usage: {spec.prog}")
        for k in keys:
            assert re.search(rf"^  {re.escape(k)}=\S*\s+\[(str|path|int|float|choice)", out, re.M), (k, out)
        assert spec.purpose.split()[0] in out and "--debug" in out and "-h, --help" in out
        examples = out.split("\nexamples:\n", 1)[1].splitlines()
        assert len(examples) >= 2 and all(e.startswith("  ") and e.strip() for e in examples)
    assert list(tmp_path.iterdir()) == []
    assert [k.name for k in spec.keys] == keys


def test_help_lists_the_accepted_names_computed_at_help_time(capsys, tmp_path, monkeypatch):
    """The grids, profiles, methods, backbones and launchers of run's help come from the config folders and
    registries when the help is printed: a grid added through SEMPRIOR_CONFIG_PATH shows up."""
    from benchmarks import api
    from benchmarks.execution.launch import LAUNCHERS
    from core.registry import BACKBONES

    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "my_new_grid.yaml").write_text("profile: smoke\naxes: {method: [sit]}\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(tmp_path))
    assert run.main(["--help"]) == 0
    out = capsys.readouterr().out
    names = dict(re.findall(r"^  (grids|profiles|methods|backbones|launchers)\s+(.*(?:\n {4,}\S.*)*)", out, re.M))
    listed = {k: [w.strip() for w in v.replace("\n", " ").split(",")] for k, v in names.items()}
    assert "my_new_grid" in listed["grids"] and listed["grids"] == available("grid")
    assert listed["profiles"] == available("profile")
    assert listed["methods"] == sorted(api.presets()) and "sfd" in listed["methods"]
    assert listed["backbones"] == BACKBONES.names() and listed["launchers"] == list(LAUNCHERS)
    assert evaluate.main(["-h"]) == 0
    assert "sfd-xl-1" in capsys.readouterr().out  # the official checkpoint kinds


# (command, argv, the one error line's pattern): not key=value, unknown flag, unknown key, bad type or choice,
# missing required key; every message ends with where the help is
BAD = [
    ("run", ["grid=smoke", "train.steps"], r"argument 'train.steps' is not key=value \(e.g. grid=\S+\); see python -m benchmarks.run --help$"),
    ("run", ["grid=smoke", "--dryrun"], r"unknown flag '--dryrun'; valid: --dry-run, --no-wait, --quiet, --debug, --help"),
    ("run", ["grid=smoke", "--dry-run=1"], r"unknown flag '--dry-run=1'"),
    ("run", ["train.steps=5"], r"missing grid=NAME\|FILE.yaml; see python -m benchmarks.run --help"),
    ("run", ["grid=smoke", "stale=maybe"], r"stale=maybe: 'maybe' is not one of error, rerun, keep$"),
    ("run", ["grid=smoke", "=5"], r"argument '=5' has no key before '='"),
    ("report", ["grid=smoke", "bogus"], r"argument 'bogus' is not key=value"),
    ("report", ["grid=smoke", "sed=1"], r"unknown key 'sed'; valid: grid, results, allow_mixed_eval; see "),
    ("report", ["grid=smoke", "allow_mixed_eval=yes"], r"allow_mixed_eval=yes: 'yes' is not one of true, false"),
    ("report", ["grid="], r"grid= is empty"),
    ("evaluate", ["checkpoint=a.pt", "kind=sfd-xl-1", "ref=r.npz", "num_samples=0"], r"num_samples=0: '0' is not an integer ≥ 1$"),
    ("evaluate", ["checkpoint=a.pt", "kind=sfd", "ref=r.npz"], r"kind=sfd: unknown checkpoint kind 'sfd'; valid: .*sfd-xl-1"),
    ("evaluate", ["checkpoint=a.pt", "kind=sfd-xl-1", "ref=r.npz", "model.depth=2"], r"unknown key 'model.depth'; valid: .*method\.KEY"),
    ("evaluate", ["checkpoint=a.pt", "ref=r.npz"], r"missing kind=NAME; see"),
    ("extract", ["grid=smoke", "config=c.yaml"], r"give grid=NAME or config=FILE, exactly one"),
    ("extract", ["grid=smoke", "rank=-1"], r"rank=-1: '-1' is not an integer ≥ 0"),
    ("extract", ["grid=smoke", "--force"], r"unknown flag '--force'; valid: --debug, --help"),
    ("speed", ["layout=bsdh"], r"layout=bsdh: 'bsdh' is not one of bhsd, bshd"),
    ("speed", ["backbones=lightningdit-tiny,dit-huge"], r"backbones=\S+: unknown backbone 'dit-huge'; valid: "),
    ("speed", ["batch=8,0"], r"batch=8,0: '0' is not an integer ≥ 1"),
    ("speed", ["train.steps=3"], r"unknown key 'train.steps'; valid: backbones, "),
    ("adm_eval", ["samples=s.npz", "ref=r.npz", "fd=exact"], r"fd=exact: 'exact' is not one of scipy, eigh"),
    ("adm_eval", ["s.npz", "ref=r.npz"], r"argument 's.npz' is not key=value \(e.g. samples="),
    ("prepare_twice", ["grid=smoke", "--keep"], r"unknown flag '--keep'"),
    ("prepare_twice", ["gird=smoke"], r"unknown key 'gird'; valid: grid, keep"),
    ("adm_pr_variants", ["5000", "2"], r"argument '5000' is not key=value \(e.g. n=5000\)"),
    ("adm_pr_variants", ["seeds=2"], r"missing n=N"),
    ("adm_pr_variants", ["n=1e3"], r"n=1e3: '1e3' is not an integer ≥ 2"),
    ("core.cache", ["full", "--all"], r"unknown flag '--all'; valid: --debug, --help"),
    ("core.cache", ["full"], r"give cache folders to check"),
]


@pytest.mark.parametrize("name,argv,pattern", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_argument_is_one_error_line_and_exit_2(name, argv, pattern, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert COMMANDS[name][0]()(argv) == 2
    _one_error_line(capsys, pattern)
    assert list(tmp_path.iterdir()) == []


def test_every_entry_point_uses_the_layer():
    """Every module with `if __name__ == "__main__"` under benchmarks/, core/, scripts/ is in COMMANDS (its main
    has a spec), except benchmarks.execution.localjob: the launcher's internal job controller (one folder argument)."""
    internal = {"benchmarks/execution/localjob.py", "benchmarks/config/cli.py"}   # cli.py: only in its docstring's example
    found = set()
    for folder in ("benchmarks", "core", "scripts"):
        for f in (ROOT / folder).glob("*.py"):
            if re.search(r'^if __name__ == "__main__":', f.read_text(), re.M):
                found.add(f.relative_to(ROOT).as_posix())
    names = {"benchmarks/run.py": "run", "benchmarks/report.py": "report", "benchmarks/evaluate.py": "evaluate",
             "benchmarks/extract.py": "extract", "benchmarks/speed.py": "speed", "benchmarks/adm_eval.py": "adm_eval",
             "scripts/prepare_twice.py": "prepare_twice", "scripts/adm_pr_variants.py": "adm_pr_variants",
             "core/cache.py": "core.cache"}
    assert found - internal == set(names), sorted(found - internal - set(names))
    for path, name in names.items():
        assert isinstance(_spec(COMMANDS[name][0]()), cli.Spec), path


def test_parse_keeps_order_values_and_passes_config_overrides_through():
    meta, dotlist, flags = run.parse(["train.steps=5", "grid=smoke", "data.root=/a=b", "launcher=inline",
                                      "train.steps=7", "--dry-run", "grid=baseline"])
    assert meta == {"grid": "baseline", "launcher": "inline"}          # a key given twice: the last wins
    assert dotlist == ["train.steps=5", "data.root=/a=b", "train.steps=7"]   # in order: OmegaConf's last wins
    assert flags == {"--dry-run"}
    args = cli.parse(evaluate.SPEC, ["checkpoint=a", "kind=sfd-xl-1", "ref=r", "sampler.steps=50", "method.x=1"])
    assert args.overrides == ["sampler.steps=50", "method.x=1"] and args.int("num_samples", 7) == 7
    assert evaluate._cli_args(["checkpoint=a", "kind=sfd-xl-1", "ref=r", "sampler.steps=50"])["sampler.steps"] == "50"
    pos = cli.parse(cache.cli_spec(), ["full", "cache/a=b", "cache/c"])
    assert pos.positional == ["full", "cache/a=b", "cache/c"] and pos.values == {}


def test_key_checks():
    k = cli.Key("batch", "", type="int", low=1, many=True)
    k.check("1,2,64")
    for bad in ("0", "1,x", "", "1.5", "-3"):
        with pytest.raises(ConfigError, match=rf"^batch={re.escape(bad)}: '.*' is not an integer ≥ 1$"):
            k.check(bad)
    cli.Key("seed", "", type="int").check("-3")
    with pytest.raises(ConfigError, match=r"^x=a: 'a' is not a number$"):
        cli.Key("x", "", type="float").check("a")
    calls = []
    named = cli.Key("m", "", type="choice", choices=lambda: calls.append(1) or ["a", "b"], noun="method")
    named.check("b")
    with pytest.raises(ConfigError, match=r"^m=c: unknown method 'c'; valid: a, b$"):
        named.check("c")
    assert len(calls) == 2                        # looked up when checked, not when declared
    cli.Key("parallel", "", type="int", low=1, check_value=False).check("abc")   # the command checks it


def test_quiet_makes_run_log_warnings_only(monkeypatch):
    """--quiet is real: benchmarks.run configures logging at WARNING instead of INFO."""
    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    monkeypatch.setattr(run, "expand", lambda *a, **k: (_ for _ in ()).throw(ConfigError("stop here")))
    assert run.main(["grid=smoke", "--quiet"]) == 2 and run.main(["grid=smoke"]) == 2
    assert levels == [logging.WARNING, logging.INFO]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_offers_keys_flags_and_grid_names(capsys):
    assert run.main(["--completion", "bash"]) == 0 and report.main(["--completion", "bash"]) == 0
    script = capsys.readouterr().out              # two commands' scripts, evaluated one after the other

    def complete(line: str, wordbreaks: str = "\"'><=;|&(:") -> list[str]:     # bash's default breaks
        words = line.split(" ")
        probe = (f'{script}\nCOMP_WORDBREAKS={shlex.quote(wordbreaks)}\nCOMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}\n'
                 f'COMP_WORDS=({" ".join(words)}); COMP_CWORD={len(words) - 1}\n'
                 "_semprior_complete\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
        res = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()

    assert complete("python -m benchmarks.run grid=sm") == ["smoke"]            # bash splits at '='
    assert complete("python -m benchmarks.run grid=sfd", wordbreaks=" ") == ["grid=sfd_delta_t", "grid=sfd_vs_redi",
                                                                                     "grid=sfd_vs_redi_builds", "grid=sfd_vs_redi_long"]
    assert complete("python -m benchmarks.run launcher=") == ["inline", "local", "slurm"]
    assert complete("python -m benchmarks.run --d") == ["--dry-run", "--debug"]
    assert "profile=" in complete("python -m benchmarks.run pro")
    assert complete("python -m other.module --d") == []                          # other commands untouched
    assert complete("python -m benchmarks.report --d") == ["--debug"]            # the report's own keys and flags
    assert complete("python -m benchmarks.report allow") == ["allow_mixed_eval="]
    assert run.main(["--completion", "zsh"]) == 2
    _one_error_line(capsys, r"--completion zsh: only bash is supported")


def test_real_entry_points(tmp_path):
    """The wiring of `python -m` and of a script: --help exits 0 on stdout, a bad argument is one line, exit 2."""
    helped = subprocess.run([sys.executable, "-m", "benchmarks.report", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert helped.returncode == 0 and helped.stderr == ""
    assert helped.stdout.startswith("usage: python -m benchmarks.report grid=NAME") and "allow_mixed_eval=" in helped.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_twice.py"), "grid=smoke", "bogus"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == ("error: argument 'bogus' is not key=value (e.g. grid=smoke); "
                          "see python scripts/prepare_twice.py --help\n")
