"""`python -m benchmarks.evaluate checkpoint=FILE kind=KIND ref=VIRTUAL_imagenet256_labeled.npz
[inception=FILE] [tokenizer=FILE|DIR|HUB_ID] [stats=latents_stats.pt] [num_samples=50000] [batch_size=125]
[seed=0] [guidance=method|none|cfg:S|autoguidance:S] [guide=FILE] [sampler.KEY=VALUE ...]
[method.KEY=VALUE ...] [out=DIR] [device=cuda] [fd=scipy|eigh] [num_classes=N]` (`--help`: SPEC below):
FID-50K of an official checkpoint with its method's paper sampler (ADM protocol;
benchmarks/evaluation/paper.py, docs/paper_scale.md). Run it under torchrun to shard the sampling.

The command only: the scoring of the small profiles is benchmarks/evaluation/scoring.py.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from benchmarks.config.cli import Key, Spec, command, parse as parse_args
from benchmarks.evaluation.importers import KINDS
from benchmarks.evaluation.paper import evaluate_checkpoint


def _kinds() -> list[str]:
    return list(KINDS)


SPEC = Spec(
    prog="python -m benchmarks.evaluate",
    purpose="FID-50K of an official checkpoint with its method's paper sampler (the ADM protocol: FID, sFID, IS, "
            "precision/recall against guided-diffusion's reference batch; benchmarks/evaluation/paper.py, "
            "docs/paper_scale.md). Run it under torchrun to shard the sampling. Writes <out>/samples.npz and "
            "<out>/metrics.json.",
    keys=(
        Key("checkpoint", "the official checkpoint file", type="path", required=True),
        Key("kind", "which official checkpoint it is (a name below)", type="choice", choices=_kinds,
            required=True, noun="checkpoint kind"),
        Key("ref", "ADM's reference batch VIRTUAL_imagenet256_labeled.npz", type="path", required=True),
        Key("inception", "torch-fidelity's Inception-v3 weights (.pth)", type="path",
            default="torch-fidelity's download cache"),
        Key("tokenizer", "the latent decoder: a file, a folder or a hub id", metavar="FILE|DIR|HUB_ID",
            default="the kind's own"),
        Key("stats", "latents_stats.pt of the tokenizer (latent mean/std)", type="path", default="the kind's own"),
        Key("num_samples", "images to sample (balanced labels)", type="int", low=1, default="50000"),
        Key("batch_size", "images per sampling batch (per rank)", type="int", low=1, default="125"),
        Key("seed", "the sampling seed", type="int", default="0"),
        Key("guidance", "method (the preset's paper guidance), none, cfg:<scale> or autoguidance:<scale>",
            default="method", metavar="method|none|cfg:S|autoguidance:S"),
        Key("guide", "the guide checkpoint for autoguidance (SFD: the B/1 guide)", type="path"),
        Key("out", "the output folder", type="path", default="results/fid50k"),
        Key("device", "the device (cuda, cuda:1, cpu)", default="cuda when available"),
        Key("fd", "the Fréchet distance's matrix square root: scipy (ADM's sqrtm) or eigh", type="choice",
            choices=("scipy", "eigh"), default="scipy"),
        Key("num_classes", "draw labels from the first N classes only (quick checks; the protocol uses all)",
            type="int", low=1, default="all of the kind's"),
    ),
    overrides="sampler.KEY=VALUE overrides a key of the kind's paper sampler (e.g. sampler.steps=50); "
              "method.KEY=VALUE overrides a key of its method preset (OmegaConf dotlist).",
    override_prefixes=("sampler.", "method."),
    names=(("kinds", _kinds),),
    examples=("python -m benchmarks.evaluate checkpoint=sfd_xl.pt kind=sfd-xl-1 ref=VIRTUAL_imagenet256_labeled.npz",
              "torchrun --nproc_per_node=8 -m benchmarks.evaluate checkpoint=sfd_xl.pt kind=sfd-xl-1 "
              "ref=VIRTUAL_imagenet256_labeled.npz guidance=autoguidance:1.5 guide=guide_b1.pt out=results/sfd"),
)
CLI_KEYS = tuple(SPEC.key_names)


def _cli_args(argv: list[str]) -> dict[str, str]:
    """key=value arguments, checked before anything loads (benchmarks.config.cli.parse with SPEC): the keys of
    SPEC, then sampler.* and method.* in order."""
    args = parse_args(SPEC, argv)
    return {**args.values, **dict(a.split("=", 1) for a in args.overrides)}


# ValueError: the evaluator's own checks of its inputs (sample/reference shapes, guidance names) raise it
@command(known=(ValueError,), spec=SPEC)
def main(argv: list[str]) -> int:
    """The command line of the module docstring; errors are one `error:` line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _cli_args(argv)
    sampler = {k.split(".", 1)[1]: _scalar(v) for k, v in args.items() if k.startswith("sampler.")}
    overrides = [f"{k}={v}" for k, v in args.items() if k.startswith("method.")]
    result = evaluate_checkpoint(
        args["checkpoint"], args["kind"], ref=args["ref"], inception=args.get("inception"),
        tokenizer=args.get("tokenizer"), stats=args.get("stats"), out=args.get("out", "results/fid50k"),
        num_samples=int(args.get("num_samples", 50_000)), batch_size=int(args.get("batch_size", 125)),
        seed=int(args.get("seed", 0)), guidance=args.get("guidance", "method"), guide=args.get("guide"),
        sampler=sampler or None, device=args.get("device"), fd=args.get("fd", "scipy"),
        num_classes=int(args["num_classes"]) if "num_classes" in args else None, overrides=overrides)
    if result is None:              # not rank 0
        return 0
    out = Path(args.get("out", "results/fid50k")) / "metrics.json"
    out.write_text(json.dumps({**result, "checkpoint": args["checkpoint"], "kind": args["kind"],
                               "guidance": args.get("guidance", "method")}, indent=2, default=str))
    print("  ".join(f"{k}={result[k]:.4f}" for k in ("fid", "sfid", "is", "precision", "recall")), f"-> {out}")
    return 0


def _scalar(v: str) -> Any:
    return yaml.safe_load(v)


if __name__ == "__main__":
    raise SystemExit(main())
