"""fedforge: fast, faithful personalized, heterogeneous and generator-assisted federated learning research."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import RunConfig, build_config  # noqa: E402
from .errors import ConfigError, DataError, FedforgeError, PartitionError  # noqa: E402

if TYPE_CHECKING:
    from .core.simulation import RunResult


def run(cfg: RunConfig | None = None, **options: Any) -> RunResult:
    """Run one experiment; see :func:`fedforge.core.simulation.run`."""
    from . import algorithms  # noqa: F401  (registers every algorithm)
    from .core.simulation import run as _run

    return _run(cfg, **options)


__all__ = ["ConfigError", "DataError", "FedforgeError", "PartitionError", "RunConfig", "__version__", "build_config", "run"]
