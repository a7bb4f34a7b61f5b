"""Stage 2, data and preparation: datasets, the artifacts `prepare` trains or loads, their encodings and the
latent caches (in memory or sharded), built once under cache/.

Layer order (docs/architecture.md, "Layers"): data <- build <- config <- evaluation <- execution <- reporting
<- the command modules in benchmarks/."""
