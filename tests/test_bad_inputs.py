"""The catalogue of bad inputs (docs/bad_inputs.md): each gives a one-line error that names the problem
and the fix, exits with status 2, and leaves everything already on disk untouched."""
import hashlib
from pathlib import Path

import pytest

from benchmarks import run as cli


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(name, argv, pattern, results, capsys):
    """The command exits 2 with one `error:` line matching `pattern` and leaves `results` as it was."""
    import re

    before = _snapshot(results)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (name, err)
    assert err.startswith("error: ") and "\n" not in err, err
    assert re.search(pattern, err), (pattern, err)
    assert _snapshot(results) == before


@pytest.fixture
def results(tmp_path):
    """A results folder holding an earlier run's files, which no bad command may touch."""
    run = tmp_path / "results" / "smoke" / "sit-old-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "eval.jsonl").write_text('{"step": 0, "fd": 1.0}\n')
    (run / "checkpoints" / "step_0000010.pt").write_bytes(b"weights")
    return tmp_path / "results"


CASES = [
    ("unknown grid", ["grid=sfd_vs_rdi"], "unknown grid 'sfd_vs_rdi'; valid: .*sfd_vs_redi"),
    ("unknown backbone", ["grid=smoke", "backbone.name=dit-huge"], "unknown backbone 'dit-huge'; valid: .*dit-tiny"),
    ("unknown top-level key", ["grid=smoke", "trian.steps=5"], "'trian'.*valid keys: .*train"),
    ("unknown nested key", ["grid=smoke", "train.stepz=5"], "stepz.*steps"),
    ("wrong type", ["grid=smoke", "train.steps=many"], "train.steps"),
    ("zero steps", ["grid=smoke", "train.steps=0"], "train.steps must be ≥ 1"),
    ("negative steps", ["grid=smoke", "train.steps=-5"], "train.steps must be ≥ 1"),
    ("zero batch", ["grid=smoke", "train.batch_size=0"], "train.batch_size must be ≥ 1"),
    ("negative lr", ["grid=smoke", "train.lr=-0.1"], "train.lr must be > 0"),
    ("EMA decay 1", ["grid=smoke", "train.ema_decay=1.0"], r"ema_decay must be in \[0, 1\)"),
    ("bad precision", ["grid=smoke", "train.precision=fp8"], "precision must be one of auto, fp32, bf16, bf16-residual"),
    ("bad sdpa kernel", ["grid=smoke", "train.sdpa=flash3"], "train.sdpa must be one of auto, flash, cudnn"),
    ("bad compile mode", ["grid=smoke", "train.compile=fast"], "train.compile must be one of auto, regions, blocks, full, off"),
    ("CUDA graph on the CPU", ["grid=smoke", "train.cuda_graph=true", "train.device=cpu"],
     "train.cuda_graph=true needs a CUDA device"),
    ("CUDA needed, none here", ["grid=smoke", "train.cuda_graph=true"], "needs CUDA.*this machine has none"),
    ("Δt ≥ 1", ["grid=sfd_delta_t", "profile=smoke", "method.schedule.delta_t.texture=1.0"],
     r"delta_t\['texture'\] must be in \[0, 1\)"),
    ("negative Δt", ["grid=sfd_delta_t", "profile=smoke", "method.schedule.delta_t.texture=-0.1"],
     r"must be in \[0, 1\)"),
    ("Δt on a missing group", ["grid=sfd_delta_t", "profile=smoke", "method.schedule.delta_t.colour=0.1"],
     "colour.*texture"),
    ("unknown solver", ["grid=smoke", "eval.sampler.solver=rk45"], "unknown ode solver 'rk45'; valid: euler, heun, dopri5"),
    ("unknown guidance", ["grid=smoke", "eval.guidance.name=cgf", "eval.guidance.scale=2"], "unknown guidance 'cgf'"),
    ("REPA past the last block", ["grid=sfd_vs_redi", "profile=smoke", "method.loss.repa.depth=9"],
     "block.*9.*has 4 blocks"),
    ("unknown time distribution", ["grid=smoke", "method.schedule.time_dist=gaussian"], "time_dist.*uniform"),
    ("misspelled component key", ["grid=smoke", "method.loss.cosine=1.0"], "unknown key 'cosine'; valid keys: .*cosine_weight"),
    ("unknown dataset", ["grid=smoke", "data.name=cifar100"], "unknown dataset 'cifar100'; valid: "),
    ("missing dataset", ["grid=smoke", "data.root=/nonexistent/fmnist"], "not found in .*nonexistent.*data.root="),
    ("unknown launcher", ["grid=smoke", "launcher=k8s"], "unknown launcher 'k8s'; valid: inline, local, slurm"),
    ("unknown slurm profile", ["grid=smoke", "launcher=slurm", "slurm=mycluster"],
     "unknown slurm profile 'mycluster'; valid: .*local-ci"),
    ("unknown artifact kind", ["grid=smoke", "prepare.dino.steps=3"], "prepare.dino: unknown artifact kind; valid: "),
    ("misspelled fit() key", ["grid=smoke", "prepare.texture-vae.stepz=3"], "prepare.texture-vae: unknown key 'stepz'"),
    ("missing weights file", ["grid=smoke", "method.latent.aux_tokens=true", "prepare.semantic-encoder.use=dinov2",
                              "prepare.semantic-encoder.weights=/nope/dinov2_vitb14_reg.pth"],
     "weights file /nope/dinov2_vitb14_reg.pth does not exist.*docs/paper_scale.md"),
    ("unreadable slot class", ["grid=smoke", "prepare.texture-vae.use=sd-vae-xl"], "prepare.texture-vae.use: unknown"),
    ("not key=value", ["grid=smoke", "train.steps"], "not key=value"),
    ("unknown flag", ["grid=smoke", "--dryrun"], "unknown flag '--dryrun'"),
    ("too few eval samples", ["grid=smoke", "eval.num_samples=3"], "num_samples must be ≥ 10"),
    ("limit 0", ["grid=smoke", "data.limit_train=0"], "limit_train must be ≥ 1"),
    # Validation up front: each refused by the dry run too (it plans without reading data files)
    ("infinite lr", ["grid=smoke", "train.lr=inf", "--dry-run"], r"train.lr=inf: must be a finite number"),
    ("NaN guidance scale", ["grid=smoke", "eval.guidance.name=cfg", "eval.guidance.scale=nan", "--dry-run"],
     r"eval.guidance.scale=nan: must be a finite number"),
    ("betas outside [0, 1)", ["grid=smoke", "train.betas=[2,3]", "--dry-run"],
     r"train.betas must be two numbers in \[0, 1\).*\[2, 3\]"),
    ("negative weight decay", ["grid=smoke", "train.weight_decay=-1", "--dry-run"], "train.weight_decay must be ≥ 0, got -1"),
    ("zero grad clip", ["grid=smoke", "train.grad_clip=0", "--dry-run"], "train.grad_clip must be > 0 or null"),
    ("micro-batches not dividing the batch", ["grid=smoke", "train.micro_batches=3", "train.batch_size=64", "--dry-run"],
     "train.micro_batches=3 must divide train.batch_size=64"),
    ("zero eval sampler steps", ["grid=smoke", "eval.sampler.steps=0", "--dry-run"],
     "eval.sampler.steps must be an integer ≥ 2.*got 0"),
    ("negative eval sampler steps", ["grid=smoke", "eval.sampler.steps=-3", "--dry-run"],
     "eval.sampler.steps must be an integer ≥ 2.*got -3"),
    ("zero paper sampler steps", ["grid=smoke", "method.sampler.steps=0", "--dry-run"],
     "method.sampler.steps must be an integer ≥ 2.*got 0"),
    ("negative seed", ["grid=smoke", "seed=-1", "--dry-run"], r"seed must be in \[0, 2147483646\], got -1"),
    ("negative eval.at", ["grid=smoke", "eval.at=[0,-3]", "--dry-run"],
     r"eval.at holds \[-3\]: evaluation steps must be integers ≥ 0"),
    ("image size off the tokenizer grid", ["grid=smoke", "data.image_size=30", "--dry-run"],
     "data.image_size=30 must be a multiple of 4, the downsampling factor of the texture tokenizer prepare.texture-vae"),
    ("image size off the patch grid", ["grid=smoke", "data.image_size=36", "--dry-run"],
     "data.image_size=36 gives a 9×9 latent grid.*patch size 2.*multiple of 8"),
    ("image size too large", ["grid=smoke", "data.image_size=100000", "--dry-run"],
     "data.image_size=100000: at most 128 for fashion-mnist"),
    ("image size not 28 + even", ["grid=smoke", "data.image_size=29", "--dry-run"], "28 \\+ an even number"),
    ("limit_train below a batch", ["grid=smoke", "data.limit_train=1", "--dry-run"],
     "data.limit_train=1 is fewer than prepare.texture-vae needs.*batch_size=16"),
    ("limit_test below eval.num_samples", ["grid=smoke", "data.limit_test=50", "--dry-run"],
     "data.limit_test=50 is fewer than eval.num_samples=100"),
    ("limit past the dataset", ["grid=smoke", "data.limit_test=20000"],
     "data.limit_test=20000 is more than the 10000 test images of 'fashion-mnist'"),
]


