"""Import every component package (registration happens on import) and external entry-point plugins."""
from __future__ import annotations

from core.plugins import load_plugins


def load_all() -> None:
    import backbones  # noqa: F401
    import encoders  # noqa: F401
    import methods  # noqa: F401

    load_plugins()
