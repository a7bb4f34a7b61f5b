"""Evaluation: FD-<net> scoring of the small profiles, the ADM protocol (FID-50K), paper-scale evaluation of
imported official checkpoints, the evaluation protocol's identity, the phase figure.

Layer order (docs/architecture.md, "Layers"): data <- build <- config <- evaluation <- execution <- reporting
<- the command modules in benchmarks/."""
