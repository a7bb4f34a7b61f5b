"""`python -m benchmarks.report grid=NAME [results=DIR] [allow_mixed_eval=true|false]` (`--help`: SPEC below):
write a grid's report at any time. The command only: the report is benchmarks/reporting/report.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.config.cli import Key, Spec, config_names, command, parse as parse_args
from benchmarks.reporting.report import refused_mix, unreadable_runs, write_report
from core.config import ConfigError


SPEC = Spec(
    prog="python -m benchmarks.report",
    purpose="Collect a grid's runs (finished, running or failed) into results/<grid>/report.md with its tables, "
            "curves.csv, runs.csv and figures; safe at any time, also while the grid runs. Exit status 1 when "
            "a run folder could not be read (the report of the others is written) or when runs evaluated with "
            "different protocols were kept out of one comparison (see allow_mixed_eval).",
    keys=(Key("grid", "the grid: its name, i.e. the folder <results>/<grid>/ (a grid YAML file's stem)",
              required=True, metavar="NAME", complete=config_names("grid")),
          Key("results", "the results folder that holds <grid>/", type="path", default="results"),
          Key("allow_mixed_eval", "put runs evaluated with different protocols (sampler settings, guidance, "
              "samples, scoring network) into one comparison table, each row marked with its protocol", type="choice",
              choices=("true", "false"), default="false")),
    names=(("grids", config_names("grid")),),
    examples=("python -m benchmarks.report grid=sfd_vs_redi",
              "python -m benchmarks.report grid=smoke results=/scratch/results"),
)


def parse(argv: list[str]) -> dict[str, str]:
    """The given keys of SPEC (benchmarks.config.cli.parse), with an empty grid= or results= refused."""
    args = parse_args(SPEC, argv).values
    if not args["grid"].strip():
        raise ConfigError(f"grid= is empty; give the grid's name, e.g. grid=smoke; {SPEC.hint()}")
    if not args.get("results", "results").strip():
        raise ConfigError("results= is empty; give the results folder, e.g. results=results")
    return args


@command(spec=SPEC)
def main(argv: list[str]) -> int:
    """Exit status 1 when a run folder could not be read (the report of the others is written)."""
    args = parse(argv)
    out = write_report(args["grid"], Path(args.get("results", "results")),
                       allow_mixed_eval=args.get("allow_mixed_eval", "false") == "true")
    print(f"wrote {out}")
    bad = unreadable_runs(out.parent)
    for run_id, why in bad.items():
        print(f"unreadable run {run_id}: {why}", file=sys.stderr)
    mix = refused_mix(out.parent)
    if mix:
        print(f"error: {mix}", file=sys.stderr)
    return 1 if bad or mix else 0


if __name__ == "__main__":
    sys.exit(main())
