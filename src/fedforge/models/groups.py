"""Model groups: which architecture each client owns (client i → architecture i mod K)."""
from __future__ import annotations

from ..errors import ConfigError, suggest
from ..registry import Registry
from .zoo import MODELS

# name → list of registered model names
GROUPS: Registry[list[str]] = Registry("model group", "see `fedforge list models`",
                                     populate=("fedforge.models.hetero", "fedforge.models.sensor", "fedforge.models.text"))


def resolve_architectures(spec: str | list[str], num_clients: int, assignment: list[int] | None = None) -> list[str]:
    """One registered model name per client.

    ``spec`` is a model name, a group name, a comma-separated list of model names, or a list of names.
    Client ``i`` gets architecture ``i mod K`` unless ``assignment`` (one index per client) is given.
    """
    if isinstance(spec, (list, tuple)):
        archs = [str(s) for s in spec]
    elif spec in GROUPS:
        archs = list(GROUPS.get(spec))
    elif isinstance(spec, str) and "," in spec:
        archs = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        archs = [str(spec)]
    for a in archs:
        if a not in MODELS:
            choices = MODELS.names() + GROUPS.names()
            raise ConfigError(f"unknown model '{a}'{suggest(a, choices)}; see `fedforge list models`.")
    if assignment is not None:
        if len(assignment) != num_clients or any(not 0 <= int(k) < len(archs) for k in assignment):
            raise ConfigError(f"the model assignment must give each of the {num_clients} clients an index in 0..{len(archs) - 1}.")
        return [archs[int(k)] for k in assignment]
    return [archs[i % len(archs)] for i in range(num_clients)]
