"""Stage 4, reporting: collecting runs into tables, statistics, plots, report.md, the GPU-hour estimate.

Layer order (docs/architecture.md, "Layers"): data <- build <- config <- evaluation <- execution <- reporting
<- the command modules in benchmarks/."""
