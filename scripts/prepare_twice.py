"""Are the prepared artifacts a function of their configuration? Build a grid's artifacts and latent caches
twice from empty caches, in two processes at the same time, and compare every safetensors file byte for byte.

    python scripts/prepare_twice.py [grid=sfd_vs_redi] [keep=1]

Prints one line per file and exits 1 if any differs (docs/results.md). ≈ 8½ min for sfd_vs_redi on 2 cores.
"""
from __future__ import annotations

import filecmp
import multiprocessing as mp
import shutil
import sys
import tempfile
from pathlib import Path


def _prepare(grid: str, cache_dir: str) -> None:
    from benchmarks.grid import expand
    from benchmarks.prepare import prepare_grid

    prepare_grid([r.cfg for r in expand(grid, [f"cache_dir={cache_dir}"]).runs])


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    root = Path(tempfile.mkdtemp(prefix="prepare_twice-"))
    dirs = [str(root / "a"), str(root / "b")]
    procs = [mp.get_context("spawn").Process(target=_prepare, args=(args.get("grid", "sfd_vs_redi"), d)) for d in dirs]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        print("a prepare failed", file=sys.stderr)
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
    return 1 if differ or missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
