"""Are the prepared artifacts a function of their configuration? Build a grid's artifacts and latent caches
twice from empty caches, in two processes at the same time, and compare every safetensors file byte for byte.

    python scripts/prepare_twice.py [grid=sfd_vs_redi] [keep=1]

Prints one line per file and exits 1 if any differs (docs/results.md). ≈ 8½ min for sfd_vs_redi on 2 cores.
A bad argument or grid, or a prepare that fails for a known reason (data, files, disk), is one `error:` line
and exit status 2 (benchmarks/config/cli.py).
"""
from __future__ import annotations

import filecmp
import multiprocessing as mp
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.config.cli import Key, Spec, config_names, command, is_known, message, parse as parse_args


SPEC = Spec(
    prog="python scripts/prepare_twice.py",
    purpose="Build a grid's prepared artifacts and latent caches twice from empty caches, in two processes at the "
            "same time, and compare every safetensors file byte for byte. Exit status 1 if any differs "
            "(docs/results.md).",
    keys=(Key("grid", "the grid whose caches are built (a name below)", default="sfd_vs_redi", metavar="NAME",
              complete=config_names("grid")),
          Key("keep", "1: keep the two builds' cache folders (their path is printed) instead of deleting them",
              type="choice", choices=("0", "1"), default="0")),
    names=(("grids", config_names("grid")),),
    examples=("python scripts/prepare_twice.py", "python scripts/prepare_twice.py grid=smoke keep=1"),
)
KEYS = tuple(SPEC.key_names)


def _prepare(grid: str, cache_dir: str) -> None:
    from benchmarks.config.grid import expand
    from benchmarks.data.prepare_grid import prepare_grid

    try:
        prepare_grid([r.cfg for r in expand(grid, [f"cache_dir={cache_dir}"]).runs])
    except Exception as e:  # noqa: BLE001 - a known failure is one line; a bug keeps its traceback
        if not is_known(e):
            raise
        print(f"error: {message(e)}", file=sys.stderr)
        sys.exit(2)


def parse(argv: list[str]) -> dict[str, str]:
    """grid=NAME keep=0|1 (benchmarks.config.cli.parse with SPEC); the grid is expanded here once, so a bad one fails
    before any process starts."""
    from benchmarks.config.grid import expand

    args = parse_args(SPEC, argv).values
    expand(args.get("grid", "sfd_vs_redi"), [])
    return args


@command(spec=SPEC)
def main(argv: list[str]) -> int:
    args = parse(argv)
    root = Path(tempfile.mkdtemp(prefix="prepare_twice-"))
    dirs = [str(root / "a"), str(root / "b")]
    procs = [mp.get_context("spawn").Process(target=_prepare, args=(args.get("grid", "sfd_vs_redi"), d)) for d in dirs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("error: a prepare failed (its message is above)", file=sys.stderr)
        return 2
    a, b = (Path(d) for d in dirs)
    files = sorted(f.relative_to(a) for f in a.rglob("*.safetensors"))
    missing = sorted(set(f.relative_to(b) for f in b.rglob("*.safetensors")) ^ set(files))
    differ = [f for f in files if (b / f).exists() and not filecmp.cmp(a / f, b / f, shallow=False)]
    for f in files:
        print(("DIFFERS " if f in differ else "same    ") + str(f))
    print(f"{len(files) - len(differ)} of {len(files)} files identical; differ: {len(differ)}; "
          f"in one build only: {len(missing)}")
    if args.get("keep") != "1":
        shutil.rmtree(root)
    else:
        print(f"kept both builds: {a} and {b}")
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main())
