"""Stage 3, execution: the training job, the launchers (inline, local, SLURM), the live status, trackers,
the code fingerprint and staleness, the method contract, the speed benchmark.

Layer order (docs/architecture.md, "Layers"): data <- build <- config <- evaluation <- execution <- reporting
<- the command modules in benchmarks/."""
