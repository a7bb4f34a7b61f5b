"""External plugins: any installed package can register components through an entry point.

In the plugin's pyproject.toml:
    [project.entry-points."semprior_bench.plugins"]
    mymethod = "my_package.my_method"      # a module whose import registers components
Method presets (YAML) of a plugin go in a folder named by SEMPRIOR_CONFIG_PATH (see docs/adding_a_method.md).
"""
from __future__ import annotations

import logging
from importlib.metadata import entry_points

log = logging.getLogger(__name__)
GROUP = "semprior_bench.plugins"
_loaded: set[str] = set()


def load_plugins() -> list[str]:
    """Import every module advertised under the entry-point group once; returns their names."""
    names = []
    for ep in entry_points(group=GROUP):
        if ep.name in _loaded:
            continue
        ep.load()
        _loaded.add(ep.name)
        names.append(ep.name)
        log.info("loaded plugin %s (%s)", ep.name, ep.value)
    return names
