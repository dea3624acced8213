"""One module per algorithm (or small family), each registered by name. Every module here is imported."""
from __future__ import annotations

import importlib
import pkgutil

from ..core.algorithm import ALGORITHMS, Algorithm, register_algorithm

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["ALGORITHMS", "Algorithm", "register_algorithm"]
