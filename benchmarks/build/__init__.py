"""Assembling one run's parts from its resolved config: the latent feed, the latent builder, the method's
components, the backbone, AutoGuidance guides.

Layer order (docs/architecture.md, "Layers"): data <- build <- config <- evaluation <- execution <- reporting
<- the command modules in benchmarks/."""
