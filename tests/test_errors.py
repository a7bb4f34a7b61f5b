"""One error path for every command (benchmarks/config/cli.py): a bad argument, file or folder is one
`error: <message>` line and exit status 2, with the traceback only under --debug / SEMPRIOR_DEBUG=1; a bug
keeps its traceback. Also: a report that survives an unreadable run folder, folders checked for writing
before anything is written, and official files loaded safely (core/torchfile.py)."""
import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from benchmarks import adm_eval
from benchmarks.config import cli
from benchmarks import evaluate
from benchmarks import extract
from benchmarks import report
from benchmarks import speed
from benchmarks import run as run_cmd
from core.config import structured, to_dict
from core.errors import CorruptFileError
from core.rundir import RunDir
from core.torchfile import UntrustedFileError, load_weights_file

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys, pattern: str) -> str:
    import re

    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), (pattern, err)
    return err


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _prepare_twice():
    spec = importlib.util.spec_from_file_location("prepare_twice", ROOT / "scripts" / "prepare_twice.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------- every command, bad arguments

BAD_ARGUMENTS = [
    ("run", lambda: run_cmd.main, ["grid=smoke", "train.steps"], "not key=value"),
    ("report", lambda: report.main, ["grid=smoke", "--all"], "unknown flag '--all'; valid: --debug, --help; see .*--help"),
    ("report", lambda: report.main, ["results=x"], "missing grid=NAME; see python -m benchmarks.report --help"),
    ("evaluate", lambda: evaluate.main, ["checkpoint=a.pt", "kind=sfd-xl-1", "ref=r.npz", "seed=one"],
     "seed=one: 'one' is not an integer"),
    ("evaluate", lambda: evaluate.main, ["checkpoint=a.pt", "ref=r.npz", "sed=1"], r"unknown key 'sed'; valid: checkpoint, .*sampler\.KEY"),
    ("extract", lambda: extract.main, ["grid=smoke", "rank"], "argument 'rank' is not key=value"),
    ("extract", lambda: extract.main, ["world=2"], "give grid=NAME or config=FILE, exactly one"),
    ("speed", lambda: speed.main, ["batch=big"], "batch=big: 'big' is not an integer ≥ 1"),
    ("speed", lambda: speed.main, ["methods"], "not key=value"),
    ("speed", lambda: speed.main, ["precision=fp8"], "'fp8' is not one of auto, fp32, bf16"),
    ("speed", lambda: speed.main, ["methods=sit,sdf"], "unknown method 'sdf'; valid: .*sfd"),
    ("speed", lambda: speed.main, ["small=4,2"], "four positive integers"),
    ("speed", lambda: speed.main, ["tune=fast"], "'fast' is not one of cd, autotune"),
    ("adm_eval", lambda: adm_eval.main, ["samples=s.npz", "ref=r.npz", "batch_size=0"], "batch_size=0"),
    ("adm_eval", lambda: adm_eval.main, ["samples=s.npz"], r"missing ref=PATH; see python -m benchmarks.adm_eval --help"),
    ("prepare_twice", lambda: _prepare_twice().main, ["grid=smoke", "keep=yes"], "keep=yes: 'yes' is not one of 0, 1"),
    ("prepare_twice", lambda: _prepare_twice().main, ["grid=smok"], "unknown grid 'smok'"),
]


@pytest.mark.parametrize("name,main,argv,pattern", BAD_ARGUMENTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_ARGUMENTS)])
def test_bad_argument_is_one_line(name, main, argv, pattern, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                   # a command that wrongly wrote something would write here
    assert main()(argv) == 2
    _one_error_line(capsys, pattern)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- every command, bad files

def test_bad_files_are_one_line(tmp_path, capsys):
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(os.urandom(2000))
    exists = tmp_path / "exists.bin"
    exists.write_bytes(b"x")
    assert evaluate.main([f"checkpoint={garbage}", "kind=sfd-xl-1", f"ref={exists}", f"inception={exists}",
                          "device=cpu", f"out={tmp_path / 'fid'}"]) == 2
    _one_error_line(capsys, "model.pt: damaged PyTorch file.*re-download it")
    assert not (tmp_path / "fid").exists()

    cfg = tmp_path / "config.yaml"
    cfg.write_text("data:\n  stream: true\n   name: x\n")
    assert extract.main([f"config={cfg}"]) == 2
    _one_error_line(capsys, r"config.yaml: not valid YAML \(line 3")

    (tmp_path / "file").write_text("")
    assert speed.main(["backbones=lightningdit-tiny", "methods=sit", f"out={tmp_path / 'file' / 'speed'}"]) == 2
    _one_error_line(capsys, "file/speed: a part of the path is a file")

    assert adm_eval.main([f"samples={exists}", f"ref={exists}", f"inception={garbage}"]) == 2
    _one_error_line(capsys, "model.pt is not torch-fidelity's Inception-v3")

    grid = tmp_path / "results" / "g"
    grid.mkdir(parents=True)
    (grid / "grid_runs.json").write_text("[\"a\", ")
    assert report.main(["grid=g", f"results={tmp_path / 'results'}"]) == 2
    _one_error_line(capsys, r"grid_runs.json: not valid JSON.*delete it")


@pytest.mark.slow                                 # two fresh interpreters that import torch: ≈ 30 s
def test_real_entry_point_prints_one_line_and_debug_the_traceback(tmp_path):
    """python -m benchmarks.speed with a bad argument: one line, exit 2; with --debug the traceback too."""
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    cmd = [sys.executable, "-m", "benchmarks.speed", "steps=-1", f"out={tmp_path}"]
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.strip() == "error: steps=-1: '-1' is not an integer ≥ 1"
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "core.config.ConfigError" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_debug_environment_variable_and_unknown_exceptions(monkeypatch, capsys):
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert report.main(["grid=smoke", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: argument 'bogus' is not key=value")
    monkeypatch.delenv(cli.DEBUG_ENV)

    @cli.command
    def buggy(argv):
        return {}["missing"]                      # a bug, not a bad input: the traceback stays

    with pytest.raises(KeyError):
        buggy([])
    seen = []
    assert cli.command(lambda argv: seen.append(argv) or 0)(["a=1", "--debug", "b=2"]) == 0
    assert seen == [["a=1", "b=2"]]               # --debug is removed before the command parses


def test_file_system_failures_are_known_and_named():
    import errno

    for code, words in ((errno.EROFS, "read-only file system"), (errno.ENOSPC, "no space left"),
                        (errno.EACCES, "permission denied")):
        e = OSError(code, os.strerror(code), "/data/out.json")
        assert cli.is_known(e) and cli.message(e) == f"/data/out.json: {cli.FS_ERRNOS[code]}"
        assert words in cli.message(e)
    assert not cli.is_known(OSError(errno.EBADF, "bad file descriptor"))     # a bug, not the user's folder
    assert not cli.is_known(ValueError("x")) and cli.is_known(ValueError("x"), extra=(ValueError,))


# ---------------------------------------------------------------------------- writable folders, results=

@pytest.fixture
def immutable_dir(tmp_path):
    """A folder this process cannot write: mode 555 for a normal user; as root (which ignores modes)
    chattr +i, skipped where the file system refuses it."""
    d = tmp_path / "frozen"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    yield d
    subprocess.run(["chattr", "-i", str(d)], check=True)


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.delenv("SEMPRIOR_CONFIG_PATH", raising=False)


def test_results_and_cache_under_a_file_are_refused_up_front(tmp_path, capsys, cpu_only):
    (tmp_path / "plain").write_text("a file")
    before = _snapshot(tmp_path)
    assert run_cmd.main(["grid=smoke", f"results={tmp_path / 'plain' / 'results'}"]) == 2
    _one_error_line(capsys, r"results folder .*plain/results cannot be created: .*plain is a file; set results=DIR")
    assert run_cmd.main(["grid=smoke", f"results={tmp_path / 'results'}", f"cache_dir={tmp_path / 'plain' / 'c'}"]) == 2
    _one_error_line(capsys, r"cache_dir folder .*plain/c cannot be created.*set cache_dir=DIR")
    assert _snapshot(tmp_path) == before and not (tmp_path / "results").exists()


def test_read_only_results_and_cache_are_refused_up_front(tmp_path, immutable_dir, capsys, cpu_only):
    assert run_cmd.main(["grid=smoke", f"results={immutable_dir}"]) == 2
    _one_error_line(capsys, r"results folder .*frozen is not writable \(.*frozen: (Operation not permitted|Permission denied)\)")
    assert run_cmd.main(["grid=smoke", f"results={tmp_path / 'results'}",
                         f"cache_dir={immutable_dir / 'cache'}"]) == 2
    _one_error_line(capsys, r"cache_dir folder .*frozen/cache is not writable.*set cache_dir=DIR")
    assert list(immutable_dir.iterdir()) == [] and not (tmp_path / "results").exists()


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_results_is_refused(value, tmp_path, monkeypatch, capsys, cpu_only):
    monkeypatch.chdir(tmp_path)
    assert run_cmd.main(["grid=smoke", f"results={value}"]) == 2
    _one_error_line(capsys, "results= is empty; give the results folder")
    assert report.main(["grid=smoke", f"results={value}"]) == 2
    _one_error_line(capsys, "results= is empty")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- a report that survives a bad run

def _finished_run(root: Path, run_id: str, seed: int, fds: tuple[float, float] = (9.0, 4.0)) -> Path:
    """A finished run folder as benchmarks.run leaves it: config.yaml, label.json, eval.jsonl,
    metrics.jsonl, done.json (the numbers are made up; the report only reads them)."""
    cfg = to_dict(structured({"profile": "smoke", "seed": seed, "method": {"name": "sit"},
                              "backbone": {"name": "lightningdit-tiny"}, "train": {"steps": 6}}))
    rd = RunDir(root / run_id)
    rd.path.mkdir(parents=True)
    rd.write_config(cfg)
    (rd.path / "label.json").write_text(json.dumps({"method": "sit", "backbone": "lightningdit-tiny", "seed": seed}))
    for step, fd in zip((0, 6), fds):
        rd.append("eval.jsonl", {"step": step, "fd": fd, "kid": 0.1, "precision": 0.5, "recall": 0.5,
                                 "class_acc": 0.3})
    rd.append("metrics.jsonl", {"step": 6, "loss": 0.7, "sec_per_step": 0.1})
    rd.mark_done({"step": 6})
    return rd.path


DAMAGE = [
    ("config.yaml", "seed: [0\nmethod: {name: sit}\n", r"config.yaml: not valid YAML \(line 2"),
    ("config.yaml", "seed: 0\n", "config.yaml: no key 'method.name'"),
    ("label.json", "{\"method\": ", "label.json: not valid JSON"),
    ("done.json", "\x00\x00", "done.json: not valid JSON"),
    ("eval.jsonl", "{\"step\": 0, \"fd\": 9.0}\n{\"step\": 3, \"fd\"\n{\"step\": 6, \"fd\": 4.0}\n",
     "eval.jsonl: .*line 2 of 3 is not a JSON object"),
]


@pytest.mark.parametrize("name,text,reason", DAMAGE, ids=[f"{d[0]}-{i}" for i, d in enumerate(DAMAGE)])
def test_report_lists_an_unreadable_run_and_reports_the_others(name, text, reason, tmp_path, capsys):
    import re

    root = tmp_path / "results" / "errgrid"
    _finished_run(root, "sit-s0", 0)
    bad = _finished_run(root, "sit-s1", 1)
    (bad / name).write_text(text)
    assert report.main(["grid=errgrid", f"results={tmp_path / 'results'}"]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"unreadable run sit-s1: {reason}", err), err
    md = (root / "report.md").read_text()
    assert "## Unreadable runs" in md and re.search(rf"- `sit-s1`: {reason}", md)
    assert "2 runs (1 done, 0 failed, 1 unreadable)" in md
    assert re.search(r"\| sit-s0 .*\| done ", md) and not re.search(r"\| sit-s1 .*\| done ", md)
    assert list(report.unreadable_runs(root)) == ["sit-s1"]
    curves = (root / "curves.csv").read_text()
    assert "sit-s0" in curves and "sit-s1" not in curves


def test_no_readable_run_is_one_line(tmp_path, capsys):
    root = tmp_path / "results" / "errgrid"
    (_finished_run(root, "sit-s0", 0) / "config.yaml").write_text(": : :\n")
    assert report.main(["grid=errgrid", f"results={tmp_path / 'results'}"]) == 2
    _one_error_line(capsys, "no readable run under .*errgrid: sit-s0: config.yaml: not valid YAML")


def test_run_exits_nonzero_when_a_finished_run_is_unreadable(tmp_path, monkeypatch, capsys, cpu_only):
    """benchmarks.run on a grid whose runs are all finished, one with a garbled config.yaml: nothing is
    trained, the report is written, the run is named, exit status 1."""
    from benchmarks.config.grid import expand

    configs = tmp_path / "configs" / "grid"
    configs.mkdir(parents=True)
    (configs / "two_seeds.yaml").write_text("profile: smoke\naxes:\n  method: [sit]\n  backbone: [lightningdit-tiny]\n"
                                            "  seed: [0, 1]\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(tmp_path / "configs"))
    monkeypatch.setattr(run_cmd, "prepare_stage", lambda grid, results: None)   # caches: not what is tested
    cache, results = tmp_path / "cache", tmp_path / "results"
    grid = expand("two_seeds", [f"cache_dir={cache}"])
    for r in grid.runs:
        _finished_run(results / "two_seeds", r.run_id, r.cfg["seed"])
        RunDir(results / "two_seeds" / r.run_id).write_config(r.cfg)
    bad = results / "two_seeds" / grid.runs[1].run_id
    (bad / "config.yaml").write_text("train: {steps: 6\n")
    assert run_cmd.main(["grid=two_seeds", f"results={results}", f"cache_dir={cache}", "launcher=inline"]) == 1
    out = capsys.readouterr().out
    assert f"{bad.name} (unreadable: config.yaml: not valid YAML" in out
    assert f"`{bad.name}`: config.yaml" in (results / "two_seeds" / "report.md").read_text()
    assert (bad / "config.yaml").read_text() == "train: {steps: 6\n"          # left for the user to fix


# ---------------------------------------------------------------------------- safe loading of official files

def test_an_omegaconf_config_loads_without_trust_pickle(tmp_path):
    """What LightningDiT/SFD's train.py saves: weights plus the OmegaConf.load config it trained with."""
    from omegaconf import OmegaConf

    from benchmarks.evaluation.importers import read_checkpoint

    (tmp_path / "config.yaml").write_text(
        "model:\n  model_type: LightningDiT-XL/1\n  use_qknorm: true\n"
        "train:\n  max_steps: 4000000\n  lr: 2.0e-4\n  betas: [0.9, 0.95]\n  resume: null\n"
        "data:\n  root: /data\n  ref: ${data.root}/ref.npz\n")
    path = tmp_path / "sfd_xl.pt"
    torch.save({"ema": {"w": torch.arange(3.0)}, "config": OmegaConf.load(tmp_path / "config.yaml")}, path)
    obj = load_weights_file(path)
    assert torch.equal(obj["ema"]["w"], torch.arange(3.0))
    cfg = obj["config"]
    assert cfg.model.model_type == "LightningDiT-XL/1" and list(cfg.train.betas) == [0.9, 0.95]
    assert cfg.data.ref == "/data/ref.npz" and cfg.train.resume is None
    state, info = read_checkpoint(path)           # the importer's reader takes the same file
    assert list(state) == ["w"] and info["weights"] == "ema"


@dataclass
class TypedCfg:
    steps: int = 1
    lr: float = 1e-4
    name: str = "sfd"


def test_typed_omegaconf_nodes_load_and_a_config_class_is_refused_by_name(tmp_path):
    """Typed value nodes (IntegerNode, FloatNode, StringNode, BooleanNode) are allowed; a structured
    config's own dataclass is code from the file's writer and stays refused, by name."""
    from omegaconf import BooleanNode, FloatNode, IntegerNode, OmegaConf, StringNode

    typed = OmegaConf.create({"steps": IntegerNode(3), "lr": FloatNode(0.1), "name": StringNode("a"),
                              "qk": BooleanNode(True), "betas": [0.9, 0.95]})
    torch.save({"cfg": typed}, tmp_path / "typed.pt")
    obj = load_weights_file(tmp_path / "typed.pt")
    assert obj["cfg"].steps == 3 and obj["cfg"].qk is True and obj["cfg"].name == "a"
    torch.save({"cfg": OmegaConf.structured(TypedCfg)}, tmp_path / "structured.pt")
    with pytest.raises(UntrustedFileError, match=r"holds a pickled .*TypedCfg, .*trust_pickle=True"):
        load_weights_file(tmp_path / "structured.pt")


def _damaged(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(100.0)}, good)
    data = good.read_bytes()
    files = {"garbage": os.urandom(4096), "text": b"<html>404 Not Found</html>\n", "empty": b"",
             "truncated": data[: len(data) // 2], "truncated-head": data[:64]}
    # a flipped byte inside the pickle of a zip archive: the archive's CRC says so
    import zipfile

    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len            # the member's bytes (local header's sizes)
    files["crc"] = data[:start + 5] + bytes([data[start + 5] ^ 0xFF]) + data[start + 6:]
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.arange(4.0)}, legacy, _use_new_zipfile_serialization=False)
    files["legacy-truncated"] = legacy.read_bytes()[:40]
    out = {}
    for name, blob in files.items():
        (tmp_path / f"{name}.pt").write_bytes(blob)
        out[name] = tmp_path / f"{name}.pt"
    return out


def test_damaged_files_say_corrupt_not_trust_pickle(tmp_path):
    for name, path in _damaged(tmp_path).items():
        for trust in (False, True):
            with pytest.raises(CorruptFileError) as e:
                load_weights_file(path, trust_pickle=trust)
            msg = str(e.value)
            assert str(path) in msg and "re-download it" in msg and "trust_pickle" not in msg, (name, msg)
    for name, path in _damaged(tmp_path).items():
        with pytest.raises(CorruptFileError, match="CRC mismatch" if name == "crc" else "damaged"):
            load_weights_file(path)
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CorruptFileError, match="w.safetensors: not a readable safetensors file.*re-download"):
        load_weights_file(bad)


class _Malicious:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = _Malicious()
    evil.marker = str(marker)
    torch.save({"ema": {"w": torch.zeros(1)}, "args": evil}, tmp_path / "evil.pt")
    with pytest.raises(UntrustedFileError, match=r"evil.pt: holds a pickled (posix|os)\.system.*trust_pickle=True"):
        load_weights_file(tmp_path / "evil.pt")
    assert not marker.exists()
