"""Frozen artifacts trained or loaded in `prepare`: tokenizers, semantic encoders, SemVAE, PCA, FD net."""
from encoders import texture_vae  # noqa: F401
from encoders import fdnet  # noqa: F401
from encoders import semantic  # noqa: F401
from encoders import supervised  # noqa: F401
from encoders import dinov2  # noqa: F401
from encoders import semvae  # noqa: F401
from encoders import pca  # noqa: F401
from encoders import vavae  # noqa: F401
from encoders import pretrained  # noqa: F401
