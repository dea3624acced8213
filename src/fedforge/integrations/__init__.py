"""Optional integrations (Ray, Flower, trackers); each imports its dependency only when used."""
