"""The cluster's controller as a pure state machine: nodes and their sessions, topics, and each partition's
replicas, leader, leader epoch, in-sync replicas and partition epoch; the producer-id counter.

This module owns every decision the coordinator makes about the cluster outside consumer groups (those
are nodes/groups.py): whether a topic may be created and where its replicas go, when a node is alive,
whom to elect when a leader is lost, whether a leader's ISR change is accepted, and which producer id is
handed out next. It must never touch sockets, clocks, threads, randomness or disk: time arrives as
``now_ms`` (monotonic), and what must be made durable leaves as records for the shell
(nodes/coordinator.py) to write BEFORE it replies or tells any node (docs/replication.md).

Calling convention, as nodes/groups.py: a request method returns an ``Outcome`` (the reply, the records to
persist in one transaction, and whether the nodes must hear of a change) or raises a ``BusError`` and
changes nothing. ``tick(now_ms)`` ends the sessions of nodes that stopped heartbeating; ``next_deadline_ms``
says when it next has work.

Elections (after Kafka's KRaft controller, KIP-497, KIP-903):
- Every change of a partition bumps its ``partition_epoch``; every change of its leader bumps its
  ``leader_epoch``. Both are persisted before anyone hears of them.
- A leader is only ever elected from the ISR, from live members, in replica order (no unclean election
  but by the explicit ``elect_unclean``). A partition whose ISR has no live member has no leader (-1) and
  keeps its last ISR member, which holds every committed record, until it returns.
- A node whose session ends leaves every ISR it is in (but the last member) and loses its leaderships.
- A node heartbeating as a new incarnation (it restarted) leaves every ISR but where it is the last
  member, and loses its leaderships; it rejoins an ISR through its leader once caught up. With a
  different data directory (``dir_id``: it lost its disk) it also leaves ISRs where it is the last member:
  an empty replica must never be elected. Such a partition stays leaderless until an unclean election.
- An ISR change (``alter_partition``) is compare-and-set on the partition epoch, from the current leader's
  current incarnation at its current leader epoch; every member it adds must be alive and be the
  incarnation the leader saw catch up.

Persisted layout (the coordinator's MetaStore):
- ``topic:<name>``              -> {id, partition_count, replication_factor, min_insync_replicas,
                                    retention_ms, retention_bytes}
- ``partition:<name>\\0`` + index as 4 bytes big-endian
                                -> {replicas, leader, leader_epoch, isr, partition_epoch}
- ``node:<id>``                 -> {address, dir_id}
- ``cluster_id``                -> str, who this cluster is, for good
- ``counter:topic_id``          -> int, the last topic id handed out (ids are never reused)
- ``counter:producer_id``       -> int, the last producer id handed out
- ``counter:placement_version`` -> int, bumped by every change of a topic or partition
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from bus.errors import (FencedLeaderEpoch, IneligibleReplica, InvalidRequest, InvalidUpdateVersion,
                        NoNodesAvailable, NodeIdentityMismatch, NotLeader, TopicExists, UnknownPartition,
                        UnknownTopic)
from store.log_store import PARTITIONS_MAX as NODE_PARTITIONS_MAX

from .placement import loads, place

PUT = "put"
DELETE = "delete"

NODE_SESSION_TIMEOUT_MS = 3_000
NODE_ID_MAX = (1 << 31) - 2
# The coordinator's broker id in Kafka's protocol (FindCoordinator, Metadata): distinct from every node's.
COORDINATOR_BROKER_ID = (1 << 31) - 1
TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")
PARTITIONS_MAX = 10_000  # of one topic
REPLICATION_FACTOR_DEFAULT_MAX = 3  # the default replication factor is min(this, live nodes)
NO_LEADER = -1

KEY_TOPIC = b"topic:"
KEY_PARTITION = b"partition:"
KEY_NODE = b"node:"
KEY_CLUSTER_ID = b"cluster_id"
KEY_TOPIC_ID = b"counter:topic_id"
KEY_PRODUCER_ID = b"counter:producer_id"
KEY_VERSION = b"counter:placement_version"
KEY_PREFIXES = (KEY_TOPIC, KEY_PARTITION, KEY_NODE, KEY_CLUSTER_ID, b"counter:")  # what ``restore`` reads
_INDEX = struct.Struct(">I")

TOPIC_CONFIG = ("id", "replication_factor", "min_insync_replicas", "retention_ms", "retention_bytes")


@dataclass(frozen=True)
class Outcome:
    reply: object  # msgpack-able: what the shell sends back
    records: tuple = ()  # ("put", key, value) | ("delete", key): persist in one transaction before replying
    notify: bool = False  # the placement changed: the shell tells every live node after persisting


class NodeInfo:
    """A node as the controller knows it: its address and data directory (durable), its session (soft)."""

    __slots__ = ("node_id", "address", "dir_id", "instance", "last_heartbeat_ms", "live")

    def __init__(self, node_id: int, address: str, dir_id: str | None = None):
        self.node_id = node_id
        self.address = address
        self.dir_id = dir_id  # the data directory it last registered with (a new one: it lost its disk)
        self.instance = None  # the incarnation that last heartbeated (a restart makes a new one)
        self.last_heartbeat_ms: int | None = None  # None: not heard from since the controller started
        self.live = False  # counted alive for elections: set by heartbeats, cleared when the session ends


def partition_key(topic: str, index: int) -> bytes:
    return KEY_PARTITION + topic.encode() + b"\0" + _INDEX.pack(index)


def default_min_insync_replicas(replication_factor: int) -> int:
    """A topic's min ISR when its creator names none: 2 from three replicas on (one may fail and acks=all
    still lands on two), else 1."""
    return 2 if replication_factor >= 3 else 1


class Controller:
    def __init__(self, cluster_id: str, *, node_session_timeout_ms: int = NODE_SESSION_TIMEOUT_MS):
        self.cluster_id = cluster_id
        self.node_session_timeout_ms = node_session_timeout_ms
        # name -> {id, partitions: [{replicas, leader, leader_epoch, isr, partition_epoch}], replication_factor,
        # min_insync_replicas, retention_ms, retention_bytes}: what metadata replies and placement pushes carry
        self.topics: dict[str, dict] = {}
        self.nodes: dict[int, NodeInfo] = {}
        self.version = 0  # the placement version: nodes and clients compare it to know they are current
        self.last_topic_id = 0
        self.last_producer_id = 0
        self.elections = 0  # changes of leader decided since this controller started (for metrics)
        self._now_ms = 0  # the latest time seen; time never runs backwards here

    @classmethod
    def restore(cls, records, new_cluster_id: str, now_ms: int, **options) -> tuple["Controller", tuple]:
        """Rebuild from the stored ``(key, value)`` pairs. A store that holds no cluster id yet takes
        ``new_cluster_id``; the records to persist are returned with the controller. Every known node gets
        a fresh session from ``now_ms``, so a coordinator restart elects nobody away from a node that is
        still running; one that does not heartbeat within its session is then declared dead."""
        stored = {bytes(key): value for key, value in records}
        cluster_id = stored.get(KEY_CLUSTER_ID)
        self = cls(cluster_id or new_cluster_id, **options)
        self._now_ms = now_ms
        partitions: dict[str, dict[int, dict]] = {}
        for key, value in sorted(stored.items()):
            if key.startswith(KEY_TOPIC):
                config = dict(value)
                count = config.pop("partition_count")
                self.topics[key[len(KEY_TOPIC):].decode()] = {**config, "partitions": [None] * count}
            elif key.startswith(KEY_PARTITION):
                name, index = key[len(KEY_PARTITION):-_INDEX.size - 1], key[-_INDEX.size:]  # name \0 index
                partitions.setdefault(name.decode(), {})[_INDEX.unpack(index)[0]] = value
            elif key.startswith(KEY_NODE):
                node_id = int(key[len(KEY_NODE):])
                node = self.nodes[node_id] = NodeInfo(node_id, value["address"], value.get("dir_id"))
                node.last_heartbeat_ms, node.live = now_ms, True
        for name, topic in self.topics.items():
            for index, state in partitions.get(name, {}).items():
                topic["partitions"][index] = state
        self.version = stored.get(KEY_VERSION, 0)
        self.last_topic_id = stored.get(KEY_TOPIC_ID, 0)
        self.last_producer_id = stored.get(KEY_PRODUCER_ID, 0)
        self.check_invariants()
        return self, (() if cluster_id else ((PUT, KEY_CLUSTER_ID, self.cluster_id),))

    def _clock(self, now_ms: int) -> int:
        self._now_ms = max(self._now_ms, now_ms)
        return self._now_ms

    # -- nodes -----------------------------------------------------------------------------------

    def alive(self, node: NodeInfo) -> bool:
        """Heard from since the controller started, and its session has not ended."""
        return node.live and node.instance is not None

    def live_node_ids(self) -> list[int]:
        return sorted(n.node_id for n in self.nodes.values() if self.alive(n))

    def _session_ended(self, node: NodeInfo, now_ms: int) -> bool:
        return now_ms - node.last_heartbeat_ms > self.node_session_timeout_ms

    def node_heartbeat(self, node_id, address, instance, dir_id, version, now_ms: int) -> Outcome:
        """A node is alive. Its reply brings the placement when ``version`` is not the current one."""
        now_ms = self._clock(now_ms)
        # Checked before anything is stored: a bogus id (say int(1e300)) persisted here would end up in
        # every metadata reply.
        if not isinstance(node_id, int) or isinstance(node_id, bool) or not 0 <= node_id <= NODE_ID_MAX:
            raise InvalidRequest(f"node_id must be an integer from 0 to {NODE_ID_MAX}, not {node_id!r}")
        if not isinstance(address, str) or not address:
            raise InvalidRequest(f"address must be a ZeroMQ address string, not {address!r}")
        if dir_id is not None and not isinstance(dir_id, str):
            raise InvalidRequest(f"dir_id must be a string, not {dir_id!r}")
        node = self.nodes.get(node_id)
        if (node is not None and node.address != address and node.instance != instance and self.alive(node)
                and not self._session_ended(node, now_ms)):
            raise NodeIdentityMismatch(
                f"node id {node_id} is already live at {node.address}; give each node its own --node-id")
        lost_disk = node is not None and None not in (node.dir_id, dir_id) and node.dir_id != dir_id
        restarted = node is not None and node.instance is not None and node.instance != instance
        records = []
        if node is None or node.address != address or (dir_id is not None and node.dir_id != dir_id):
            node = self.nodes.setdefault(node_id, NodeInfo(node_id, address, dir_id))
            node.address, node.dir_id = address, dir_id if dir_id is not None else node.dir_id
            records.append((PUT, KEY_NODE + b"%d" % node_id, {"address": address, "dir_id": node.dir_id}))
        came_back = not self.alive(node)
        node.instance, node.last_heartbeat_ms, node.live = instance, now_ms, True
        changed = []
        if lost_disk or restarted:
            changed += self._leave_isrs(node_id, keep_last=not lost_disk)
        if came_back or changed:
            changed += self._elect_leaderless()
        records += self._records_for(changed)
        reply = self.placement() if version != self.version else {"version": self.version, "topics": None,
                                                                   "cluster_id": self.cluster_id}
        return Outcome(reply, tuple(records), bool(changed))

    def placement(self) -> dict:
        """What a node needs to serve its partitions: the topics, every node's address, and who we are (a
        heartbeat's reply when the node's version is behind, and what the shell pushes on a change)."""
        return {"version": self.version, "topics": self.topics, "cluster_id": self.cluster_id,
                "nodes": {n.node_id: n.address for n in self.nodes.values()}}

    def tick(self, now_ms: int) -> Outcome:
        """End the sessions of nodes that stopped heartbeating: each leaves the ISRs and its leaderships."""
        now_ms = self._clock(now_ms)
        changed = []
        for node in sorted(self.nodes.values(), key=lambda n: n.node_id):
            if node.live and self._session_ended(node, now_ms):
                node.live = False
                changed += self._leave_isrs(node.node_id, keep_last=True)
        return Outcome(None, tuple(self._records_for(changed)), bool(changed))

    def next_deadline_ms(self) -> int | None:
        ends = [n.last_heartbeat_ms + self.node_session_timeout_ms + 1 for n in self.nodes.values() if n.live]
        return min(ends) if ends else None

    # -- elections -------------------------------------------------------------------------------

    def _leave_isrs(self, node_id: int, keep_last: bool) -> list:
        """``node_id`` leaves every ISR (but, with ``keep_last``, where it is the last member) and its
        leaderships go to live ISR members, in replica order. Returns the partitions changed."""
        changed = []
        for name, topic in self.topics.items():
            for index, p in enumerate(topic["partitions"]):
                if node_id not in p["isr"] and p["leader"] != node_id:
                    continue
                isr = [r for r in p["isr"] if r != node_id]
                if not isr and keep_last:
                    isr = [node_id]  # the one replica known to hold every committed record
                leader = p["leader"]
                if leader == node_id or leader not in isr:
                    leader = self._candidate(p["replicas"], isr, exclude=node_id)
                if isr != p["isr"] or leader != p["leader"]:
                    self._set(p, leader, isr)
                    changed.append((name, index))
        return changed

    def _elect_leaderless(self) -> list:
        """Partitions without a leader whose ISR now has a live member elect it."""
        changed = []
        for name, topic in self.topics.items():
            for index, p in enumerate(topic["partitions"]):
                if p["leader"] == NO_LEADER:
                    leader = self._candidate(p["replicas"], p["isr"])
                    if leader != NO_LEADER:
                        self._set(p, leader, p["isr"])
                        changed.append((name, index))
        return changed

    def _candidate(self, replicas, isr, exclude: int = NO_LEADER) -> int:
        for r in replicas:
            if r in isr and r != exclude and r in self.nodes and self.alive(self.nodes[r]):
                return r
        return NO_LEADER

    def _set(self, p: dict, leader: int, isr: list) -> None:
        if leader != p["leader"]:
            p["leader_epoch"] += 1
            self.elections += 1
        p["leader"], p["isr"] = leader, list(isr)
        p["partition_epoch"] += 1

    def _records_for(self, changed: list) -> list:
        if not changed:
            return []
        records = [(PUT, partition_key(name, index), self.topics[name]["partitions"][index])
                   for name, index in dict.fromkeys(changed)]
        return records + self._bump_version()

    def _partition(self, topic, partition) -> dict:
        if not isinstance(topic, str) or topic not in self.topics:
            raise UnknownTopic(f"unknown topic {topic!r}")
        partitions = self.topics[topic]["partitions"]
        if not isinstance(partition, int) or not 0 <= partition < len(partitions):
            raise UnknownPartition(f"topic {topic!r} has no partition {partition!r}")
        return partitions[partition]

    def alter_partition(self, node_id, instance, topic, partition, leader_epoch, partition_epoch, isr,
                        incarnations, now_ms: int) -> Outcome:
        """A leader's ISR change, compare-and-set on the partition epoch. Replies with the new state."""
        self._clock(now_ms)
        p = self._partition(topic, partition)
        node = self.nodes.get(node_id)
        if p["leader"] != node_id or node is None or node.instance != instance:
            raise NotLeader(f"node {node_id} (incarnation {instance}) does not lead {topic}/{partition}")
        if leader_epoch != p["leader_epoch"]:
            raise FencedLeaderEpoch(f"leader epoch {leader_epoch} is not the current {p['leader_epoch']}")
        if partition_epoch != p["partition_epoch"]:
            raise InvalidUpdateVersion(f"partition epoch {partition_epoch} is not the current {p['partition_epoch']}")
        if (not isinstance(isr, list) or len(set(isr)) != len(isr) or node_id not in isr
                or not set(isr) <= set(p["replicas"])):
            raise InvalidRequest(f"ISR {isr!r} must hold the leader and only replicas of {p['replicas']}, once each")
        incarnations = {int(k): v for k, v in (incarnations or {}).items()}
        for added in set(isr) - set(p["isr"]):
            member = self.nodes.get(added)
            if member is None or not self.alive(member) or member.instance != incarnations.get(added):
                raise IneligibleReplica(f"node {added} may not join the ISR of {topic}/{partition}: not alive, or "
                                        "not the incarnation that caught up")
        ordered = [r for r in p["replicas"] if r in isr]
        self._set(p, p["leader"], ordered)
        return Outcome(dict(p), tuple(self._records_for([(topic, partition)])), True)

    def elect_unclean(self, topic, partition, now_ms: int) -> Outcome:
        """The explicit unclean election for a partition with no leader and no live ISR member: any live
        replica becomes leader with itself as the ISR. Committed records it lacks are lost."""
        self._clock(now_ms)
        p = self._partition(topic, partition)
        if p["leader"] != NO_LEADER:
            raise InvalidRequest(f"{topic}/{partition} has a leader (node {p['leader']}); nothing to do")
        leader = self._candidate(p["replicas"], p["replicas"])
        if leader == NO_LEADER:
            raise NoNodesAvailable(f"no replica of {topic}/{partition} is alive ({p['replicas']})")
        self._set(p, leader, [leader])
        return Outcome(dict(p), tuple(self._records_for([(topic, partition)])), True)

    # -- topics ----------------------------------------------------------------------------------

    def metadata(self, wanted, strict: bool, now_ms: int) -> dict:
        """The nodes (with liveness) and the topics asked for (all when ``wanted`` is None)."""
        self._clock(now_ms)
        topics = self.topics if wanted is None else {t: self.topics[t] for t in wanted if t in self.topics}
        if wanted is not None and strict:
            missing = [t for t in wanted if t not in self.topics]
            if missing:
                raise UnknownTopic(f"unknown topic {missing[0]!r}; create it with `bus topic create {missing[0]}`")
        nodes = {n.node_id: {"address": n.address, "alive": self.alive(n)} for n in self.nodes.values()}
        return {"version": self.version, "nodes": nodes, "topics": topics}

    def create_topic(self, name, partitions, retention_ms, retention_bytes, now_ms: int, *,
                     replication_factor=None, min_insync_replicas=None) -> Outcome:
        self._clock(now_ms)
        if not isinstance(name, str) or not TOPIC_NAME.fullmatch(name):
            raise InvalidRequest(f"topic name {name!r} must be 1-249 characters of A-Z a-z 0-9 . _ -")
        if not _is_int(partitions) or not 1 <= partitions <= PARTITIONS_MAX:
            raise InvalidRequest(f"partitions must be an integer from 1 to {PARTITIONS_MAX}, not {partitions!r}")
        for label, value in (("retention_ms", retention_ms), ("retention_bytes", retention_bytes)):
            if value is not None and (not _is_int(value) or value <= 0):
                raise InvalidRequest(f"{label} must be a positive integer, not {value!r}")
        if name in self.topics:
            raise TopicExists(f"topic {name!r} already exists")
        live = self.live_node_ids()
        if not live:
            raise NoNodesAvailable("no live nodes to place partitions on; start nodes first (`bus up`)")
        if replication_factor is None:
            replication_factor = min(REPLICATION_FACTOR_DEFAULT_MAX, len(live))
        if not _is_int(replication_factor) or replication_factor < 1:
            raise InvalidRequest(f"replication_factor must be a positive integer, not {replication_factor!r}")
        if replication_factor > len(live):
            raise InvalidRequest(f"replication_factor {replication_factor} is more than the {len(live)} live nodes "
                                 f"{live}; start more nodes or ask for fewer replicas")
        if min_insync_replicas is None:
            min_insync_replicas = default_min_insync_replicas(replication_factor)
        if not _is_int(min_insync_replicas) or not 1 <= min_insync_replicas <= replication_factor:
            raise InvalidRequest(f"min_insync_replicas must be an integer from 1 to the replication factor "
                                 f"{replication_factor}, not {min_insync_replicas!r}")
        leader_load, replica_load = loads(self.topics)
        placed = place(partitions, replication_factor, live, leader_load, replica_load)
        for node_id in live:
            held = replica_load.get(node_id, 0) + sum(node_id in replicas for replicas in placed)
            if held > NODE_PARTITIONS_MAX:
                raise InvalidRequest(f"{partitions} more partitions would put node {node_id} over its maximum of "
                                     f"{NODE_PARTITIONS_MAX}; add nodes or delete topics")
        self.last_topic_id += 1
        config = {"id": self.last_topic_id, "replication_factor": replication_factor,
                  "min_insync_replicas": min_insync_replicas, "retention_ms": retention_ms,
                  "retention_bytes": retention_bytes}
        states = [{"replicas": replicas, "leader": replicas[0], "leader_epoch": 0, "isr": list(replicas),
                   "partition_epoch": 0} for replicas in placed]
        self.topics[name] = {**config, "partitions": states}
        records = [(PUT, KEY_TOPIC_ID, self.last_topic_id),
                   (PUT, KEY_TOPIC + name.encode(), {**config, "partition_count": partitions})]
        records += [(PUT, partition_key(name, index), state) for index, state in enumerate(states)]
        return Outcome({"name": name, **self.topics[name]}, tuple(records + self._bump_version()), True)

    def delete_topic(self, name, now_ms: int) -> Outcome:
        self._clock(now_ms)
        if not isinstance(name, str):
            raise InvalidRequest(f"a topic name is a string, not {name!r}")
        if name not in self.topics:
            raise UnknownTopic(f"unknown topic {name!r}")
        count = len(self.topics.pop(name)["partitions"])
        records = [(DELETE, KEY_TOPIC + name.encode())]
        records += [(DELETE, partition_key(name, index)) for index in range(count)]
        return Outcome({"name": name}, tuple(records + self._bump_version()), True)

    def _bump_version(self) -> list:
        self.version += 1
        return [(PUT, KEY_VERSION, self.version)]

    # -- producer ids ----------------------------------------------------------------------------

    def init_producer_id(self, now_ms: int) -> Outcome:
        self._clock(now_ms)
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
            _invariant(1 <= topic["min_insync_replicas"] <= topic["replication_factor"], f"{name}: min ISR")
            for index, p in enumerate(topic["partitions"]):
                where = f"{name}/{index}"
                _invariant(p is not None, f"{where} has no stored state")
                replicas, isr, leader = p["replicas"], p["isr"], p["leader"]
                _invariant(len(replicas) == topic["replication_factor"] and len(set(replicas)) == len(replicas),
                           f"{where}: replicas {replicas}")
                _invariant(set(isr) <= set(replicas) and len(set(isr)) == len(isr), f"{where}: ISR {isr}")
                _invariant(leader == NO_LEADER or leader in isr, f"{where}: leader {leader} not in ISR {isr}")
                _invariant(isr or leader == NO_LEADER, f"{where}: an empty ISR with leader {leader}")
                _invariant(p["leader_epoch"] >= 0 and p["partition_epoch"] >= p["leader_epoch"],
                           f"{where}: epochs {p['leader_epoch']} / {p['partition_epoch']}")
        _invariant(self.version >= 0 and self.last_producer_id >= 0, "a counter below zero")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class InvariantViolation(AssertionError):
    """The controller's state broke a rule that must always hold; the coordinator must stop, not limp on."""


def _invariant(ok: bool, message: str) -> None:
    if not ok:  # not an ``assert``: it must hold under ``python -O`` too
        raise InvariantViolation(message)
