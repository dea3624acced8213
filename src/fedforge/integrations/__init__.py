"""Optional integrations (Ray, Flower, trackers); each imports its dependency only when used."""
from . import ray  # noqa: E402,F401  (registers the `ray` executor; Ray itself is imported only when it starts)
