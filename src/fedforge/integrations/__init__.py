"""Optional integrations (Ray, Flower, trackers); each imports its dependency only when used.

Nothing registers itself as a side effect of importing this package: the registries name these modules
(``EXECUTORS`` lists ``fedforge.integrations.ray``, ``TRACKERS`` lists ``fedforge.integrations.trackers``).
"""
