"""Frozen artifacts trained or loaded in `prepare`: tokenizers, semantic encoders, SemVAE, PCA, FD net."""
