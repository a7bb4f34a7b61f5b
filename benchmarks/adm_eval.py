"""`python -m benchmarks.adm_eval samples=NPZ|DIR ref=VIRTUAL_imagenet256_labeled.npz [inception=FILE] [out=FILE.json]
[device=cuda] [batch_size=100] [fd=scipy|eigh]` (`--help`: SPEC below): score a sample batch with the ADM protocol.
The command only: the protocol is benchmarks/evaluation/adm.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.config.cli import Key, Spec, command, parse as parse_args
from benchmarks.evaluation.adm import evaluate
from core.rundir import atomic_write_text


SPEC = Spec(
    prog="python -m benchmarks.adm_eval",
    purpose="Score a sample batch with the ADM protocol (docs/methods.md §9): FID, sFID, IS, precision and recall "
            "against guided-diffusion's reference batch, with torch-fidelity's port of ADM's Inception graph.",
    keys=(Key("samples", "the samples: an arr_0 npz, a folder of images, or a folder of samples_rank*.npz shards",
              type="path", required=True, metavar="NPZ|DIR"),
          Key("ref", "ADM's reference batch VIRTUAL_imagenet256_labeled.npz", type="path", required=True),
          Key("inception", "torch-fidelity's Inception-v3 weights (.pth)", type="path",
              default="torch-fidelity's download cache"),
          Key("out", "write the metrics as JSON here", type="path", metavar="FILE.json", default="print only"),
          Key("device", "the device (cuda, cpu)", default="cuda when available"),
          Key("batch_size", "images per Inception batch", type="int", low=1, default="100"),
          Key("fd", "the Fréchet distance's matrix square root: scipy (ADM's sqrtm) or eigh", type="choice",
              choices=("scipy", "eigh"), default="scipy")),
    examples=("python -m benchmarks.adm_eval samples=results/fid50k/samples.npz ref=VIRTUAL_imagenet256_labeled.npz",
              "python -m benchmarks.adm_eval samples=results/fid50k/ ref=VIRTUAL_imagenet256_labeled.npz "
              "out=fid.json device=cpu fd=eigh"),
)
KEYS = tuple(SPEC.key_names)


def _cli_args(argv: list[str]) -> dict[str, str]:
    """key=value arguments, checked before anything loads (benchmarks.config.cli.parse with SPEC)."""
    return parse_args(SPEC, argv).values


# ValueError: the evaluator's checks of its inputs (image shapes, fd method, reference contents) raise it
@command(known=(ValueError,), spec=SPEC)
def main(argv: list[str]) -> int:
    args = _cli_args(argv)
    result = evaluate(args["samples"], args["ref"], args.get("inception"), device=args.get("device"),
                      batch_size=int(args.get("batch_size", 100)), fd=args.get("fd", "scipy"))
    print("  ".join(f"{k}={result[k]:.4f}" for k in ("fid", "sfid", "is", "precision", "recall")))
    if "out" in args:
        atomic_write_text(Path(args["out"]), json.dumps(result, indent=2))
        print(f"wrote {args['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
