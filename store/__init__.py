"""Storage: a node's partition logs (one contract: LMDB and in memory) and the coordinator's metadata store.
Knows nothing of sockets."""

from .log_store import LogStore
from .memory_log import MemoryLogStore
from .meta_store import MetaStore
from .partition_log import PartitionLog

__all__ = ["LogStore", "MemoryLogStore", "MetaStore", "PartitionLog"]
