"""Datasets, partitions and the federation (client views over pooled data)."""
from .federation import Federation
from .partition import PARTITIONERS, Partition, from_client_split, make_partition
from .sources import SOURCES, Dataset, data_root, load_dataset, read_cache, write_cache

__all__ = ["Dataset", "Federation", "Partition", "PARTITIONERS", "SOURCES", "data_root", "from_client_split",
           "load_dataset", "make_partition", "read_cache", "write_cache"]
