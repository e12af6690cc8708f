"""The cluster's metadata as a pure state machine: nodes and their sessions, topics and their placement,
the placement version, and the producer-id counter.

This module owns every decision the coordinator makes about the cluster outside consumer groups (those
are nodes/groups.py): whether a topic may be created and where its partitions go, when a node is alive,
whether a heartbeat comes from an impostor, and which producer id is handed out next. It must never touch
sockets, clocks, threads, randomness or disk: time arrives as ``now_ms`` (monotonic), and what must be
made durable leaves as records for the shell (nodes/coordinator.py) to write BEFORE it replies.

Calling convention, as nodes/groups.py: a request method returns an ``Outcome`` (the reply, and the
records to persist in one transaction) or raises a ``BusError`` and changes nothing. Node liveness is soft
state: it is rebuilt from heartbeats and never persisted.

Persisted layout (the coordinator's MetaStore):
- ``topic:<name>``              -> {id, partitions: [owner node id, ...], retention_ms, retention_bytes}
- ``node:<id>``                 -> {address}
- ``cluster_id``                -> str, who this cluster is, for good
- ``counter:topic_id``          -> int, the last topic id handed out (ids are never reused)
- ``counter:producer_id``       -> int, the last producer id handed out
- ``counter:placement_version`` -> int, bumped by every change of the topics
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from bus.errors import InvalidRequest, NoNodesAvailable, NodeIdentityMismatch, TopicExists, UnknownTopic
from store.log_store import PARTITIONS_MAX as NODE_PARTITIONS_MAX

from .placement import node_load, place

PUT = "put"
DELETE = "delete"

NODE_SESSION_TIMEOUT_MS = 3_000
NODE_ID_MAX = (1 << 31) - 1
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
PARTITIONS_MAX = 10_000  # of one topic

KEY_TOPIC = b"topic:"
KEY_NODE = b"node:"
KEY_CLUSTER_ID = b"cluster_id"
KEY_TOPIC_ID = b"counter:topic_id"
KEY_PRODUCER_ID = b"counter:producer_id"
KEY_VERSION = b"counter:placement_version"
KEY_PREFIXES = (KEY_TOPIC, KEY_NODE, KEY_CLUSTER_ID, b"counter:")  # what ``restore`` reads


@dataclass(frozen=True)
class Outcome:
    reply: object  # msgpack-able: what the shell sends back
    records: tuple  # ("put", key, value) | ("delete", key): persist in one transaction before replying


class NodeInfo:
    """A node as the controller knows it: its address (durable) and its session (soft)."""

    __slots__ = ("node_id", "address", "instance", "last_heartbeat_ms")

    def __init__(self, node_id: int, address: str, instance: str | None = None, last_heartbeat_ms: int | None = None):
        self.node_id = node_id
        self.address = address
        self.instance = instance  # the incarnation that last heartbeated (a restart makes a new one)
        self.last_heartbeat_ms = last_heartbeat_ms  # None: not heard from since the coordinator started


class Controller:
    def __init__(self, cluster_id: str, *, node_session_timeout_ms: int = NODE_SESSION_TIMEOUT_MS):
        self.cluster_id = cluster_id
        self.node_session_timeout_ms = node_session_timeout_ms
        self.topics: dict[str, dict] = {}
        self.nodes: dict[int, NodeInfo] = {}
        self.version = 0  # the placement version: nodes and clients compare it to know they are current
        self.last_topic_id = 0
        self.last_producer_id = 0

    @classmethod
    def restore(cls, records, new_cluster_id: str, **options) -> tuple["Controller", tuple]:
        """Rebuild from the stored ``(key, value)`` pairs. A store that holds no cluster id yet takes
        ``new_cluster_id``; the records to persist that are returned with the controller."""
        stored = {bytes(key): value for key, value in records}
        cluster_id = stored.get(KEY_CLUSTER_ID)
        self = cls(cluster_id or new_cluster_id, **options)
        for key, value in stored.items():
            if key.startswith(KEY_TOPIC):
                self.topics[key[len(KEY_TOPIC):].decode()] = value
            elif key.startswith(KEY_NODE):
                node_id = int(key[len(KEY_NODE):])
                self.nodes[node_id] = NodeInfo(node_id, value["address"])
        self.version = stored.get(KEY_VERSION, 0)
        self.last_topic_id = stored.get(KEY_TOPIC_ID, 0)
        self.last_producer_id = stored.get(KEY_PRODUCER_ID, 0)
        self.check_invariants()
        return self, (() if cluster_id else ((PUT, KEY_CLUSTER_ID, self.cluster_id),))

    # -- nodes -----------------------------------------------------------------------------------

    def alive(self, node: NodeInfo, now_ms: int) -> bool:
        return node.last_heartbeat_ms is not None and now_ms - node.last_heartbeat_ms <= self.node_session_timeout_ms

    def live_node_ids(self, now_ms: int) -> list[int]:
        return sorted(n.node_id for n in self.nodes.values() if self.alive(n, now_ms))

    def node_heartbeat(self, node_id, address, instance, version, now_ms: int) -> Outcome:
        """A node is alive; the reply brings it the placement when its ``version`` is not the current one."""
        # Checked before anything is stored: a bogus id (say int(1e300)) persisted here would end up in
        # every metadata reply.
        if not isinstance(node_id, int) or isinstance(node_id, bool) or not 0 <= node_id <= NODE_ID_MAX:
            raise InvalidRequest(f"node_id must be an integer from 0 to {NODE_ID_MAX}, not {node_id!r}")
        if not isinstance(address, str) or not address:
            raise InvalidRequest(f"address must be a ZeroMQ address string, not {address!r}")
        node = self.nodes.get(node_id)
        if node is not None and node.address != address and node.instance != instance and self.alive(node, now_ms):
            raise NodeIdentityMismatch(
                f"node id {node_id} is already live at {node.address}; give each node its own --node-id")
        records = ()
        if node is None or node.address != address:
            records = ((PUT, KEY_NODE + b"%d" % node_id, {"address": address}),)
            node = self.nodes[node_id] = NodeInfo(node_id, address)
        node.instance, node.last_heartbeat_ms = instance, now_ms
        topics = None if version == self.version else self.topics
        return Outcome({"version": self.version, "topics": topics, "cluster_id": self.cluster_id}, records)

    # -- topics ----------------------------------------------------------------------------------

    def metadata(self, wanted, strict: bool, now_ms: int) -> dict:
        """The nodes (with liveness) and the topics asked for (all when ``wanted`` is None)."""
        topics = self.topics if wanted is None else {t: self.topics[t] for t in wanted if t in self.topics}
        if wanted is not None and strict:
            missing = [t for t in wanted if t not in self.topics]
            if missing:
                raise UnknownTopic(f"unknown topic {missing[0]!r}; create it with `bus topic create {missing[0]}`")
        nodes = {n.node_id: {"address": n.address, "alive": self.alive(n, now_ms)} for n in self.nodes.values()}
        return {"version": self.version, "nodes": nodes, "topics": topics}

    def create_topic(self, name, partitions, retention_ms, retention_bytes, now_ms: int) -> Outcome:
        if not isinstance(name, str) or not TOPIC_NAME.fullmatch(name):
            raise InvalidRequest(f"topic name {name!r} must be 1-249 characters of A-Z a-z 0-9 . _ -")
        if not isinstance(partitions, int) or not 1 <= partitions <= PARTITIONS_MAX:
            raise InvalidRequest(f"partitions must be an integer from 1 to {PARTITIONS_MAX}, not {partitions!r}")
        for label, value in (("retention_ms", retention_ms), ("retention_bytes", retention_bytes)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InvalidRequest(f"{label} must be a positive integer, not {value!r}")
        if name in self.topics:
            raise TopicExists(f"topic {name!r} already exists")
        live = self.live_node_ids(now_ms)
        if not live:
            raise NoNodesAvailable("no live nodes to place partitions on; start nodes first (`bus up`)")
        load = node_load(self.topics)
        owners = place(partitions, live, load)
        for node_id in set(owners):
            if load.get(node_id, 0) + owners.count(node_id) > NODE_PARTITIONS_MAX:
                raise InvalidRequest(f"{partitions} more partitions would put node {node_id} over its maximum of "
                                     f"{NODE_PARTITIONS_MAX}; add nodes or delete topics")
        self.last_topic_id += 1
        topic = {"id": self.last_topic_id, "partitions": owners,
                 "retention_ms": retention_ms, "retention_bytes": retention_bytes}
        self.topics[name] = topic
        records = ((PUT, KEY_TOPIC_ID, self.last_topic_id), (PUT, KEY_TOPIC + name.encode(), topic),
                   *self._bump_version())
        return Outcome({"name": name, **topic}, records)

    def delete_topic(self, name, now_ms: int) -> Outcome:
        if not isinstance(name, str):
            raise InvalidRequest(f"a topic name is a string, not {name!r}")
        if name not in self.topics:
            raise UnknownTopic(f"unknown topic {name!r}")
        del self.topics[name]
        return Outcome({"name": name}, ((DELETE, KEY_TOPIC + name.encode()), *self._bump_version()))

    def _bump_version(self) -> tuple:
        self.version += 1
        return ((PUT, KEY_VERSION, self.version),)

    # -- producer ids ----------------------------------------------------------------------------

    def init_producer_id(self, now_ms: int) -> Outcome:
        self.last_producer_id += 1
        return Outcome({"producer_id": self.last_producer_id, "epoch": 0},
                       ((PUT, KEY_PRODUCER_ID, self.last_producer_id),))

    # -- invariants ------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """What must hold between any two requests; a broken one stops the coordinator."""
        ids = [topic["id"] for topic in self.topics.values()]
        _invariant(len(ids) == len(set(ids)), f"topic ids are not unique: {sorted(ids)}")
        _invariant(all(0 < i <= self.last_topic_id for i in ids), f"a topic id above the counter {self.last_topic_id}")
        for name, topic in self.topics.items():
            _invariant(TOPIC_NAME.fullmatch(name) is not None, f"topic name {name!r}")
            _invariant(1 <= len(topic["partitions"]) <= PARTITIONS_MAX, f"{name}: {len(topic['partitions'])} partitions")
        _invariant(self.version >= 0 and self.last_producer_id >= 0, "a counter below zero")


class InvariantViolation(AssertionError):
    """The controller's state broke a rule that must always hold; the coordinator must stop, not limp on."""


def _invariant(ok: bool, message: str) -> None:
    if not ok:  # not an ``assert``: it must hold under ``python -O`` too
        raise InvariantViolation(message)
