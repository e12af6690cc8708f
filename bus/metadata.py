"""The client's view of the cluster: which node leads which partition at which leader epoch, and where
each node listens.

Built from the coordinator's metadata reply; replaced whole on refresh (after NOT_LEADER, a fenced epoch,
an unknown topic, or a node that stopped answering).
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Any

from .errors import ConfigError, UnknownTopic

DEFAULT_BOOTSTRAP = "tcp://127.0.0.1:7400"


def default_bootstrap() -> str:
    return os.environ.get("BUS_BOOTSTRAP") or DEFAULT_BOOTSTRAP


_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):[0-9]{1,5}|(ipc|inproc)://\S+")


def check_bootstrap(bootstrap: object) -> str:
    """The bootstrap address, or ConfigError now (ZeroMQ would refuse it later, in a background thread)."""
    bootstrap = bootstrap or default_bootstrap()
    if not isinstance(bootstrap, str) or not _ADDRESS.fullmatch(bootstrap):
        raise ConfigError(f"bootstrap must be a ZeroMQ address like tcp://127.0.0.1:7400, not {bootstrap!r}")
    return bootstrap


def partition_for_key(key: bytes, partition_count: int) -> int:
    """Same key -> same partition in every process and across restarts (CRC32, never ``hash()``)."""
    return zlib.crc32(key) % partition_count


class ClusterMetadata:
    __slots__ = ("version", "nodes", "topics")

    def __init__(self, raw: dict[str, Any]):
        self.version: int = raw["version"]
        self.nodes: dict[int, dict[str, Any]] = {int(k): v for k, v in raw["nodes"].items()}
        self.topics: dict[str, dict[str, Any]] = raw["topics"]

    def partition_count(self, topic: str) -> int:
        meta = self.topics.get(topic)
        if meta is None:
            raise UnknownTopic(f"unknown topic {topic!r}; create it with `bus topic create {topic}`")
        return len(meta["partitions"])

    def _partition(self, topic: str, partition: int) -> dict[str, Any]:
        meta = self.topics.get(topic)
        if meta is None:
            raise UnknownTopic(f"unknown topic {topic!r}; create it with `bus topic create {topic}`")
        state: dict[str, Any] = meta["partitions"][partition]
        return state

    def leader(self, topic: str, partition: int) -> int:
        """The node id of the partition's leader (-1 while it has none)."""
        leader: int = self._partition(topic, partition)["leader"]
        return leader

    def leader_epoch(self, topic: str, partition: int) -> int:
        """The leader epoch requests to that leader carry, so a deposed or not yet informed leader is told."""
        epoch: int = self._partition(topic, partition)["leader_epoch"]
        return epoch

    def address(self, node_id: int) -> str:
        address: str = self.nodes[node_id]["address"]
        return address
