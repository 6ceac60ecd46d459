"""Discovery by scanning: import every module of a package once, so each module's decorators
(sub-commands, encoders, methods) register themselves."""

from __future__ import annotations

import importlib
import pkgutil

_IMPORTED: set[str] = set()


def import_submodules(package_name: str) -> None:
    """Import every module of ``package_name`` (sorted by name) the first time it is asked for."""
    if package_name in _IMPORTED:
        return
    package = importlib.import_module(package_name)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{package_name}.{info.name}")
    _IMPORTED.add(package_name)