@pytest.mark.parametrize("name,argv,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, argv, pattern, results, capsys, monkeypatch):
    monkeypatch.delenv("SEMPRIOR_CONFIG_PATH", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)    # the catalogue is about a CPU machine
    _refused(name, argv + [f"results={results}"], pattern, results, capsys)


def _section(doc: str, title: str) -> str:
    """The text of one `## title` section of docs/bad_inputs.md."""
    body = doc.split(f"\n## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def test_catalogue_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md").read_text()
    first = _section(doc, "Configuration and command line")
    missing = [name for name, _, _ in CASES if f"| {name} |" not in first]
    assert not missing and len(CASES) >= 20
    # The validation cases (the CASES added for it, the file and data cases): a row each in their section
    upfront = _section(doc, "Validation up front (numbers, ranges, grids and presets, data files)")
    names = [c[0] for c in CASES[[c[0] for c in CASES].index("infinite lr"):]] + \
        [c[0] for c in FILE_CASES] + [c[0] for c in DATA_CASES]
    missing = [name for name in names if f"| {name} |" not in upfront]
    assert not missing, missing


# ---------------------------------------------------------------------------------------------------
# Validation up front: user grids, presets and profiles on SEMPRIOR_CONFIG_PATH, damaged data files
# ---------------------------------------------------------------------------------------------------

GOOD_PRESET = "method:\n  name: sit\n  latent: {name: vae}\n  schedule: {name: flow}\n  loss: {name: flow}\n" \
              "  sampler: {name: sde, steps: 250}\n"
# (case, {relative path: content}, argv, pattern); a grid named `user` runs the user's preset `mine`
FILE_CASES = [
    ("grid YAML syntax error", {"grid/user.yaml": "profile: smoke\naxes:\n  method: [sit\n"}, ["grid=user"],
     r"grid/user\.yaml:4: expected ',' or '\]'"),
    ("binary grid file", {"grid/user.yaml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, ["grid=user"],
     r"grid/user\.yaml: not a text file \(binary content\)"),
    ("non-UTF-8 grid file", {"grid/user.yaml": b"description: caf\xe9\naxes: {method: [sit]}\n"}, ["grid=user"],
     r"grid/user\.yaml: not UTF-8 text \(byte 16\)"),
    ("grid top level not a mapping", {"grid/user.yaml": "- sit\n- sfd\n"}, ["grid=user"],
     r"grid/user\.yaml: expected a mapping .* got a list"),
    ("axes not a mapping", {"grid/user.yaml": "profile: smoke\naxes: [sit, sfd]\n"}, ["grid=user"],
     r"axes must be a mapping of key: \[values\]"),
    ("axis value not a list", {"grid/user.yaml": "profile: smoke\naxes: {method: sit}\n"}, ["grid=user"],
     "every axis needs a non-empty list"),
    ("overrides as a string", {"grid/user.yaml": "profile: smoke\naxes: {method: [sit]}\noverrides: train.steps=3\n"},
     ["grid=user"], r"overrides must be a list of \"key=value\" strings.*'train.steps=3'"),
    ("override not key=value", {"grid/user.yaml": "profile: smoke\naxes: {method: [sit]}\noverrides: [train.steps]\n"},
     ["grid=user"], r"overrides must be a list of \"key=value\" strings"),
    ("duplicate key in a grid", {"grid/user.yaml": "profile: smoke\naxes: {method: [sit]}\naxes: {seed: [0]}\n"},
     ["grid=user"], r"grid/user\.yaml:3: duplicate key 'axes' \(first at line 2\)"),
    ("duplicate key in a nested mapping", {"grid/user.yaml": "profile: smoke\naxes:\n  method: [sit]\n  method: [sfd]\n"},
     ["grid=user"], r"grid/user\.yaml:4: duplicate key 'method' \(first at line 3\)"),
    ("preset without method:", {"method/mine.yaml": "profiles: {}\n"}, ["grid=user"],
     r"method preset 'mine' .*needs `method:` as a mapping"),
    ("preset method: not a mapping", {"method/mine.yaml": "method: sit\n"}, ["grid=user"],
     r"method preset 'mine' .*needs `method:` as a mapping.*got 'sit'"),
    ("preset profile values not a list", {"method/mine.yaml": GOOD_PRESET + "profiles: {smoke: train.lr=1}\n"},
     ["grid=user"], r"profiles.smoke must be a list of \"key=value\" strings"),
    ("duplicate key in a preset", {"method/mine.yaml": GOOD_PRESET + "  loss: {name: flow}\n"}, ["grid=user"],
     r"method/mine\.yaml:7: duplicate key 'loss' \(first at line 5\)"),
    ("duplicate key in a profile", {"profile/mine.yaml": "train: {steps: 4}\ntrain: {steps: 5}\n"},
     ["grid=smoke", "profile=mine"], r"profile/mine\.yaml:2: duplicate key 'train'"),
    ("duplicate key in a slurm profile", {"slurm/mine.yaml": "partition: a\npartition: b\n"},
     ["grid=smoke", "launcher=slurm", "slurm=mine", "--dry-run"], r"slurm/mine\.yaml:2: duplicate key 'partition'"),
]


@pytest.mark.parametrize("name,files,argv,pattern", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(name, files, argv, pattern, results, tmp_path, capsys, monkeypatch):
    """Grids, presets and profiles the user adds (SEMPRIOR_CONFIG_PATH; slurm profiles from the launcher's
    folder, pointed at a temporary one): one line with the file, the line where YAML gives one, the fix."""
    from benchmarks.execution import launch

    user = tmp_path / "configs"
    files = {"grid/user.yaml": "profile: smoke\naxes: {method: [mine]}\n", "method/mine.yaml": GOOD_PRESET, **files}
    for rel, content in files.items():
        (user / rel).parent.mkdir(parents=True, exist_ok=True)
        (user / rel).write_bytes(content if isinstance(content, bytes) else content.encode())
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(user))
    monkeypatch.setattr(launch, "SLURM_DIR", user / "slurm")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _refused(name, argv + [f"results={results}"], pattern, results, capsys)


def test_user_grid_and_preset_are_accepted(tmp_path, monkeypatch):
    """The same user files without the fault expand (so each case above fails for its fault alone), and a
    YAML merge key may still override what it merges (not a duplicate)."""
    from benchmarks.config.grid import expand

    user = tmp_path / "configs"
    (user / "grid").mkdir(parents=True)
    (user / "method").mkdir()
    (user / "grid" / "user.yaml").write_text("profile: smoke\naxes: {method: [mine]}\n")
    (user / "method" / "mine.yaml").write_text(GOOD_PRESET + "profiles:\n  smoke: [train.lr=0.002]\n")
    monkeypatch.setenv("SEMPRIOR_CONFIG_PATH", str(user))
    (run,) = expand("user", check_files=False).runs
    assert run.cfg["method"]["name"] == "sit" and run.cfg["train"]["lr"] == 0.002
    from core.config import load_config_yaml

    (tmp_path / "merge.yaml").write_text("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")
    assert load_config_yaml(tmp_path / "merge.yaml") == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_label_agrees_with_the_run_id():
    """An axis value replaced on the command line (seed=3 on a grid whose seed axis is [0]) is what the label
    records, as the run id does."""
    from benchmarks.config.grid import expand

    (run,) = expand("smoke", ["seed=3", "backbone.name=dit-tiny"], check_files=False).runs
    assert run.label == {"method": "sit", "backbone": "dit-tiny", "seed": 3}
    assert "-dit-tiny-s3-" in run.run_id


FASHION = Path("/usr/share/datasets/fashion-mnist")


def _gz(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw, compresslevel=1, mtime=0)


def _relabel(raw: bytes) -> bytes:
    """Test labels with one label 12 (10 classes)."""
    return raw[:8] + bytes([12]) + raw[9:]


def _drop_last_label(raw: bytes) -> bytes:
    """Test labels with the header and the data one label short: a valid IDX file, 9,999 labels for 10,000 images."""
    return raw[:4] + (int.from_bytes(raw[4:8], "big") - 1).to_bytes(4, "big") + raw[8:-1]


def _reshape_images(raw: bytes) -> bytes:
    """Test images declared as 5,000 images of 56×28: the same bytes, a valid IDX file, the wrong image size."""
    return raw[:4] + (5000).to_bytes(4, "big") + (56).to_bytes(4, "big") + raw[12:]


# (case, damaged file, new content from the good file's bytes, pattern)
DATA_CASES = [
    ("truncated gzip data file", "train-labels-idx1-ubyte.gz", lambda b: b[: len(b) // 2],
     r"train-labels-idx1-ubyte\.gz: gzip stream unreadable.*reinstall.*dataset-fashion-mnist.*data.root"),
    ("garbled gzip data file", "t10k-images-idx3-ubyte.gz", lambda b: b[:10] + bytes(range(256)) * 8,
     r"t10k-images-idx3-ubyte\.gz: gzip stream unreadable.*reinstall"),
    ("not gzip but named .gz", "t10k-labels-idx1-ubyte.gz", lambda b: b"garbage" * 100,
     r"t10k-labels-idx1-ubyte\.gz: named \.gz but not gzip data"),
    ("IDX size not matching its header", "t10k-labels-idx1-ubyte.gz", lambda b: _gz(_idx_bytes(b)[:-5]),
     r"t10k-labels-idx1-ubyte\.gz: header says \[10000\] \(10000 bytes\) but the file holds 9995"),
    ("label out of range", "t10k-labels-idx1-ubyte.gz", lambda b: _gz(_relabel(_idx_bytes(b))),
     r"t10k-labels-idx1-ubyte\.gz: 1 labels outside \[0, 10\) \(max 12\).*reinstall"),
    ("image and label counts differ", "t10k-labels-idx1-ubyte.gz", lambda b: _gz(_drop_last_label(_idx_bytes(b))),
     r"t10k-labels-idx1-ubyte\.gz: 9999 labels for the 10000 images of t10k-images-idx3-ubyte\.gz"),
    ("images of the wrong size", "t10k-images-idx3-ubyte.gz", lambda b: _gz(_reshape_images(_idx_bytes(b))),
     r"t10k-images-idx3-ubyte\.gz: images of shape \[5000, 56, 28\], expected \[N, 28, 28\]"),
]


def _idx_bytes(gz: bytes) -> bytes:
    import gzip

    return gzip.decompress(gz)


@pytest.mark.skipif(not FASHION.is_dir(), reason="needs dataset-fashion-mnist")
@pytest.mark.parametrize("name,damaged,damage,pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_damaged_data_file(name, damaged, damage, pattern, results, tmp_path, capsys, monkeypatch):
    """A data.root holding the four Fashion-MNIST files, one of them damaged: one line naming that file, what
    is wrong and the fix (core.errors.CorruptFileError), before anything is written."""
    root = tmp_path / "fmnist"
    root.mkdir()
    for src in FASHION.glob("*.gz"):
        dst = root / src.name
        if src.name == damaged:
            dst.write_bytes(damage(src.read_bytes()))
        else:
            dst.symlink_to(src)
    monkeypatch.delenv("SEMPRIOR_CONFIG_PATH", raising=False)
    _refused(name, ["grid=smoke", f"data.root={root}", f"results={results}"], pattern, results, capsys)


def test_unreadable_image_in_a_folder_dataset(results, tmp_path, capsys, monkeypatch):
    """An image-folder dataset with one file that is not an image (a truncated download): one line naming it."""
    from PIL import Image

    root = tmp_path / "folder"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (60 * i, 20, 200)).save(root / cls / f"{i}.png")
    (root / "b" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    monkeypatch.delenv("SEMPRIOR_CONFIG_PATH", raising=False)
    before = _snapshot(results)
    code = cli.main(["grid=smoke", "data.name=image-folder", f"data.root={root}", f"results={results}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert f"{root / 'b' / 'bad.png'}: not a readable image" in err and "replace or delete it" in err, err
    assert _snapshot(results) == before


def test_profile_as_an_override_chooses_the_profile_or_is_refused():
    """profile=NAME among a grid's overrides used to set only the run's `profile` label: runs labelled `smoke`
    trained with the tiny settings, without a word. In expand's list it now chooses the profile; in a grid's
    overrides it is refused; two different profiles are refused."""
    from benchmarks.config.grid import expand, resolve
    from core.config import ConfigError

    assert expand("sfd_vs_redi", ["profile=smoke"]).runs[0].cfg["data"]["limit_train"] == 2000
    with pytest.raises(ConfigError, match="two profiles asked for: smoke, tiny"):
        expand("sfd_vs_redi", ["profile=smoke"], profile="tiny")
    with pytest.raises(ConfigError, match="would only relabel the run"):
        resolve("tiny", {"method": "sit"}, ["profile=smoke"])
