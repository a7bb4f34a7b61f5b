"""Import every component package (registration happens on import) and external entry-point plugins."""
from __future__ import annotations

import backbones  # noqa: F401 - importing a package registers its built-in entries
import encoders  # noqa: F401
import methods  # noqa: F401
from core.plugins import load_plugins


def load_all() -> None:
    """The built-ins are registered by the imports above; this adds the external entry-point plugins."""
    load_plugins()
