"""Storage: the LMDB partition log of a node and the coordinator's metadata store. Knows nothing of sockets."""

from .log_store import LogStore
from .meta_store import MetaStore
from .partition_log import PartitionLog

__all__ = ["LogStore", "MetaStore", "PartitionLog"]
