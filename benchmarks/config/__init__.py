"""Stage 1, configuration: the command-line layer, grid and profile files, expansion into resolved run configs,
their validation (which builds every component once), presets, plugins.

Layer order (docs/architecture.md, "Layers"): data <- build <- config <- evaluation <- execution <- reporting
<- the command modules in benchmarks/."""
